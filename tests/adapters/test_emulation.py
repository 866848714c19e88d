"""Finite-shot and depolarizing-noise emulation of QAA's circuit, checked against PennyLane's
default.qubit (with shots) and default.mixed (with qml.DepolarizingChannel)."""

import dataclasses
import math

import pytest
import torch

from adapters import cpu_kernels
from adapters.base import AdapterError
from adapters.circuit import compile_circuit, probabilities
from adapters.emulation import MAX_SHOTS, noisy_observables, noisy_z, sample_counts, shot_z
from adapters.export import export_qnode, qnode
from adapters.qaa import QAABank, QAAConfig, QAAType, key
from engine.config import ModelConfig
from tests.adapters.cases import Case, make

qml = pytest.importorskip("pennylane")


def _circuit(d, L, rotation, seed):
    g = torch.Generator().manual_seed(seed)
    n = math.ceil(math.log2(d))
    return torch.randn(d, generator=g, dtype=torch.float64), torch.rand(L, n, generator=g, dtype=torch.float64) * 6.2


def _final_index(read: torch.Tensor) -> torch.Tensor:
    """The measured basis state of each row of a readout matrix (wire 0 = most significant)."""
    n = read.shape[1]
    return ((read < 0).long() * (1 << torch.arange(n - 1, -1, -1))).sum(1)


@pytest.mark.parametrize("rotation,d,L", [("RX", 64, 2), ("RY", 64, 3), ("RX", 12, 4), ("RY", 100, 1)])
def test_output_distribution_matches_default_qubit(rotation, d, L):
    """The distribution shots are drawn from is PennyLane's qml.probs of the same circuit."""
    h, theta = _circuit(d, L, rotation, seed=d + L)
    n = theta.shape[1]
    probs, read = probabilities(h.float(), compile_circuit(theta.float(), rotation), rotation, n, L)
    ours = torch.zeros(2**n, dtype=torch.float64).index_add_(0, _final_index(read), probs.double())

    @qml.qnode(qml.device("default.qubit", wires=n))
    def ref():
        qml.AmplitudeEmbedding(h.numpy(), wires=range(n), pad_with=0.0, normalize=True)
        from adapters.export import layer_ops

        layer_ops(qml, theta.numpy(), n, rotation)
        return qml.probs(wires=range(n))

    assert (ours - torch.as_tensor(ref())).abs().max().item() <= 1e-6


def _torch_shots(h, compiled, rotation, n, L, shots, seed):
    return shot_z(h, compiled, rotation, n, L, shots, torch.Generator().manual_seed(seed))


def _kernel_shots(h, compiled, rotation, n, L, shots, seed):
    assert rotation == "RX" and cpu_kernels.library() is not None, "the fused kernel runs RX circuits on the CPU"
    return cpu_kernels.rx_shot_z(h, compiled, n, L, shots, seed=seed)


SAMPLERS = {"torch": _torch_shots, "kernel": _kernel_shots}
"""The two implementations of shot emulation: the torch reference (categorical draws up to
2048 shots, a binomial tree above) and the fused CPU kernel's (cpu_shots.c: a binomial tree,
Bernoulli trials / inversion / BTRS per split)."""


@pytest.mark.parametrize("sampler,shots", [("torch", 100), ("torch", 5000), ("kernel", 10), ("kernel", 100),
                                           ("kernel", 2049), ("kernel", 10_000)])
def test_shot_estimates_are_unbiased_with_binomial_variance(sampler, shots):
    """10,000 estimates of <Z_q> from `shots` shots each: mean <Z_q>, variance (1 - <Z_q>^2)/N."""
    h, theta = _circuit(64, 2, "RX", seed=3)
    compiled = compile_circuit(theta.float(), "RX")
    exact = torch.as_tensor(qnode(6, 2, "RX")(h, theta)).double()  # PennyLane, exact
    draws = 10_000
    est = SAMPLERS[sampler](h.float().expand(draws, -1), compiled, "RX", 6, 2, shots, 0).double()
    var = (1 - exact**2) / shots
    assert ((est.mean(0) - exact).abs() <= 5 * torch.sqrt(var / draws) + 1e-9).all()
    # the sample variance of `draws` estimates has a relative sd of sqrt((kurtosis - 1) / draws):
    # 1.4% for normal estimates, more for few shots on a wire near +-1 (binomial kurtosis)
    pq = (1 - exact**2) / 4
    kurtosis = 3 + (1 - 6 * pq) / (shots * pq)
    assert ((est.var(0) / var - 1).abs() <= 5 * torch.sqrt((kurtosis - 1) / draws)).all(), (est.var(0), var)
    # estimates take only the values a count of N shots allows
    assert torch.allclose(est * shots, torch.round(est * shots), atol=1e-3)


@pytest.mark.parametrize("sampler,rotation", [("torch", "RY"), ("kernel", "RX")])
def test_shot_estimates_match_pennylane_shots(sampler, rotation):
    """Same distribution of estimates as default.qubit with finite shots (PennyLane samples
    every broadcast row independently): means and variances agree, per wire."""
    h, theta = _circuit(64, 2, rotation, seed=5)
    shots, draws = 50, 2000
    f = qnode(6, 2, rotation, shots=shots)
    theirs = torch.stack([torch.as_tensor(v) for v in f(h.expand(draws, -1), theta)], 1).double()  # (draws, n)
    ours = SAMPLERS[sampler](h.float().expand(draws, -1), compile_circuit(theta.float(), rotation), rotation, 6, 2,
                             shots, 1).double()
    se = torch.sqrt(ours.var(0) / draws + theirs.var(0) / draws)
    assert ((ours.mean(0) - theirs.mean(0)).abs() <= 5 * se).all()
    assert ((ours.var(0) / theirs.var(0) - 1).abs() <= 0.2).all()


def test_counts_are_seeded_and_sum_to_shots():
    p = torch.softmax(torch.randn(3, 64), -1)
    for shots in (7, 4096):
        a = sample_counts(p, shots, torch.Generator().manual_seed(4))
        b = sample_counts(p, shots, torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and (a.sum(-1) == shots).all() and (a >= 0).all()


def _mixed(h, theta, rotation, p):
    n = theta.shape[1]
    f = qnode(n, theta.shape[0], rotation, device="default.mixed", noise=f"depolarizing:{p}")
    return torch.as_tensor(f(h, theta)).double()


@pytest.mark.parametrize("rotation,d,L,p", [("RX", 64, 2, 0.01), ("RX", 12, 3, 0.2), ("RY", 64, 2, 0.05), ("RY", 20, 1, 0.75)])
def test_noise_matches_default_mixed(rotation, d, L, p):
    h, theta = _circuit(d, L, rotation, seed=int(100 * p) + d)
    ours = noisy_z(h, noisy_observables(theta, rotation, p, d))
    assert (ours - _mixed(h, theta, rotation, p)).abs().max().item() <= 1e-6
    if p > 0:  # noise is visible: the exact circuit differs
        assert (ours - torch.as_tensor(qnode(theta.shape[1], L, rotation)(h, theta))).abs().max() > 1e-4


@pytest.fixture(scope="module")
def shape(tiny_dir):
    return ModelConfig.from_dir(tiny_dir).shape()


def _adapter(shape, rotation="RX", **emulation):
    ad = make(Case("q", "qaa", lambda: QAAConfig(circuit_layers=2, rotation=rotation, layers_to_transform=[1])), shape, seed=6)
    return dataclasses.replace(ad, config=dataclasses.replace(ad.config, **emulation))


def test_bank_runs_each_slot_as_configured(shape):
    """One batch through the slot bank: an exact slot, a noisy slot and a shots slot, each row
    as its own adapter would give it (noise: default.mixed within 1e-6)."""
    exact, noisy, shot = (_adapter(shape), _adapter(shape, rotation="RY", qaa_noise="depolarizing:0.02"),
                          _adapter(shape, qaa_shots=200, qaa_seed=3))
    bank = QAABank(shape, 4, "cpu")
    t = QAAType()
    for slot, ad in ((1, exact), (2, noisy), (3, shot)):
        bank.load(slot, t.compiled(ad))
    h = torch.randn(6, 2, shape.dim)
    slots = torch.tensor([1, 2, 3, 0, 3, 2])
    out = bank.residual(1, "attn", h.clone(), bank.route(slots))
    assert torch.allclose(out[[0]], t.residual(exact, 1, "attn", h[[0]]), atol=1e-6)
    assert torch.equal(out[3], h[3])
    theta, up, b = (noisy.tensors[key(1, "attn", k)].double() for k in ("angles", "up.weight", "up.bias"))
    for r in (1, 5):
        z = torch.stack([_mixed(h[r, i].double(), theta, "RY", 0.02) for i in range(2)])
        assert (out[r].double() - (h[r].double() + z @ up.t() + b)).abs().max().item() <= 1e-5
    # shot rows: near the exact module output, not equal to it, and the same again after a reload
    ref = t.residual(dataclasses.replace(shot, config=dataclasses.replace(shot.config, qaa_shots=None)), 1, "attn", h[[2, 4]])
    assert not torch.allclose(out[[2, 4]], ref, atol=1e-4)
    assert (out[[2, 4]] - ref).abs().max() < 5 * 0.3 * shape.dim  # |W_up| ~ 0.3: 5 sigma per estimate at most
    if cpu_kernels.library() is not None:  # the fused kernel drew them, and each call draws anew
        assert bank.calls[3] == 1
        step2 = bank.residual(1, "attn", h.clone(), bank.route(slots))
        assert bank.calls[3] == 2 and not torch.equal(step2[[2, 4]], out[[2, 4]])
    bank.load(3, t.compiled(shot))
    again = bank.residual(1, "attn", h.clone(), bank.route(slots))
    assert torch.equal(again[[2, 4]], out[[2, 4]])
    bank.clear(2)
    assert 2 not in bank.emulated


@pytest.mark.parametrize("fields,match", [
    ({"qaa_shots": 0}, "qaa_shots"),
    ({"qaa_shots": MAX_SHOTS + 1}, "qaa_shots"),
    ({"qaa_shots": 1.5}, "qaa_shots"),
    ({"qaa_noise": "amplitude:0.1"}, "depolarizing"),
    ({"qaa_noise": "depolarizing:1.5"}, r"\[0, 1\]"),
    ({"qaa_noise": "depolarizing:x"}, "number"),
    ({"qaa_shots": 10, "qaa_noise": "depolarizing:0.1"}, "cannot be combined"),
    ({"qaa_seed": -1}, "qaa_seed"),
])
def test_bad_emulation_configs_are_refused(fields, match):
    with pytest.raises(AdapterError, match=match):
        QAAConfig(**fields)


def test_export_qnode_takes_device_options(shape):
    """export_qnode's noise on default.mixed is the emulator's noise; lightning.qubit with the
    adjoint method is the exact circuit."""
    ad = _adapter(shape)
    h = torch.randn(shape.dim, dtype=torch.float64)
    f, theta, _, _ = export_qnode(ad, 1, "attn", device="lightning.qubit", diff_method="adjoint")
    exact = torch.as_tensor(f(h, theta.double()))
    ours = QAAType().compiled(ad)[0][(1, "attn")]
    from adapters.circuit import expectations

    assert (expectations(h.float(), ours[0], "RX", 6, 2).double() - exact).abs().max() <= 1e-6
