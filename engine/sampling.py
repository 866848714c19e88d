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
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token generated so far (OpenAI)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once for every time it was generated so far (OpenAI)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids before sampling (OpenAI; -100 bans a token)."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens cannot be drawn before this many tokens (vLLM)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation as EOS does, even with ignore_eos (vLLM); not in the text."""
    grammar: object = None
    """A compiled grammar (engine.constraints.Grammar) the output must follow; None = free."""
    logprobs: int | None = None
    """Record each drawn token's log-probability under the model (the log-softmax of its raw
    logits, before any penalty or temperature) and the `logprobs` most likely; None = off."""
    prompt_logprobs: bool = False
    """Record each prompt token's log-probability given the tokens before it (and, with
    `logprobs`, that many most likely tokens at its place); the first token has none."""

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
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens, "min_tokens must be an integer >= 0"),
            (all(isinstance(t, int) and t >= 0 for t in [*self.stop_token_ids, *self.logit_bias]),
             "token ids must be integers >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts(self) -> bool:
        """Whether anything changes the logits before temperature (penalties, bias, min_tokens)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.min_tokens)

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


def adjust(logits, p: SamplingParams, history, out_ids: list[int], end_ids) -> torch.Tensor:
    """Everything before temperature, on one row's logits (V,), in vLLM's order: end tokens
    masked until min_tokens, repetition penalty (prompt and output), presence and frequency
    penalties (output only, as OpenAI defines them), then logit_bias."""
    if p.min_tokens and len(out_ids) < p.min_tokens and end_ids:
        logits = logits.index_fill(0, torch.tensor(sorted(end_ids), device=logits.device), float("-inf"))
    if history is not None:
        logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and out_ids:
        counts = torch.bincount(torch.tensor(out_ids, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype,
                                                       device=logits.device))
    return logits


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


def sample(logits, params: list[SamplingParams], histories: list, generators: list, outputs: list | None = None,
           end_ids: list | None = None) -> torch.Tensor:
    """One token per row. logits (B, V) float; histories[b] (N,) long on logits' device (for
    repetition penalty), outputs[b] the ids generated so far, end_ids[b] the ids that would
    end row b (held back until min_tokens)."""
    if all(p.greedy and not p.adjusts for p in params):
        return logits.argmax(-1)
    out = []
    for b, p in enumerate(params):
        row = logits[b].float()
        if p.adjusts:
            row = adjust(row, p, histories[b], outputs[b] if outputs else [], end_ids[b] if end_ids else ())
        if p.greedy:
            out.append(row.argmax())
            continue
        probs = warp(row, p).softmax(-1)
        u = torch.rand((), generator=generators[b], device=probs.device)
        # inverse-CDF draw: one uniform per token keeps the stream reproducible
        cdf = probs.cumsum(-1)
        out.append(torch.searchsorted(cdf, (u * cdf[-1]).unsqueeze(0)).clamp_(max=probs.shape[-1] - 1)[0])
    return torch.stack(out)
