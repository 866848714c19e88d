"""The compiled QAA circuit against PennyLane's default.qubit (an independent simulator)."""

import math

import pytest
import torch

from adapters.base import n_qubits
from adapters.circuit import circuit_z, circuit_z_shift
from adapters.export import qnode as to_qnode

ROT = ["RX", "RY"]
LAYERS = [1, 2, 4]
DIMS = [100, 576, 768, 1024]


def _inputs(d, L, n, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, d, generator=g, dtype=torch.float64)
    theta = torch.rand(L, n, generator=g, dtype=torch.float64) * 2 * math.pi
    return h, theta


def _pennylane(h, theta, rotation):
    qn = to_qnode(theta.shape[1], theta.shape[0], rotation)
    return torch.stack([torch.stack(qn(h[i], theta)) for i in range(h.shape[0])])  # (B, n)


@pytest.mark.parametrize("rotation", ROT)
@pytest.mark.parametrize("L", LAYERS)
@pytest.mark.parametrize("d", DIMS)
def test_expectations_match_pennylane(rotation, L, d):
    n = n_qubits(d)
    h, theta = _inputs(d, L, n, seed=d + L)
    ref = _pennylane(h, theta, rotation)
    ours = circuit_z(h.float(), theta.float(), rotation)
    assert ours.shape == (3, n)
    assert (ours.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rotation", ROT)
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("d", [100, 576])
def test_gradients_match_pennylane_backprop(rotation, L, d):
    n = n_qubits(d)
    h, theta = _inputs(d, L, n, seed=7 * d + L)
    w = torch.randn(3, n, dtype=torch.float64)  # a fixed readout so the loss mixes every <Z_q>

    h_ref, t_ref = h.clone().requires_grad_(), theta.clone().requires_grad_()
    (_pennylane(h_ref, t_ref, rotation) * w).sum().backward()

    h_our, t_our = h.float().requires_grad_(), theta.float().requires_grad_()
    (circuit_z(h_our, t_our, rotation) * w.float()).sum().backward()

    assert (t_our.grad.double() - t_ref.grad).abs().max().item() <= 1e-5
    assert (h_our.grad.double() - h_ref.grad).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rotation", ROT)
@pytest.mark.parametrize("L", LAYERS)
def test_parameter_shift_matches_autograd(rotation, L):
    d = 64
    n = n_qubits(d)
    h, theta = _inputs(d, L, n, seed=L)
    h, theta = h.float(), theta.float()
    w = torch.randn(3, n, generator=torch.Generator().manual_seed(L))  # seeded: not whatever ran before
    grads = []
    for f in (circuit_z, circuit_z_shift):
        hh, tt = h.clone().requires_grad_(), theta.clone().requires_grad_()
        (f(hh, tt, rotation) * w).sum().backward()
        grads.append((hh.grad, tt.grad))
    assert (grads[0][1] - grads[1][1]).abs().max().item() <= 1e-5
    assert (grads[0][0] - grads[1][0]).abs().max().item() <= 1e-5


def test_no_dense_unitary_is_built():
    """The compiled circuit's tensors stay far below a 2^n x 2^n matrix."""
    from adapters.circuit import compile_circuit, plan, readout

    n = 10
    theta = torch.rand(4, n)
    p = plan(n)
    sizes = [t.numel() for t in (p.zsign, p.ring, p.ring_h, p.h_hi, p.h_lo, readout(n, 4, "cpu"))]
    sizes += [compile_circuit(theta, "RX").numel()] + [t.numel() for t in compile_circuit(theta, "RY")]
    assert max(sizes) < (2**n) ** 2 / 50


@pytest.mark.parametrize("rotation", ROT)
def test_exported_module_reproduces_the_adapter(rotation, tiny_dir):
    """A trained QAA module exported to PennyLane gives the module output our forward gives."""
    from adapters.qaa import QAAConfig, QAAType, export_qnode
    from engine.config import ModelConfig
    from tests.adapters.cases import Case, make

    shape = ModelConfig.from_dir(tiny_dir).shape()
    ad = make(Case("q", "qaa", lambda: QAAConfig(circuit_layers=2, rotation=rotation)), shape, seed=2)
    h = torch.randn(4, shape.dim)
    ours = QAAType().residual(ad, 1, "mlp", h)
    qnode, theta, up, b = export_qnode(ad, 1, "mlp")
    z = torch.stack([torch.stack(qnode(h[i].double(), theta.double())) for i in range(4)]).float()
    assert (ours - (h + z @ up.t() + b)).abs().max().item() <= 1e-5


def test_constants_first_built_in_inference_mode_still_serve_autograd():
    """The circuit's cached constants are shared by serving (inference mode) and training:
    built first by the former, they must still be usable by the latter's backward."""
    from adapters import circuit

    circuit._cache.clear()
    theta = torch.rand(2, 5)
    with torch.inference_mode():
        circuit.circuit_z(torch.randn(3, 20), theta, "RX")
    h, t = torch.randn(3, 20, requires_grad=True), theta.clone().requires_grad_()
    circuit.circuit_z(h, t, "RX").sum().backward()
    assert h.grad is not None and t.grad is not None and torch.isfinite(t.grad).all()
