"""QAA's circuit, compiled: amplitude embedding, L x (rotation on every qubit + CNOT ring), <Z>.

Conventions follow PennyLane: wire 0 is the most significant bit of a basis index; RX(t) =
exp(-i t X / 2), RY(t) = exp(-i t Y / 2); the ring applies CNOT(q, q+1 mod n) for q = 0..n-1
in that order.

No 2^n x 2^n matrix is ever built. With H the n-qubit Walsh-Hadamard transform, D_l =
diag(exp(-i phi_l)), phi_l(i) = 1/2 sum_q theta_lq s_q(i), s_q(i) = +-1 the Z eigenvalue of
wire q in basis state i, and P the ring's permutation:
    RX layer = H D_l H,  so  U = P H D_L Q D_(L-1) ... Q D_1 H,   Q = H P H
Q is again a permutation (every CNOT reversed) and Q^-k D Q^k is again diagonal, so the Q's
move left through the phases, and H Q^k = P^k H:
    U = P^L H D H,   D = prod_l Q^-(l-1) D_l Q^(l-1)   (one phase vector, linear in theta)
An RX circuit of any depth is therefore compiled, once per adapter, to one phase vector;
running it costs two Walsh-Hadamard transforms (each two small Kronecker-factor matmuls) and
elementwise work, in real arithmetic, and P^L folds into the readout. RY circuits are real
orthogonal: each layer is two real Kronecker factors (2^a x 2^a and 2^b x 2^b, a + b = n)
and a permutation. <Z_q> = sum_i |psi_i|^2 s_q(F(i)), F the permutation left at the end:
one (2^n, n) matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    ring: torch.Tensor
    """(2^n,) gather index of the CNOT ring: psi <- psi[..., ring]."""
    ring_h: torch.Tensor
    """(2^n,) gather index of Q = H ring H (the ring with every CNOT reversed)."""
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


_cache: dict = {}
"""Every parameter-free constant of the circuits, built once per key by `_constant`."""


def _constant(key, build):
    """_cache[key], made by build() on first use, outside inference mode: serving (in
    torch.inference_mode) and training share these tensors, and autograd cannot save
    inference tensors."""
    if key not in _cache:
        with torch.inference_mode(False):
            _cache[key] = build()
    return _cache[key]


def _plan_cpu(n: int) -> Plan:
    return _constant(("plan", n), lambda: _make_plan(n))


def _make_plan(n: int) -> Plan:
    i = torch.arange(2**n)
    bits = torch.stack([(i >> (n - 1 - q)) & 1 for q in range(n)], 1)  # (2^n, n)
    zsign = (1 - 2 * bits).float()
    a = n // 2
    return Plan(n, a, zsign, _ring_gather(n, reverse=False), _ring_gather(n, reverse=True), _hadamard(a), _hadamard(n - a))


def plan(n: int, device="cpu") -> Plan:
    p = _plan_cpu(n)
    return _constant(("plan", n, str(device)),
                     lambda: Plan(n, p.a, *(t.to(device) for t in (p.zsign, p.ring, p.ring_h, p.h_hi, p.h_lo))))


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


def compile_circuit(theta: torch.Tensor, rotation: str) -> torch.Tensor | tuple:
    """Angles (L, n) -> the adapter-specific part of its compiled circuit (differentiable).

    RX: (2, 2^n) = (cos, sin) of the total phase.  RY: Kronecker factors (L, 2^a, 2^a), (L, 2^b, 2^b).
    """
    L, n = theta.shape
    if rotation == "RX":
        phi = (theta.float()[:, None, :] * _phase_signs(n, L, theta.device)).sum((0, 2)) / 2  # (2^n,)
        return torch.stack((torch.cos(phi), torch.sin(phi)))
    if rotation == "RY":
        p = plan(n, theta.device)
        hi, lo = zip(*(_kron_factors(theta[l].float(), p.a) for l in range(L)))
        return torch.stack(hi), torch.stack(lo)
    raise ValueError(f"rotation {rotation!r} is not one of {ROTATIONS}")


def _phase_signs(n: int, L: int, device) -> torch.Tensor:
    """(L, 2^n, n): zsign read through Q^(l-1), so phi = 1/2 sum_l signs[l] @ theta_l."""

    def build():
        p = _plan_cpu(n)
        inv = torch.empty_like(p.ring_h)
        inv[p.ring_h] = torch.arange(2**n)
        idx, out = torch.arange(2**n), []
        for _ in range(L):
            out.append(p.zsign[idx])
            idx = idx[inv]  # Q^-k D Q^k = diag(d[(Q^-1)^k])
        return torch.stack(out).to(device)

    return _constant(("signs", n, L, str(device)), build)


def readout(n: int, k: int, device, ones: bool = False, stacked: int = 1) -> torch.Tensor:
    """(2^n, n): <Z> = |psi|^2 @ readout after k more ring permutations P. `ones` appends a
    column of ones (|psi|^2); `stacked` repeats the rows (squares of parts read in one matmul)."""
    if ones or stacked > 1:

        def extended():
            r = readout(n, k, device)
            r = torch.cat([r, torch.ones(r.shape[0], 1, device=r.device)], 1) if ones else r
            return torch.cat([r] * stacked)

        return _constant(("readout", n, k, str(device), ones, stacked), extended)

    def build():
        p = _plan_cpu(n)
        g = torch.arange(2**n)
        for _ in range(k):
            g = g[p.ring]  # gather index of P^k
        # psi_out = psi[g]  =>  sum_j |psi_out_j|^2 z(j) = sum_i |psi_i|^2 z(g^-1(i))
        inv = torch.empty_like(g)
        inv[g] = torch.arange(2**n)
        return p.zsign[inv].to(device)

    return _constant(("readout", n, k, str(device)), build)


def embed_wht(h: torch.Tensor, n: int) -> torch.Tensor:
    """H pad(h): the Walsh-Hadamard transform of the zero-padded amplitudes (..., d) -> (..., 2^n).

    The padded state as a (2^a, 2^b) matrix has only its first ceil(d / 2^b) rows non-zero,
    so when 2^b divides d, h itself is that block (a view, no padding copy) and only those
    columns of the high factor are used."""
    p = plan(n, h.device)
    lo_size = 1 << (n - p.a)
    rows = -(-h.shape[-1] // lo_size)
    if h.shape[-1] != rows * lo_size:
        h = torch.nn.functional.pad(h, (0, rows * lo_size - h.shape[-1]))
    X = h.reshape(*h.shape[:-1], rows, lo_size)
    return (_hi_cols(n, rows, h.device) @ X @ p.h_lo).reshape(*h.shape[:-1], 1 << n)  # H_lo is symmetric


def expectations(h: torch.Tensor, compiled, rotation: str, n: int, L: int, with_one: bool = False) -> torch.Tensor:
    """<Z_q> for hidden states h (..., d), amplitude-embedded into n qubits -> (..., n).

    h need not be normalised: <Z> is quadratic in the state, so the readout matmul carries
    one more column of ones (giving |h|^2) and the result is divided by it. With `with_one`
    that column is kept, as an exact 1 after the division: (..., n + 1), ready to multiply
    [W_up | b]. `compiled` comes from compile_circuit; its leading dims broadcast against h's
    batch dims (e.g. (B, 1, 2, 2^n) per-row RX).
    """
    parts, k = _amplitudes(h, compiled, rotation, n, L)  # (..., m, 2^n) real parts of the state
    m = parts.shape[-2]
    out = (parts * parts).flatten(-2) @ readout(n, k, h.device, ones=True, stacked=m)  # parts read in one matmul
    out = out / out[..., n:].clamp_min(1e-30)
    return out if with_one else out[..., :n]


def prepare(n: int, d: int, rotation: str, L: int, device) -> None:
    """Build every constant `expectations` uses for d-dimensional states on this circuit
    shape now, so that a traced call (torch.compile) finds them all and only reads the cache
    (a miss while tracing would put the cache's contents in the compiled step's guards)."""
    p = plan(n, device)
    if rotation == "RX":
        compiled = torch.zeros(2, 2**n, device=device)
    else:
        compiled = (torch.zeros(L, 2**p.a, 2**p.a, device=device), torch.zeros(L, 2 ** (n - p.a), 2 ** (n - p.a), device=device))
    expectations(torch.ones(1, d, device=device), compiled, rotation, n, L, with_one=True)


def probabilities(h: torch.Tensor, compiled, rotation: str, n: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The circuit's output distribution for hidden states h (..., d): (probs (..., 2^n)
    summing to 1 over basis indices before the last ring permutations, readout (2^n, n)),
    so that <Z> = probs @ readout and a shot's outcome i reads readout[i] (the finite-shot
    emulator samples from it)."""
    parts, k = _amplitudes(h, compiled, rotation, n, L)
    probs = (parts * parts).sum(-2)
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-30), readout(n, k, h.device)


def _amplitudes(h, compiled, rotation: str, n: int, L: int):
    """(parts (..., m, 2^n), k): the unnormalised output state's real parts, |psi|^2 = sum
    over m of parts^2, with k ring permutations left to apply at the readout."""
    p = plan(n, h.device)
    h = h.float()
    if rotation == "RY":
        hi, lo = compiled
        psi = pad(h, n)
        for l in range(L):
            psi = kron_apply(psi, hi[..., l, :, :], lo[..., l, :, :], p.a).index_select(-1, p.ring)
        return psi[..., None, :], 0  # every ring already applied
    u = embed_wht(h, n)  # H psi, real
    # D = cos - i sin: the real and imaginary parts go through H together; the sign of the
    # imaginary part vanishes in |.|^2
    return kron_apply(u[..., None, :] * compiled, p.h_hi, p.h_lo, p.a), L  # (..., 2, 2^n)


def _hi_cols(n: int, rows: int, device) -> torch.Tensor:
    return _constant(("hi_cols", n, rows, str(device)), lambda: plan(n, device).h_hi[:, :rows].contiguous())


def pad(h: torch.Tensor, n: int) -> torch.Tensor:
    """(..., d) -> (..., 2^n) zero-padded fp32 amplitudes (not normalised)."""
    return torch.nn.functional.pad(h.float(), (0, 2**n - h.shape[-1]))


def circuit_z(h: torch.Tensor, theta: torch.Tensor, rotation: str) -> torch.Tensor:
    """<Z> of one adapter's circuit for hidden states h (..., d): autograd through everything."""
    L, n = theta.shape
    return expectations(h, compile_circuit(theta, rotation), rotation, n, L)


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
