"""The workload generator's statistics match its parameters (seeded), and synthetic adapters
are valid files for the model that /info describes."""

import math

import numpy as np
import pytest

from loadtest.synthetic import TYPES, adapter_files
from loadtest.workload import Workload, assign_types, spec, specs

N_DRAWS = 20000


def adapters_drawn(**kw) -> np.ndarray:
    w = Workload(requests=N_DRAWS, input_len=(1, 1), output_len=(1, 1), **kw)
    return np.array([s.adapter for s in specs(w)])


def assert_frequencies(drawn: np.ndarray, p: np.ndarray) -> None:
    """Every adapter's observed share within 4.5 standard errors of p."""
    freq = np.bincount(drawn, minlength=len(p)) / len(drawn)
    se = np.sqrt(p * (1 - p) / len(drawn))
    assert np.all(np.abs(freq - p) <= 4.5 * se + 1e-12), (freq, p)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_power_law_popularity(alpha):
    n = 12
    p = np.array([k ** -alpha for k in range(1, n + 1)])
    drawn = adapters_drawn(n_adapters=n, alpha=alpha, seed=3)
    assert_frequencies(drawn, p / p.sum())
    # and the exponent comes back from a log-log fit of the head of the distribution
    freq = np.bincount(drawn, minlength=n)[:6] / N_DRAWS
    slope = np.polyfit(np.log(np.arange(1, 7)), np.log(freq), 1)[0]
    assert abs(-slope - alpha) < 0.1


def test_punica_patterns():
    n = 9
    assert_frequencies(adapters_drawn(n_adapters=n, popularity="uniform"), np.full(n, 1 / n))
    p = np.array([k ** -1.5 for k in range(1, n + 1)])
    assert_frequencies(adapters_drawn(n_adapters=n, popularity="skewed"), p / p.sum())
    assert set(adapters_drawn(n_adapters=n, popularity="identical")) == {0}
    distinct = adapters_drawn(n_adapters=n, popularity="distinct")
    assert all(len(set(distinct[i:i + n])) == n for i in range(0, 200))


@pytest.mark.parametrize("rate,cv", [(5.0, 1.0), (20.0, 2.0), (2.0, 0.5)])
def test_arrivals_have_the_asked_rate_and_burstiness(rate, cv):
    w = Workload(rate=rate, cv=cv, requests=N_DRAWS, input_len=(1, 1), output_len=(1, 1), seed=1)
    gaps = np.array([s.gap for s in specs(w)])
    assert abs(gaps.mean() * rate - 1) < 0.05
    assert abs(gaps.std() / gaps.mean() - cv) < 0.06 * cv
    if cv == 1.0:  # Poisson: counts in unit windows have variance == mean
        counts = np.bincount(np.cumsum(gaps).astype(int))[:-1]
        assert abs(counts.var() / counts.mean() - 1) < 0.1


def test_duration_bounds_open_loop_arrivals():
    w = Workload(rate=50.0, duration=20.0, input_len=(1, 1), output_len=(1, 1))
    got = list(specs(w))
    assert abs(len(got) - 1000) < 4 * math.sqrt(1000)
    assert sum(s.gap for s in got) <= 20.0


def test_lengths_prompts_and_seeding():
    w = Workload(n_adapters=5, requests=4000, input_len=(10, 20), output_len=(3, 7), seed=5, vocab_size=1000)
    got = list(specs(w))
    ins, outs = np.array([len(s.prompt) for s in got]), np.array([s.output_len for s in got])
    assert ins.min() == 10 and ins.max() == 20 and abs(ins.mean() - 15) < 0.2
    assert outs.min() == 3 and outs.max() == 7 and abs(outs.mean() - 5) < 0.1
    ids = np.concatenate([s.prompt for s in got])
    assert ids.min() >= 100 and ids.max() < 1000
    assert got == list(specs(w))  # seeded
    other = list(specs(Workload(n_adapters=5, requests=4000, input_len=(10, 20), output_len=(3, 7), seed=6, vocab_size=1000)))
    assert [s.prompt for s in other] != [s.prompt for s in got]
    # the baseline and every sweep point see the same arrivals, prompts and lengths
    for n in (0, 1, 100):
        s, t = spec(Workload(n_adapters=n, requests=1, seed=5, rate=3.0), 17), spec(Workload(requests=1, seed=5, rate=3.0), 17)
        assert (s.prompt, s.output_len, s.gap) == (t.prompt, t.output_len, t.gap)


def test_assign_types_keeps_ratios_in_every_prefix():
    kinds = assign_types({"qaa": 2, "lora": 1}, 300)
    for n in range(1, 301):
        assert abs(kinds[:n].count("qaa") - 2 * n / 3) <= 1
    assert assign_types({"qaa": 1, "lora": 1, "sora": 1, "prefix": 1}, 4) == ["qaa", "lora", "sora", "prefix"]


@pytest.mark.parametrize("bad", [dict(popularity="zipf"), dict(rate=0), dict(cv=0), dict(input_len=(5, 2)),
                                 dict(requests=None), dict(requests=0), dict(concurrency=0), dict(n_adapters=-1)])
def test_bad_workloads_are_refused(bad):
    with pytest.raises(ValueError):
        Workload(**{"requests": 10, **bad})


@pytest.mark.parametrize("hf", [dict(), dict(num_attention_heads=8, num_key_value_heads=8, hidden_size=96),
                                dict(num_key_value_heads=1, hidden_size=100, head_dim=20, num_attention_heads=5)])
def test_synthetic_adapters_are_valid_for_the_model(hf):
    """What qaa-loadtest uploads passes the server's own validation for that model shape."""
    from adapters.files import load_bytes
    from engine.config import ModelConfig
    from tests.tiny import tiny_config

    cfg = ModelConfig.from_hf(tiny_config(**hf))
    described = {"hidden_size": cfg.dim, "head_dim": cfg.head_dim, "num_attention_heads": cfg.n_heads,
                 "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers}
    for kind in TYPES:
        files = adapter_files(kind, described, seed=1)
        ad = load_bytes(files["adapter_config.json"], files["adapter_model.safetensors"], cfg.shape())
        assert ad.kind == kind
        assert all(v.abs().sum() > 0 for v in ad.tensors.values())
        again = adapter_files(kind, described, seed=1)
        assert again == files and adapter_files(kind, described, seed=2) != files
