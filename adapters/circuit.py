"""QAA's circuit, compiled: amplitude embedding, L x (rotation on every qubit + CNOT ring), <Z>.

Conventions follow PennyLane: wire 0 is the most significant bit of a basis index; RX(t) =
exp(-i t X / 2), RY(t) = exp(-i t Y / 2); the ring applies CNOT(q, q+1 mod n) for q = 0..n-1
in that order.

No 2^n x 2^n matrix is ever built. With H the n-qubit Walsh-Hadamard transform, D_l =
diag(exp(-i phi_l)), phi_l(i) = 1/2 sum_q theta_lq s_q(i), s_q(i) = +-1 the Z eigenvalue of
wire q in basis state i, and P the ring's permutation:
    RX layer = H D_l H,  so  U = P H D_L P' D_(L-1) ... P' D_1 H,   P' = H P H
where P' is again a permutation (each CNOT reversed). An RX circuit therefore costs two
Walsh-Hadamard transforms (each two small Kronecker-factor matmuls), L elementwise phases and
L-1 gathers, in real arithmetic on (re, im). RY circuits are real orthogonal: each layer is
two real Kronecker factors (2^a x 2^a and 2^b x 2^b, a + b = n) and a gather.
<Z_q> = sum_i |psi_i|^2 s_q(F(i)) with F the final ring permutation: one (2^n, n) matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

ROTATIONS = ("RX", "RY")


@dataclass(frozen=True)
class Plan:
    """The parameter-free parts of an n-qubit QAA circuit (shared by every adapter)."""

    n: int
    a: int
    """Qubits in the high Kronecker factor (wires 0..a-1); b = n - a in the low one."""
    zsign: torch.Tensor
    """(2^n, n) Z eigenvalue of each wire in each basis state."""
    zsign_out: torch.Tensor
    """(2^n, n) zsign read through the last ring: <Z> = |psi|^2 @ zsign_out."""
    ring: torch.Tensor
    """(2^n,) gather index of the CNOT ring: psi <- psi[..., ring]."""
    ring_h: torch.Tensor
    """(2^n,) gather index of H ring H (the ring with every CNOT reversed)."""
    h_hi: torch.Tensor
    """(2^a, 2^a) normalised Hadamard factor."""
    h_lo: torch.Tensor
    """(2^b, 2^b) normalised Hadamard factor."""


def _ring_gather(n: int, reverse: bool) -> torch.Tensor:
    """Gather index G with psi'[j] = psi[G[j]] for the CNOT ring (each CNOT is an involution
    on basis indices, so G applies the CNOTs to j in reverse order)."""
    idx = torch.arange(2**n)
    pairs = [(q, (q + 1) % n) for q in range(n)] if n > 1 else []
    for c, t in reversed(pairs):
        if reverse:
            c, t = t, c
        cbit, tbit = 1 << (n - 1 - c), 1 << (n - 1 - t)
        idx = torch.where(idx & cbit != 0, idx ^ tbit, idx)
    return idx


def _hadamard(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    for _ in range(k):
        h = torch.kron(h, h2)
    return h.float()


@lru_cache(maxsize=None)
def _plan_cpu(n: int) -> Plan:
    i = torch.arange(2**n)
    bits = torch.stack([(i >> (n - 1 - q)) & 1 for q in range(n)], 1)  # (2^n, n)
    zsign = (1 - 2 * bits).float()
    ring = _ring_gather(n, reverse=False)
    # psi_out = psi[ring]  =>  sum_j |psi_out_j|^2 z(j) = sum_i |psi_i|^2 z(F(i)),  F = ring^-1
    inv = torch.empty_like(ring)
    inv[ring] = torch.arange(2**n)
    a = n // 2
    return Plan(n, a, zsign, zsign[inv], ring, _ring_gather(n, reverse=True), _hadamard(a), _hadamard(n - a))


_plans: dict = {}


def plan(n: int, device="cpu") -> Plan:
    key = (n, str(device))
    if key not in _plans:
        p = _plan_cpu(n)
        _plans[key] = Plan(n, p.a, *(t.to(device) for t in (p.zsign, p.zsign_out, p.ring, p.ring_h, p.h_hi, p.h_lo)))
    return _plans[key]


def embed(h: torch.Tensor, n: int) -> torch.Tensor:
    """Amplitude embedding: (..., d) -> (..., 2^n) zero-padded, L2-normalised, fp32."""
    x = h.float()
    x = torch.nn.functional.pad(x, (0, 2**n - x.shape[-1]))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def kron_apply(x, hi, lo, a: int):
    """(hi (x) lo) applied to states x (..., 2^n): hi (..., 2^a, 2^a), lo (..., 2^b, 2^b)."""
    shp = x.shape
    X = x.reshape(*shp[:-1], 2**a, shp[-1] >> a)
    return (hi @ X @ lo.transpose(-1, -2)).reshape(shp)


def _rot2(theta: torch.Tensor, rotation: str):
    """(..., 2, 2) real matrices; for RX, the real and imaginary parts are returned separately."""
    c, s = torch.cos(theta / 2), torch.sin(theta / 2)
    if rotation == "RY":
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    raise ValueError(rotation)


def _kron_factors(theta_l: torch.Tensor, a: int):
    """RY on every wire of one layer -> (hi (2^a, 2^a), lo (2^b, 2^b)); theta_l (n,)."""
    mats = _rot2(theta_l, "RY")
    hi = torch.ones(1, 1, dtype=theta_l.dtype, device=theta_l.device)
    lo = hi
    for q in range(theta_l.shape[0]):
        if q < a:
            hi = torch.kron(hi, mats[q])
        else:
            lo = torch.kron(lo, mats[q])
    return hi, lo


def compile_circuit(theta: torch.Tensor, rotation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles (L, n) -> the adapter-specific tensors of its compiled circuit (differentiable).

    RX: (cos phi, sin phi), each (L, 2^n).   RY: Kronecker factors (L, 2^a, 2^a), (L, 2^b, 2^b).
    """
    L, n = theta.shape
    p = plan(n, theta.device)
    if rotation == "RX":
        phi = theta.float() @ p.zsign.t() / 2  # (L, 2^n)
        return torch.cos(phi), torch.sin(phi)
    if rotation == "RY":
        hi, lo = zip(*(_kron_factors(theta[l].float(), p.a) for l in range(L)))
        return torch.stack(hi), torch.stack(lo)
    raise ValueError(f"rotation {rotation!r} is not one of {ROTATIONS}")


def expectations(psi: torch.Tensor, compiled, rotation: str, n: int) -> torch.Tensor:
    """<Z_q> for embedded states psi (..., 2^n) -> (..., n).

    `compiled` comes from compile_circuit; its leading dims broadcast against psi's batch
    dims once the (L, ...) dim is removed (e.g. (B, 1, L, 2^n) for per-row adapters).
    """
    p = plan(n, psi.device)
    c0, c1 = compiled
    L = c0.shape[-2] if rotation == "RX" else c0.shape[-3]
    if rotation == "RY":
        for l in range(L):
            psi = kron_apply(psi, c0[..., l, :, :], c1[..., l, :, :], p.a)[..., p.ring]
        return (psi * psi) @ p.zsign  # the last ring is already applied
    u = kron_apply(psi, p.h_hi, p.h_lo, p.a)  # H
    re, im = c0[..., 0, :] * u, -c1[..., 0, :] * u  # D_1
    for l in range(1, L):
        re, im = re[..., p.ring_h], im[..., p.ring_h]  # P'
        cos, sin = c0[..., l, :], c1[..., l, :]
        re, im = re * cos + im * sin, im * cos - re * sin  # times exp(-i phi_l)
    re, im = kron_apply(re, p.h_hi, p.h_lo, p.a), kron_apply(im, p.h_hi, p.h_lo, p.a)  # H
    return (re * re + im * im) @ p.zsign_out  # P, then measure


def circuit_z(h: torch.Tensor, theta: torch.Tensor, rotation: str) -> torch.Tensor:
    """<Z> of one adapter's circuit for hidden states h (..., d): autograd through everything."""
    n = theta.shape[1]
    return expectations(embed(h, n), compile_circuit(theta, rotation), rotation, n)


class _ParameterShift(torch.autograd.Function):
    """Angles' gradient by the parameter-shift rule: d<Z>/d theta = (<Z>(+pi/2) - <Z>(-pi/2)) / 2,
    exact for gates exp(-i theta P / 2) with P a Pauli; the input's gradient by autograd."""

    @staticmethod
    def forward(ctx, h, theta, rotation):
        ctx.save_for_backward(h, theta)
        ctx.rotation = rotation
        return circuit_z(h, theta, rotation)

    @staticmethod
    def backward(ctx, gz):
        h, theta = ctx.saved_tensors
        gh = gtheta = None
        if ctx.needs_input_grad[0]:
            with torch.enable_grad():
                hh = h.detach().requires_grad_()
                z = circuit_z(hh, theta.detach(), ctx.rotation)
                (gh,) = torch.autograd.grad(z, hh, gz)
        if ctx.needs_input_grad[1]:
            gtheta = torch.zeros_like(theta)
            with torch.no_grad():
                for l in range(theta.shape[0]):
                    for q in range(theta.shape[1]):
                        shift = torch.zeros_like(theta)
                        shift[l, q] = math.pi / 2
                        dz = (circuit_z(h, theta + shift, ctx.rotation) - circuit_z(h, theta - shift, ctx.rotation)) / 2
                        gtheta[l, q] = (gz * dz).sum()
        return gh, gtheta, None


def circuit_z_shift(h, theta, rotation):
    """circuit_z whose angle gradients come from the parameter-shift rule."""
    return _ParameterShift.apply(h, theta, rotation)


def to_qnode(n: int, n_layers: int, rotation: str = "RX", device_name: str = "default.qubit"):
    """The same circuit as a PennyLane QNode `f(features, weights)` -> [<Z_0>, ..., <Z_n-1>]
    (torch interface, backprop), for checks and for export."""
    import pennylane as qml

    dev = qml.device(device_name, wires=n)
    gate = {"RX": qml.RX, "RY": qml.RY}[rotation]

    @qml.qnode(dev, interface="torch", diff_method="backprop")
    def circuit(inputs, weights):
        qml.AmplitudeEmbedding(inputs, wires=range(n), pad_with=0.0, normalize=True)
        for l in range(n_layers):
            for q in range(n):
                gate(weights[l, q], wires=q)
            if n > 1:
                for q in range(n):
                    qml.CNOT(wires=[q, (q + 1) % n])
        return [qml.expval(qml.PauliZ(q)) for q in range(n)]

    return circuit
