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

    The banks' kernels are hundreds of small ops per step; they run on one intra-op thread.
    With more, each op's OpenMP barrier waits on every worker, and on a loaded machine (a
    server's HTTP threads) that wait dominates: measured on 2 cores under serving load, a
    mixed-adapter decode ran 1.46x faster this way, while the base model's GEMMs keep
    all threads.
    """

    offset = 0

    def __init__(self, banks: dict, slots: dict[str, torch.Tensor]):
        self.lin, self.res = [], []
        for kind, s in slots.items():
            if not bool((s > 0).any()):
                continue
            bank = banks[kind]
            if hasattr(bank, "linear"):
                self.lin.append((bank, bank.route(s)))
            if hasattr(bank, "residual"):
                self.res.append((bank, bank.route(s)))

    def __bool__(self):
        return bool(self.lin or self.res)

    def linear(self, layer, name, x, y):
        if not self.lin:
            return y
        with _one_thread():
            for bank, route in self.lin:
                y = bank.linear(layer, name, x, y, route)
        return y

    def residual(self, layer, where, h):
        if not self.res:
            return h
        with _one_thread():
            for bank, route in self.res:
                h = bank.residual(layer, where, h, route)
        return h

    def prefix(self, layer, batch):
        raise RuntimeError("per-row prefixes are served from the KV cache; use SingleSeams without a cache")


class _one_thread:
    """Run the enclosed ops on one intra-op thread, then restore the thread count."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)
