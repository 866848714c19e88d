"""The objects the model's seams call: one adapter for a whole batch, or one per row.

The model calls seams.linear(layer, proj, x, y), seams.residual(layer, where, h) and, without
a KV cache, seams.prefix(layer, batch); `offset` is where the row's tokens start (a prefix's
virtual tokens come first).
"""

from __future__ import annotations

import torch

from adapters.base import Adapter
from adapters.registry import get_type


class SingleSeams:
    """Every row uses the same adapter, through its type's differentiable forward (training,
    reference). Tensors may be nn.Parameters: gradients flow to them."""

    def __init__(self, adapter: Adapter):
        self.ad, self.t = adapter, get_type(adapter.kind)
        self.offset = self.t.virtual_tokens(adapter.config)

    def linear(self, layer, name, x, y):
        return self.t.linear(self.ad, layer, name, x, y)

    def residual(self, layer, where, h):
        return self.t.residual(self.ad, layer, where, h)

    def prefix(self, layer, batch):
        return self.t.prefix(self.ad, layer, batch)


class BatchSeams:
    """Row b uses slot slots[kind][b] of each type's bank (0 = none of that type).

    Routing (which rows use which slots) is worked out once per forward, not per layer.
    Prefixes are not applied here: they live in the KV cache (see PrefixBank).

    Seams of modules that no row adapts return at once.
    """

    offset = 0

    def __init__(self, banks: dict, slots: dict[str, torch.Tensor]):
        self.lin, self.res = [], []
        self.active: set = set()  # (layer, module) that some row adapts: the others skip at once
        for kind, s in slots.items():
            if not bool((s > 0).any()):
                continue
            bank = banks[kind]
            route = bank.route(s)
            self.active |= bank.active(route)
            if hasattr(bank, "linear"):
                self.lin.append((bank, route))
            if hasattr(bank, "residual"):
                self.res.append((bank, route))

    def __bool__(self):
        return bool(self.lin or self.res)

    def linear(self, layer, name, x, y):
        if (layer, name) not in self.active:
            return y
        for bank, route in self.lin:
            y = bank.linear(layer, name, x, y, route)
        return y

    def linear_columns(self, layer, cols, x, y):
        """`linear` for projections whose outputs are column ranges of one wider y (a fused
        q|k|v): cols [(name, first column, width)]; the banks add into y in place."""
        for name, col, width in cols:
            if (layer, name) in self.active:
                for bank, route in self.lin:
                    bank.linear(layer, name, x, y, route, col, width)

    def residual(self, layer, where, h):
        if (layer, where) not in self.active:
            return h
        for bank, route in self.res:
            h = bank.residual(layer, where, h, route)
        return h

    def prefix(self, layer, batch):
        raise RuntimeError("per-row prefixes are served from the KV cache; use SingleSeams without a cache")



class StaticSeams:
    """Row b uses slot slots[kind][b] of each bank, through the banks' capture-safe methods
    (`linear_static`, `residual_static`): every row runs every module a bank holds, slot 0
    (all zeros) giving exactly nothing. No host-side routing and no shape that depends on the
    batch's adapters, so one captured step (torch.compile, CUDA graphs) serves every mix.
    Prefixes need nothing here: their keys and values are in the KV cache.
    """

    offset = 0

    def __init__(self, banks: dict, slots: dict[str, torch.Tensor]):
        self.pairs = [(banks[kind], s) for kind, s in slots.items() if kind in banks]

    def linear(self, layer, name, x, y):
        for bank, s in self.pairs:
            if hasattr(bank, "linear_static"):
                y = bank.linear_static(layer, name, x, y, s)
        return y

    def residual(self, layer, where, h):
        for bank, s in self.pairs:
            if hasattr(bank, "residual_static"):
                h = bank.residual_static(layer, where, h, s)
        return h

    def prefix(self, layer, batch):
        raise RuntimeError("per-row prefixes are served from the KV cache")
