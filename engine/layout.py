"""Where one forward's tokens go in the KV cache and what each of them attends to.

A forward runs N tokens through the model as one flat batch (the projections, the MLP and
the adapters see (N, 1, d) or a (B, T, d) rectangle), and only attention needs to know
whose token is whose. A Layout says so, once per forward, for every layer:
  - every token's cache slot and position, where its key and value are written;
  - spans: consecutive tokens that attend together, as B rows of T queries over cache slots
    `slots` and keys 0..length-1. A step has one span holding every decode token (B rows of
    one query) and one span per prefill chunk (one row of T queries), so decode rows and the
    chunks of prompts being prefilled share the step's GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def causal_mask(q_pos: torch.Tensor, length: int | None, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, S) bool: a query at position p sees the key at position j iff j <= p (and
    j > p - window with a sliding window). q_pos (B, T). The keys are cache indices
    0..length-1 (S = length), or with length None the rows' own tokens (S = T)."""
    key_pos = torch.arange(length, device=q_pos.device)[None, None, :] if length else q_pos[:, None, :]
    q = q_pos[:, :, None]
    mask = key_pos <= q
    if window:
        mask &= key_pos > q - window
    return mask[:, None]


@dataclass
class Span:
    """Tokens [start, start + n) of the flat batch, attending as B rows of T queries."""

    start: int
    n: int
    """Tokens of the flat batch in this span: B * T, or fewer when some rows are idle."""
    B: int
    T: int
    slots: torch.Tensor
    """(B,) the cache slot each row reads."""
    first: int | None
    """slots[0] when slots are first, first + 1, ... (the cache is read as a view), else None."""
    length: int
    """Keys 0..length-1 of each slot are read."""
    mask: torch.Tensor
    """(B, 1, T, length) bool."""
    sel: torch.Tensor | None = None
    """(n,) the row of each token, for a span with idle rows (decode rows whose slots leave
    holes that rows of other spans fill): those rows' queries are zeros and their outputs
    dropped. None when the n tokens are the B * T queries in order."""


@dataclass
class Layout:
    rows: torch.Tensor
    """(N,) each token's cache slot."""
    pos: torch.Tensor
    """(N,) each token's cache position."""
    spans: list[Span]


def _contiguous_start(slots: list[int]) -> int | None:
    return slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None


def rectangle(rows: torch.Tensor, pos: torch.Tensor, window: int | None = None) -> Layout:
    """B rows of T tokens, row b in cache slot rows[b] at positions pos[b] (B, T): a right-
    padded prefill or a decode step. Pad positions run past a row's real tokens; their keys
    land beyond any real query of that row."""
    B, T = pos.shape
    length = int(pos.max()) + 1
    span = Span(0, B * T, B, T, rows, _contiguous_start(rows.tolist()), length, causal_mask(pos, length, window))
    return Layout(rows[:, None].expand(B, T).reshape(-1), pos.reshape(-1), [span])


def mixed(decode: list[tuple[int, int]], chunks: list[tuple[int, int, int]], device,
          window: int | None = None) -> Layout:
    """Decode tokens first, then prefill chunks, in the flat batch's order.

    decode: [(slot, position)] of one token each; chunks: [(slot, first position, length)].
    The decode tokens form one span; when their slots are not consecutive but lie within a
    range at most twice their number, that range is read as a view with the slots between
    them idle (a chunk's row, typically), which costs those rows' attention instead of a
    gather of every row's keys and values.
    """
    rows, pos, spans = [], [], []
    if decode:
        slots, ps = [s for s, _ in decode], [p for _, p in decode]
        lo, hi = min(slots), max(slots)
        length = max(ps) + 1
        if hi - lo + 1 < 2 * len(slots) and len(set(slots)) == len(slots):
            B = hi - lo + 1
            q_pos = [0] * B  # an idle row sees key 0 only: defined, and thrown away
            for s, p in decode:
                q_pos[s - lo] = p
            in_order = B == len(slots) and slots == sorted(slots)
            sel = None if in_order else torch.tensor([s - lo for s in slots], device=device)
            spans.append(Span(0, len(slots), B, 1, torch.arange(lo, hi + 1, device=device), lo, length,
                              causal_mask(torch.tensor(q_pos, device=device)[:, None], length, window), sel))
        else:
            t = torch.tensor(slots, device=device)
            spans.append(Span(0, len(slots), len(slots), 1, t, _contiguous_start(slots), length,
                              causal_mask(torch.tensor(ps, device=device)[:, None], length, window)))
        rows += slots
        pos += ps
    for slot, p0, n in chunks:
        q_pos = torch.arange(p0, p0 + n, device=device)[None]
        spans.append(Span(len(rows), n, 1, n, torch.tensor([slot], device=device), slot, p0 + n,
                          causal_mask(q_pos, p0 + n, window)))
        rows += [slot] * n
        pos += range(p0, p0 + n)
    return Layout(torch.tensor(rows, device=device), torch.tensor(pos, device=device), spans)
