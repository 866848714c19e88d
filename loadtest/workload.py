"""The workload: which adapter each request uses, when it arrives, how long it is.

Every request is a pure function of (workload, index): request i draws from its own
generator seeded with (seed, i), so a run is reproducible, a longer run extends a shorter
one, and the baseline and every point of an adapter sweep see the same arrivals, prompts
and lengths — only the adapters differ.

Popularity (over N adapters, rank k = 1..N is adapter index k-1):
  powerlaw   P(k) ∝ k^-alpha (S-LoRA's power-law adapter popularity)
  distinct   request i uses adapter i mod N: any N consecutive requests use N different ones
  uniform    every adapter equally likely
  skewed     P(k) ∝ k^-1.5 (Punica's Zipf-1.5 "skewed" pattern)
  identical  every request uses adapter 0
Arrivals: open loop with gamma inter-arrival times of mean 1/rate and coefficient of
variation cv (cv = 1 is a Poisson process), or closed loop (no arrival times: each of
`concurrency` clients sends its next request when the previous one ends).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PATTERNS = ("powerlaw", "distinct", "uniform", "skewed", "identical")
SKEWED_ALPHA = 1.5


@dataclass(frozen=True)
class Workload:
    n_adapters: int = 0
    """Adapters the requests spread over; 0 = every request goes to the base model."""
    popularity: str = "powerlaw"
    """One of PATTERNS."""
    alpha: float = 1.0
    """Exponent of the power law (popularity=powerlaw)."""
    rate: float | None = None
    """Open loop: mean arrivals per second. None = closed loop."""
    cv: float = 1.0
    """Coefficient of variation of inter-arrival times (gamma); 1 = Poisson."""
    concurrency: int = 8
    """Closed loop: clients each with one request in flight."""
    input_len: tuple[int, int] = (32, 128)
    """Prompt length in tokens, uniform in [A, B]."""
    output_len: tuple[int, int] = (32, 128)
    """Generated tokens, uniform in [A, B] (EOS ignored so the length is exact)."""
    requests: int | None = None
    """Stop after this many requests."""
    duration: float | None = None
    """Stop sending after this many seconds (open loop: arrivals after it are not sent)."""
    seed: int = 0
    """Seeds everything above."""
    vocab_size: int = 32000
    """Prompt token ids are drawn from [vocab_size // 10, vocab_size): clear of the special
    tokens that tokenizers put first."""

    def __post_init__(self):
        if self.popularity not in PATTERNS:
            raise ValueError(f"popularity {self.popularity!r} is not one of {', '.join(PATTERNS)}")
        if self.n_adapters < 0:
            raise ValueError(f"the number of adapters must be >= 0, got {self.n_adapters}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if not self.cv > 0:
            raise ValueError(f"cv must be > 0, got {self.cv}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        for name, (a, b) in (("input-len", self.input_len), ("output-len", self.output_len)):
            if not 1 <= a <= b:
                raise ValueError(f"{name} must be A:B with 1 <= A <= B, got {a}:{b}")
        if self.requests is None and self.duration is None:
            raise ValueError("give a number of requests or a duration")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


@dataclass(frozen=True)
class Spec:
    index: int
    adapter: int | None
    """Index into the adapter list; None = the base model."""
    prompt: list[int]
    output_len: int
    gap: float
    """Open loop: seconds after the previous arrival; 0 for closed loop."""


def popularity_weights(pattern: str, n: int, alpha: float = 1.0) -> np.ndarray:
    """P(adapter k), k = 0..n-1, for the random patterns (distinct is deterministic)."""
    ranks = np.arange(1, n + 1, dtype=np.float64)
    if pattern == "uniform":
        w = np.ones(n)
    elif pattern == "identical":
        w = (ranks == 1).astype(np.float64)
    elif pattern in ("powerlaw", "skewed"):
        w = ranks ** -(SKEWED_ALPHA if pattern == "skewed" else alpha)
    else:
        raise ValueError(f"pattern {pattern!r} has no weights")
    return w / w.sum()


def spec(w: Workload, i: int, weights: np.ndarray | None = None) -> Spec:
    """Request i of the workload (pass `weights` = popularity_weights(...) to save recomputing)."""
    rng = np.random.default_rng([w.seed, i])
    gap = 0.0
    if w.open_loop:
        k = 1.0 / (w.cv * w.cv)  # gamma shape: mean k·θ = 1/rate, cv = 1/sqrt(k)
        gap = float(rng.gamma(k, 1.0 / (w.rate * k)))
    n_in = int(rng.integers(w.input_len[0], w.input_len[1] + 1))
    n_out = int(rng.integers(w.output_len[0], w.output_len[1] + 1))
    prompt = rng.integers(w.vocab_size // 10, w.vocab_size, size=n_in).tolist()
    adapter = None
    if w.n_adapters:
        if w.popularity == "distinct":
            adapter = i % w.n_adapters
        else:
            if weights is None:
                weights = popularity_weights(w.popularity, w.n_adapters, w.alpha)
            adapter = int(rng.choice(w.n_adapters, p=weights))
    return Spec(i, adapter, prompt, n_out, gap)


def specs(w: Workload, limit: int = 1_000_000):
    """The requests in order, until `requests` (or `limit`); open-loop arrivals past
    `duration` end it too. Closed loop with only a duration is cut by the runner's clock."""
    weights = None
    if w.n_adapters and w.popularity != "distinct":
        weights = popularity_weights(w.popularity, w.n_adapters, w.alpha)
    t, i = 0.0, 0
    while i < min(w.requests or limit, limit):
        s = spec(w, i, weights)
        t += s.gap
        if w.open_loop and w.duration is not None and t > w.duration:
            return
        yield s
        i += 1


def assign_types(types: dict[str, float], n: int) -> list[str]:
    """Adapter types for n adapters in the given ratios, interleaved (a weighted round robin,
    so any prefix of the list keeps the ratios as closely as integers allow)."""
    if not types or any(v <= 0 for v in types.values()):
        raise ValueError("adapter types need positive weights")
    total = sum(types.values())
    counts = dict.fromkeys(types, 0)
    out = []
    for j in range(n):
        # the type furthest below its share of the first j+1 adapters
        kind = max(types, key=lambda t: (types[t] / total) * (j + 1) - counts[t])
        counts[kind] += 1
        out.append(kind)
    return out
