"""Adapters on the device: one slot bank per adapter type, names mapped to slots.

A sequence names at most one adapter; each step builds a BatchSeams that routes every row to
its slot. Prefix adapters act at admission instead: their keys/values are written into the
first positions of the sequence's KV-cache slot and its tokens start after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.base import Adapter, AdapterError, Capacity
from adapters.files import load_dir
from adapters.registry import get_type
from adapters.seams import BatchSeams


ROUTINGS_KEPT = 8
"""Batch compositions whose routing is kept (a continuous batcher alternates between a few)."""


@dataclass(frozen=True)
class Handle:
    name: str
    kind: str
    slot: int
    virtual_tokens: int
    bank: str
    """The bank holding it (its kind's, or the one its type is served by: SoRA -> lora)."""


class AdapterSlots:
    def __init__(self, shape, max_adapters: int, device, dtype, capacity: Capacity | None = None):
        self.shape, self.max_adapters, self.device, self.dtype = shape, max_adapters, device, dtype
        self.capacity = capacity or Capacity()
        self.banks: dict = {}
        self.free: dict[str, list[int]] = {}
        self.handles: dict[str, Handle] = {}
        self.routings: dict = {}  # (device, rows' (bank, slot)) -> BatchSeams | None, the last few

    def bank_of(self, kind: str) -> str:
        return get_type(kind).bank_kind

    def full(self, kind: str) -> bool:
        """Whether the bank that would hold an adapter of this type has no free slot."""
        b = self.bank_of(kind)
        return b in self.free and not self.free[b]

    def _bank(self, kind: str):
        b = self.bank_of(kind)
        if b not in self.banks:
            # slot 0 means "no adapter", so a bank has max_adapters + 1 slots
            self.banks[b] = get_type(b).make_bank(self.shape, self.max_adapters + 1, self.device, self.dtype,
                                                          self.capacity)
            self.free[b] = list(range(self.max_adapters, 0, -1))
        return self.banks[b]

    def load(self, name: str, source: str | Path | Adapter) -> Handle:
        """Validate (if a directory), compile and copy an adapter into a free slot of its type.

        Everything that can fail happens before the slot is touched, so a refused adapter
        leaves the banks as they were. Re-loading a name replaces it.
        """
        ad = source if isinstance(source, Adapter) else load_dir(source, self.shape, self.capacity)
        t = get_type(ad.kind)
        compiled = _to_device(t.compiled(ad), self.device)
        bank, b = self._bank(ad.kind), t.bank_kind
        old = self.handles.get(name)
        if self.free[b]:
            slot = self.free[b].pop()
        elif old is not None and old.bank == b:
            slot = old.slot  # replace in place; banks check before they clear a slot
        else:
            raise AdapterError(f"all {self.max_adapters} {b} adapter slots are in use")
        self.routings.clear()  # before the bank changes: a failed load may have cleared the slot
        try:
            bank.load(slot, compiled)
        except BaseException:
            if old is None or slot != old.slot:
                self.free[b].append(slot)
            raise
        if old is not None and (old.bank, old.slot) != (b, slot):
            self._release(old)
        self.handles[name] = h = Handle(name, ad.kind, slot, t.virtual_tokens(ad.config), b)
        return h

    def unload(self, name: str) -> None:
        h = self.handles.pop(name, None)
        if h is None:
            raise AdapterError(f"adapter {name!r} is not loaded")
        self._release(h)

    def _release(self, h: Handle) -> None:
        self.routings.clear()
        self.banks[h.bank].clear(h.slot)
        self.free[h.bank].append(h.slot)

    def get(self, name: str) -> Handle:
        try:
            return self.handles[name]
        except KeyError:
            raise AdapterError(f"adapter {name!r} is not loaded") from None

    def seams_for(self, handles: list[Handle | None], device) -> BatchSeams | None:
        """Per-row routing for one forward; None when no row uses a per-row adapter.

        Decode steps repeat the same batch composition until a sequence joins or leaves, so
        the last few routings are kept and reused (a BatchSeams is read-only once built) until
        any slot is loaded or cleared."""
        key = (device, tuple(None if h is None else (h.bank, h.slot) for h in handles))
        if key in self.routings:
            return self.routings[key]
        if len(self.routings) >= ROUTINGS_KEPT:
            self.routings.clear()
        self.routings[key] = seams = self._route(handles, device)
        return seams

    def _route(self, handles: list[Handle | None], device) -> BatchSeams | None:
        slots = {}
        for b in self.banks:
            if b == "prefix":
                continue
            s = [h.slot if h is not None and h.bank == b else 0 for h in handles]
            if any(s):
                slots[b] = torch.tensor(s, device=device)
        seams = BatchSeams(self.banks, slots) if slots else None
        return seams if seams else None

    def write_prefix(self, cache, kv_slot: int, h: Handle) -> None:
        kv = self.banks["prefix"].kv(h.slot)  # (L, 2, Hkv, P, hd)
        for layer in range(kv.shape[0]):
            cache.write_prefix(kv_slot, layer, kv[layer, 0], kv[layer, 1])


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x
