"""A static-shape decode step: torch.compile compiles it for every bucket, CUDA graphs replay it.

An eager decode step's shapes follow the batch size B and the longest row, and its adapter
seams route rows on the host. Here all of that is fixed per bucket:
- B is padded up to a batch bucket (1, 2, 4, ..., max_batch). Padding rows feed token 0 at
  position 0, write into the cache's scratch slot, use no adapter; their logits are dropped.
- The attention reads the first S positions of each slot, S the smallest length bucket
  (GraphConfig.min_length, doubling, up to max_seq) above every row's position; the mask
  hides the rest. (Reading all of max_seq instead costs 2.6x at batch 16 on the CPU.)
- Adapters go through adapters.seams.StaticSeams: each row's slot index per bank, every module
  the banks hold (slot 0 is all zeros: exactly no adapter).
The step's inputs (tokens, positions, KV slots, adapter slots) live in a device buffer per
batch bucket, updated in place by one host->device copy per step, so the captured region has
no host syncs: torch.compile traces it whole (fullgraph), and on CUDA each (batch, length,
bank layout) is captured once as a CUDA graph and replayed.

Rows must sit in KV slots 0..B-1 in order (the engine and the scheduler compact the cache
before decoding), because the attention reads slot b for row b as a view. Only steps that
only decode are captured; a decode step the captured form cannot serve (rows elsewhere, an
emulated QAA adapter in the batch) runs the eager step instead and is counted in `fallbacks`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from adapters.seams import StaticSeams
from engine import steps
from engine.layout import Layout, Span, causal_mask

STATIC_BANKS = ("lora", "qaa")
"""Banks with capture-safe methods; prefix rows need none (their keys are in the KV cache)."""


@dataclass
class GraphConfig:
    """How the decode step is captured."""

    backend: str | None = "inductor"
    """torch.compile backend ("inductor"; "aot_eager" or "eager" trace without generating
    code); None: no torch.compile (on CUDA, graphs of the eager step)."""
    cuda_graphs: bool = True
    """On a CUDA device, capture each bucket as a CUDA graph and replay it (no effect on the CPU)."""
    dynamic: bool | None = None
    """None: torch.compile's automatic dynamic shapes, a size that differs between buckets
    becomes symbolic, so far fewer graphs than buckets are compiled (the default model on the
    CPU: 25 buckets in 150 s, against 10 in 190 s with static shapes, and as fast). False: one
    graph per bucket, all shapes static. CUDA graphs are one per bucket either way."""
    min_length: int = 128
    """Smallest length bucket: the attention reads at least this many cache positions."""
    warm_up: bool = True
    """Compile (and capture) every bucket when built, so no request waits for a compile."""


def buckets(smallest: int, largest: int) -> list[int]:
    """smallest, 2 * smallest, ... while below largest, then largest."""
    out, n = [], max(1, min(smallest, largest))
    while n < largest:
        out.append(n)
        n *= 2
    return out + [largest]


def bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


class GraphDecoder:
    """`step(model, cache, work, seams_for)`, like engine.steps.step, through the static step
    when the step only decodes.

    model, cache: the engine's (the cache built with scratch=True); slots: its AdapterSlots.
    """

    def __init__(self, model, cache, slots, cfg: GraphConfig | None = None):
        if cache.k[0].shape[0] <= cache.n_slots:
            raise ValueError("GraphDecoder needs a KV cache with a scratch slot (KVCache(..., scratch=True))")
        self.model, self.cache, self.slots, self.cfg = model, cache, slots, cfg or GraphConfig()
        self.device = cache.k[0].device
        self.batches = buckets(1, cache.n_slots)
        self.lengths = buckets(self.cfg.min_length, cache.max_seq)
        # per bucket, per row: token, position, KV slot, then its adapter slot in each static
        # bank (one tensor per bucket, not views of one: a view's base would be in the guards)
        self.inputs = {B: torch.zeros(B, 3 + len(STATIC_BANKS), dtype=torch.long, device=self.device)
                       for B in self.batches}
        self.graphs = self.device.type == "cuda" and self.cfg.cuda_graphs
        self.captured: dict = {}  # (batch, length, bank layout) -> (CUDAGraph, its logits (B, V))
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.banks: dict = {}  # the static banks of the step being run (see _run)
        self.fallbacks = 0
        """Steps the eager step ran instead (see `serves`)."""
        self.steps: Counter = Counter()
        """Captured steps run per (batch bucket, length bucket)."""
        self.fn = self._forward
        if self.cfg.backend is not None:
            # one compiled graph per (batch, length) bucket, and again when a bank's layout grows
            limit = 8 * len(self.batches) * len(self.lengths)
            for name in ("recompile_limit", "accumulated_recompile_limit"):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
            self.fn = torch.compile(self._forward, backend=self.cfg.backend, fullgraph=True,
                                    dynamic=self.cfg.dynamic)
        if self.cfg.warm_up:
            self.warm_up()

    def describe(self) -> str:
        """One line for logs: how the step is captured and its buckets."""
        how = [self.cfg.backend or "no torch.compile"] + (["automatic dynamic"] if self.cfg.dynamic is None else [])
        how += ["CUDA graphs"] if self.graphs else []
        return f"{', '.join(how)}; batch buckets {self.batches}, length buckets {self.lengths}"

    def _banks(self) -> dict:
        return {k: self.slots.banks[k] for k in STATIC_BANKS if k in self.slots.banks}

    def layout(self) -> tuple:
        """What the captured shapes depend on besides the buckets: the static banks' layouts."""
        return tuple((k, b.layout) for k, b in self._banks().items())

    def _forward(self, inputs, length: int):
        # inputs (B, 3 + banks) -> logits (B, V); traced by torch.compile, captured on CUDA
        tokens, pos, rows, *slots = inputs.unbind(1)
        B = inputs.shape[0]
        # one span of B rows reading slots 0..B-1 as a view (padding rows read slots that are not
        # theirs, and write only the scratch slot: rows[b] is the slot written)
        span = Span(0, B, B, 1, rows, 0, length, causal_mask(pos[:, None], length, self.model.cfg.sliding_window))
        seams = StaticSeams(self.banks, dict(zip(STATIC_BANKS, slots)))
        h = self.model.hidden(tokens[:, None], pos[:, None], self.cache, seams=seams, layout=Layout(rows, pos, [span]))
        return self.model.lm_head(h[:, 0])

    def warm_up(self) -> None:
        """Run every (batch, length) bucket once with padding rows only (they write only the
        scratch slot), so that compiling and capturing happen now, not in a request's step."""
        with torch.inference_mode():
            for B in reversed(self.batches):  # largest first: CUDA graphs share the pool best
                self._fill([], B)
                for S in self.lengths:
                    self._run(B, S)

    def serves(self, seqs) -> bool:
        """Whether the captured step can run this batch (else the eager step does)."""
        if len(seqs) > self.batches[-1] or any(s.slot != b for b, s in enumerate(seqs)):
            return False
        qaa = self.slots.banks.get("qaa")
        return qaa is None or not qaa.emulated or not any(
            s.adapter is not None and s.adapter.bank == "qaa" and s.adapter.slot in qaa.emulated for s in seqs)

    @torch.inference_mode()
    def step(self, model, cache, work, seams_for) -> list[str | None]:
        """engine.steps.step's contract. A step that only decodes (every item (seq, 1), no
        prompt left to feed) and that `serves` accepts runs captured; any other eagerly."""
        seqs = [s for s, _ in work]
        if model is not self.model or cache is not self.cache or any(n != 1 or s.prefilling for s, n in work):
            return steps.step(model, cache, work, seams_for)
        if not self.serves(seqs):
            self.fallbacks += 1
            return steps.step(model, cache, work, seams_for)
        return steps._sample_into(seqs, self.logits(seqs))

    @torch.inference_mode()
    def logits(self, seqs) -> torch.Tensor:
        """(B, V) next-token logits of `seqs` (which `serves` accepts), their KV written."""
        B = bucket(len(seqs), self.batches)
        S = bucket(max(s.pos for s in seqs) + 1, self.lengths)
        self.steps[(B, S)] += 1
        self._fill(seqs, B)
        out = self._run(B, S)[: len(seqs)]
        # a replayed graph's output is overwritten by the next replay, and sampling may edit it
        return out.clone() if self.graphs else out

    def _fill(self, seqs, B: int) -> int:
        """Write the step's inputs for `seqs` padded to B rows into the device buffer."""
        pad = B - len(seqs)
        cols = [[s.out_ids[-1] for s in seqs] + [0] * pad, [s.pos for s in seqs] + [0] * pad,
                [s.slot for s in seqs] + [self.cache.n_slots] * pad]
        for kind in STATIC_BANKS:
            cols.append([s.adapter.slot if s.adapter is not None and s.adapter.bank == kind else 0 for s in seqs]
                        + [0] * pad)
        self.inputs[B].copy_(torch.tensor(cols).t(), non_blocking=True)
        return B

    def _run(self, B: int, S: int) -> torch.Tensor:
        inputs = self.inputs[B]
        # read by _forward: only these banks are in its guards (a prefix bank appearing is not)
        self.banks = self._banks()
        if not self.graphs:
            return self.fn(inputs, S)
        key = (B, S, self.layout())
        if key not in self.captured:
            # graphs of an older bank layout are never replayed again: free their memory
            self.captured = {k: v for k, v in self.captured.items() if k[2] == key[2]}
            self.captured[key] = self._capture(inputs, S)
        graph, out = self.captured[key]
        graph.replay()
        return out

    def _capture(self, inputs, S: int):
        # run on a side stream first (compiles, and lets kernels pick their workspaces), then
        # capture; replaying recomputes from the same buffers, so running it here is harmless
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(inputs, S)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(inputs, S)
        return graph, out
