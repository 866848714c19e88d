"""The fused kernel's shot sampler (adapters/cpu_shots.c): exact binomials on every path,
multinomial counts, seeded streams that do not depend on the thread count.

Statistical checks run at fixed seeds, so they are deterministic; each threshold is one a
correct sampler passes with probability >= 0.999 (chi-square p-value > 1e-3, or 5 standard
errors), and a negative control shows the chi-square check rejects a sampler that is off.
<Z>-level checks (binomial variance, PennyLane's shots) are in test_emulation.py.
"""

import math

import pytest
import torch

from adapters import cpu_kernels
from adapters.circuit import compile_circuit

stats = pytest.importorskip("scipy.stats")

# (n, p): each of the sampler's paths, p > 1/2 (drawn as n - Bin(n, 1 - p)) and the extremes
BINOMIALS = [
    (10, 0.3),  # Bernoulli trials, one vector step
    (256, 0.9),  # Bernoulli trials, flipped, 16 steps
    (1000, 0.005),  # inversion
    (1000, 0.0099),  # inversion at its largest mean
    (5000, 0.0015),  # inversion, large n
    (1000, 0.01),  # BTRS at its smallest mean
    (257, 0.4),  # BTRS just above the Bernoulli trials
    (300, 0.7),  # BTRS, flipped
    (10_000, 0.5),  # BTRS
    (1_000_000, 0.01),  # BTRS, the largest shot count a config allows
]


def binomial_gof(draws: torch.Tensor, n: int, p: float) -> float:
    """Chi-square goodness-of-fit p-value of draws against Bin(n, p), cells merged until each
    expects >= 20 (so the chi-square approximation holds)."""
    M = draws.numel()
    sd = math.sqrt(n * p * (1 - p))
    lo, hi = max(0, int(n * p - 9 * sd) - 2), min(n, int(n * p + 9 * sd) + 2)
    ks = torch.arange(lo, hi + 1)
    expect = torch.as_tensor(stats.binom.pmf(ks.numpy(), n, p)) * M
    expect[0] += stats.binom.cdf(lo - 1, n, p) * M  # the tails into the end cells
    expect[-1] += stats.binom.sf(hi, n, p) * M
    seen = torch.bincount(draws.clamp(lo, hi) - lo, minlength=len(ks)).double()
    cells_e, cells_o, e, o = [], [], 0.0, 0.0
    for ei, oi in zip(expect.tolist(), seen.tolist()):
        e, o = e + ei, o + oi
        if e >= 20:
            cells_e.append(e), cells_o.append(o)
            e, o = 0.0, 0.0
    cells_e[-1] += e
    cells_o[-1] += o
    E, O = torch.tensor(cells_e), torch.tensor(cells_o)
    return float(stats.chi2.sf(((O - E) ** 2 / E).sum().item(), len(E) - 1))


@pytest.mark.parametrize("n,p", BINOMIALS)
def test_binomial_draws_follow_the_pmf(lib, n, p):
    draws = cpu_kernels.binomial_draws(n, p, 200_000, seed=7)
    assert draws.min() >= 0 and draws.max() <= n
    assert binomial_gof(draws, n, p) > 1e-3


def test_binomial_check_rejects_a_shifted_sampler(lib):
    """Negative control: draws of Bin(n, p) with p 1-3% off fail the check, on each path."""
    for n, p, off in [(10_000, 0.5, 1.01), (257, 0.4, 1.02), (1000, 0.005, 1.03), (40, 0.3, 1.03)]:
        draws = cpu_kernels.binomial_draws(n, p * off, 200_000, seed=7)
        assert binomial_gof(draws, n, p) < 1e-6


def _probs(K: int = 16) -> torch.Tensor:
    """fp64 probabilities that fp32 holds exactly: uneven, none so small that the standard
    errors below (estimated from the draws) rest on a handful of occurrences, and one 0."""
    p = torch.rand(K, generator=torch.Generator().manual_seed(K)) ** 2 + 0.05
    p[3] = 0.0  # an outcome that can never be drawn
    p = (p / p.sum()).float().double()
    return p / p.sum()


@pytest.mark.parametrize("shots", [1, 7, 100, 2049, 10_000])
def test_counts_are_multinomial(lib, shots):
    """20,000 draws of counts (K = 16): totals N, means N p_k, covariance N (diag(p) - p p^T)."""
    p = _probs()
    R = 20_000
    counts = cpu_kernels.multinomial(p.float().expand(R, -1), shots, seed=11).double()  # (R, K)
    assert (counts.sum(1) == shots).all() and (counts >= 0).all() and (counts[:, 3] == 0).all()
    assert torch.equal(counts, counts.round())
    mean_se = torch.sqrt(shots * p * (1 - p) / R)
    assert ((counts.mean(0) - shots * p).abs() <= 5 * mean_se + 1e-12).all()
    dev = counts - counts.mean(0)
    prods = dev[:, :, None] * dev[:, None, :]  # (R, K, K): the covariance is their mean
    cov, cov_se = prods.mean(0) * R / (R - 1), prods.std(0) / math.sqrt(R)  # se without assuming normal counts
    want = shots * (torch.diag(p) - torch.outer(p, p))
    assert ((cov - want).abs() <= 5 * cov_se + 1e-9).all(), (cov - want).abs().max()


@pytest.mark.parametrize("shots", [5, 3000])
def test_pooled_outcomes_fit_the_distribution(lib, shots):
    """Chi-square of all outcomes drawn (R N of them) against p: the counts' means as a whole."""
    p = _probs(64)
    counts = cpu_kernels.multinomial(p.float().expand(4000, -1), shots, seed=2).double().sum(0)
    keep = p > 0
    assert counts[~keep].sum() == 0
    assert stats.chisquare(counts[keep].numpy(), (p[keep] * counts.sum()).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("shots", [10, 4096])
def test_streams_are_seeded_and_independent_of_threads(lib, shots):
    """The same (seed, counter) gives the same counts and estimates with 1, 2 or 3 threads; a
    new counter or seed gives other draws; qaa_rx_ and rx_shot_z read the same streams."""
    p = torch.softmax(torch.randn(9, 1024, generator=torch.Generator().manual_seed(0)), -1)
    runs = [cpu_kernels.multinomial(p, shots, seed=5, counter=2, threads=t) for t in (1, 2, 3)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], cpu_kernels.multinomial(p, shots, seed=5, counter=3))
    assert not torch.equal(runs[0], cpu_kernels.multinomial(p, shots, seed=6, counter=2))
    assert not torch.equal(runs[0][0], runs[0][1])  # rows draw from streams of their own

    g = torch.Generator().manual_seed(1)
    d, n, L, S = 100, 7, 2, 3
    phase = torch.stack([compile_circuit(torch.rand(L, n, generator=g) * 6.3, "RX") for _ in range(S)])
    upb = torch.randn(S, n + 1, d, generator=g)
    h = torch.randn(4, 3, d, generator=g)
    rows, slots = torch.arange(4), torch.tensor([2, 2, 2, 2])
    outs = [cpu_kernels.qaa_rx_(h.clone(), rows, slots, phase, upb, n, L, shots, seed=9, counter=4, threads=t)
            for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    z = cpu_kernels.rx_shot_z(h, phase[2], n, L, shots, seed=9, counter=4)  # (4, 3, n), vector v = 3 b + t
    assert torch.equal(z * shots, (z * shots).round())
    torch.testing.assert_close(outs[0], h + z @ upb[2, :n] + upb[2, n], rtol=1e-5, atol=1e-5)
    again = cpu_kernels.qaa_rx_(h.clone(), rows, slots, phase, upb, n, L, shots, seed=9, counter=5)
    assert not torch.equal(again, outs[0])
