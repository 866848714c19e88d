"""Per-request sampling parameters and the batched sampler.

Each row carries its own parameters and its own torch.Generator, so a seeded request draws the
same tokens whatever else shares its batch. Order of operations follows transformers'
`generate`: repetition penalty, temperature, top-k, top-p, then draw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from engine.errors import InputError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    """Most tokens to generate (the context length may cut it shorter)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; 1 = off."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in prompt or output; 1 = off."""
    seed: int | None = None
    """Seed of this request's own generator; None draws one at random."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the text stops before them."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks)."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


def apply_repetition_penalty(logits, history, penalty: float):
    # logits (V,), history (N,) token ids already seen
    if penalty == 1.0 or history.numel() == 0:
        return logits
    scores = logits.gather(0, history)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, history, scores)


def warp(logits, p: SamplingParams):
    """Temperature, top-k and top-p on one row's logits (V,); removed tokens get -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (always keeps the first)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        logits = logits.scatter(0, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits, params: list[SamplingParams], histories: list, generators: list) -> torch.Tensor:
    """One token per row. logits (B, V) float; histories[b] (N,) long on logits' device."""
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        return logits.argmax(-1)
    out = []
    for b, p in enumerate(params):
        row = apply_repetition_penalty(logits[b].float(), histories[b], p.repetition_penalty)
        if p.greedy:
            out.append(row.argmax())
            continue
        probs = warp(row, p).softmax(-1)
        u = torch.rand((), generator=generators[b], device=probs.device)
        # inverse-CDF draw: one uniform per token keeps the stream reproducible
        cdf = probs.cumsum(-1)
        out.append(torch.searchsorted(cdf, (u * cdf[-1]).unsqueeze(0)).clamp_(max=probs.shape[-1] - 1)[0])
    return torch.stack(out)
