"""Slot KV cache: one fixed-length slot per running sequence, rows at independent positions."""

from __future__ import annotations

import heapq

import torch

from engine.config import ModelConfig


class KVCache:
    """Keys and values for `n_slots` sequences of up to `max_seq` positions each.

    k[layer], v[layer]: (n_slots, n_kv_heads, max_seq, head_dim). A sequence owns one slot from
    admission to finish; its token at position p lives at index p of its slot, so a decode step
    mixes rows at any positions. Slots are handed out by `alloc` (lowest free first) and
    returned by `free`; `compact` moves sequences down into holes so the slots in use are
    0..n-1 and a step over them reads the cache as a view instead of gathering it.
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_seq: int, device="cpu", dtype=torch.float32):
        shape = (n_slots, cfg.n_kv_heads, max_seq, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.n_slots, self.max_seq = n_slots, max_seq
        self._free = list(range(n_slots))  # a min-heap

    def alloc(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def compact(self, used: list[tuple[int, int]]) -> dict[int, int]:
        """Make the slots of `used` [(slot, positions written)] exactly 0..n-1: each slot at n or
        above moves into a hole below n (its first `positions` keys/values are copied).
        Returns {old slot: new slot}. A sequence finishing costs one such copy; without it,
        every decode step would gather every row's keys and values (`read`)."""
        n = len(used)
        holes = sorted(set(range(n)) - {s for s, _ in used})
        moves = {}
        for (src, length), dst in zip(sorted((u for u in used if u[0] >= n), reverse=True), holes):
            for cache in (self.k, self.v):
                for layer in cache:
                    layer[dst, :, :length] = layer[src, :, :length]
            moves[src] = dst
        if moves:
            self._free = sorted((set(self._free) - set(moves.values())) | set(moves))
        return moves

    @property
    def n_free(self) -> int:
        return len(self._free)

    def write(self, layer: int, rows, pos, k, v):
        # rows, pos (N,), k/v (N, Hkv, hd) -> token i at slot rows[i], index pos[i]
        self.k[layer][rows, :, pos] = k
        self.v[layer][rows, :, pos] = v

    def read(self, layer: int, slots, first: int | None, length: int):
        """k, v (B, Hkv, length, hd) of slots (B,): a view when they are first, first + 1, ...,
        else a gather; sliced before gathering, so only `length` positions copy."""
        if first is not None:
            B = len(slots)
            return self.k[layer][first : first + B, :, :length], self.v[layer][first : first + B, :, :length]
        return (
            self.k[layer][:, :, :length].index_select(0, slots),
            self.v[layer][:, :, :length].index_select(0, slots),
        )

    def write_prefix(self, slot: int, layer: int, k, v):
        """Place (Hkv, P, hd) keys/values at positions 0..P-1 of a slot (prefix tuning)."""
        P = k.shape[1]
        self.k[layer][slot, :, :P] = k
        self.v[layer][slot, :, :P] = v

    def usage(self) -> float:
        """Share of slots in use."""
        return 1.0 - len(self._free) / self.n_slots
