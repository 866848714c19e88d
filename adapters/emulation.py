"""What QAA's circuit gives on a quantum device: finite shots and depolarizing noise, emulated
by our own simulator (fast, batched, seeded), checked against PennyLane's devices.

Shots. A device does not return <Z_q>; it returns N bitstrings drawn from the output
distribution |psi_i|^2, and <Z_q> is estimated by the mean of wire q's eigenvalue over them.
We draw the N outcomes (their counts, a multinomial sample) from the exact distribution of
`circuit.probabilities` and read every wire from the same outcomes, so the estimates of the
n wires are as correlated as on hardware. Each estimate is unbiased with variance
(1 - <Z_q>^2) / N. `shot_z` / `sample_counts` here are the torch reference, run for RY
circuits and off the CPU; RX modules on the CPU draw inside the fused kernel instead
(cpu_kernels.qaa_rx_ with shots: the same distribution, an exact binomial-tree multinomial
in C whose cost stops growing with N, from a counter-based stream per adapter, call and
vector, so the draws do not depend on the thread count).

Noise. The model is PennyLane's `qml.DepolarizingChannel(p)` on every wire after each circuit
layer (after its rotations and its CNOT ring), i.e. rho -> (1 - p) rho + p/3 (X rho X + Y rho Y
+ Z rho Z) per wire, the same as `export_qnode(..., noise=p)` on `default.mixed`. The channel
is unital and self-adjoint, so in the Heisenberg picture each observable Z_q can be pulled
back through the noisy layers once per adapter, at load time:
    O_q = U_1^+ D(U_2^+ D( ... U_L^+ D(Z_q) U_L ... ) U_2) U_1,   D(O) on wire w:
    (1 - l) O + l I_w / 2 (x) Tr_w O,   l = 4p/3
and then <Z_q>_noisy = psi^T Re(O_q) psi for the real, normalised embedding psi. Only the
top-left d x d block of Re(O_q) meets the zero-padded input, so an adapter's noisy circuit
is n matrices (d, d), and evaluating it is one (d, n d) matmul per token. Noise and shots
are not combined: this gives expectations, not the noisy output distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapters.base import AdapterError
from adapters.circuit import ROTATIONS, probabilities

MAX_SHOTS = 1_000_000
"""Shots per circuit execution a config may ask for (a trust-boundary bound)."""
MAX_NOISE_DIM = 1024
"""Noise emulation holds n (d, d) matrices per module: only for hidden sizes up to this."""
TREE_ABOVE = 2048
"""Above this many shots, counts come from n levels of binomial splits (cost independent
of N) instead of N categorical draws."""
NOISE_MODELS = ("depolarizing",)


@dataclass(frozen=True)
class Emulation:
    """How a QAA adapter's circuit is run when it is not run exactly."""

    shots: int | None = None
    """Shots per circuit execution (None: exact expectations)."""
    depolarizing: float = 0.0
    """Depolarizing probability p on every wire after each layer (0: no noise)."""
    seed: int = 0
    """Seeds the shot sampler (one stream per loaded adapter: a torch generator on the torch
    path; the fused kernel's streams are keyed by it, the call count since the load and the vector)."""

    def generator(self, device="cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def label(self) -> str:
        return f"{self.shots} shots" if self.shots else f"depolarizing p={self.depolarizing:g}"


def parse_noise(spec: str | None) -> float:
    """'depolarizing:p' -> p (None or '' -> 0)."""
    if spec in (None, ""):
        return 0.0
    model, _, value = str(spec).partition(":")
    if model not in NOISE_MODELS:
        raise AdapterError(f"noise {spec!r}: the model must be one of {', '.join(NOISE_MODELS)} (e.g. depolarizing:0.01)")
    try:
        p = float(value)
    except ValueError:
        raise AdapterError(f"noise {spec!r}: expected depolarizing:p with a number p in [0, 1]") from None
    if not 0.0 <= p <= 1.0:
        raise AdapterError(f"noise {spec!r}: p must be in [0, 1]")
    return p


def make_emulation(shots, noise, seed=0) -> Emulation | None:
    """A validated Emulation, or None when the circuit is to run exactly."""
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or not 1 <= shots <= MAX_SHOTS):
        raise AdapterError(f"qaa_shots must be an integer in [1, {MAX_SHOTS}] or null, got {shots!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise AdapterError(f"qaa_seed must be a non-negative integer, got {seed!r}")
    p = parse_noise(noise)
    if shots is not None and p > 0:
        raise AdapterError("qaa_shots and qaa_noise cannot be combined: the noise emulator gives expectations, "
                           "not the noisy output distribution to draw shots from")
    if shots is None and p == 0:
        return None
    return Emulation(shots=shots, depolarizing=p, seed=seed)


# --- shots ------------------------------------------------------------------------------
def sample_counts(probs: torch.Tensor, shots: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multinomial counts (..., K) of `shots` draws from each row of probs (..., K), K = 2^n."""
    K = probs.shape[-1]
    flat = probs.reshape(-1, K).float().clamp_min(0)
    if flat.shape[0] == 0:
        return torch.zeros_like(probs)
    if shots <= TREE_ABOVE:
        idx = torch.multinomial(flat, shots, replacement=True, generator=generator)  # (R, N)
        counts = torch.zeros_like(flat).scatter_add_(1, idx, torch.ones_like(idx, dtype=flat.dtype))
        return counts.reshape(probs.shape)
    # the count of a subtree of outcomes (a prefix of the wires) splits binomially between
    # its two halves: n levels give the multinomial exactly
    n = K.bit_length() - 1
    counts = torch.full((flat.shape[0], 1), float(shots), device=flat.device)
    for level in range(n):
        q = flat.reshape(flat.shape[0], 2 ** (level + 1), -1).sum(-1).reshape(flat.shape[0], 2**level, 2)
        left = q[..., 0] / q.sum(-1).clamp_min(1e-30)
        first = torch.binomial(counts, left.clamp(0, 1), generator=generator)
        counts = torch.stack([first, counts - first], -1).reshape(flat.shape[0], -1)
    return counts.reshape(probs.shape)


def shot_z(h: torch.Tensor, compiled, rotation: str, n: int, L: int, shots: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """<Z> estimated from `shots` measurements per row of h (..., d) -> (..., n)."""
    probs, read = probabilities(h, compiled, rotation, n, L)
    return sample_counts(probs, shots, generator) @ read / shots


# --- depolarizing noise -----------------------------------------------------------------
# Observables are kept as real coefficients on Pauli strings (tensor products of I, X, Y, Z),
# a string keyed x * 2^n + z with wire q on bit n-1-q of x (X or Y there) and of z (Z or Y).
# Only the strings that occur are stored (few for shallow circuits; at most 4^n).
def _bit(n: int, q: int) -> int:
    return 1 << (n - 1 - q)


def _ring_table(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(new key, sign) of every Pauli string pulled back through the CNOT ring: P -> R^+ P R."""

    def build():
        N = 2**n
        key = torch.arange(N * N)
        x, z, sign = key // N, key % N, torch.ones(N * N, dtype=torch.float64)
        for c, t in reversed([(q, (q + 1) % n) for q in range(n)]):  # the last CNOT is innermost
            bc, bt = _bit(n, c), _bit(n, t)
            xc, zc, xt, zt = (x & bc) != 0, (z & bc) != 0, (x & bt) != 0, (z & bt) != 0
            sign = torch.where(xc & zt & ~(xt ^ zc), -sign, sign)  # Aaronson-Gottesman phase rule
            x = torch.where(xc, x ^ bt, x)
            z = torch.where(zt, z ^ bc, z)
        return x * N + z, sign

    from adapters.circuit import _constant

    return _constant(("pauli-ring", n), build)


def _coalesce(obs, key, val):
    """Sum duplicate (observable, string) entries."""
    uniq, where = torch.unique(obs * (1 << 40) + key, return_inverse=True)
    out = torch.zeros(uniq.shape[0], dtype=val.dtype).index_add_(0, where, val)
    return uniq >> 40, uniq & ((1 << 40) - 1), out


def _rotate(obs, key, val, n: int, q: int, theta: float, rotation: str):
    """Pull the strings back through RX/RY(theta) on wire q: RX maps Z -> cos Z + sin Y and
    Y -> cos Y - sin Z (X fixed); RY maps Z -> cos Z - sin X and X -> cos X + sin Z (Y fixed)."""
    N, b = 2**n, _bit(n, q)
    x, z = key // N, key % N
    hx, hz = (x & b) != 0, (z & b) != 0
    if rotation == "RX":
        moving, flip, plus = hz, b * N, ~hx  # Z (x=0) gains +sin Y; Y gains -sin Z
    else:
        moving, flip, plus = hx ^ hz, b * N + b, hx  # X gains +sin Z; Z gains -sin X
    c, s = math.cos(theta), math.sin(theta)
    kept = torch.where(moving, val * c, val)
    extra = moving.nonzero().squeeze(1)
    extra_val = val[extra] * s * torch.where(plus[extra], 1.0, -1.0).double()
    return _coalesce(torch.cat([obs, obs[extra]]), torch.cat([key, key[extra] ^ flip]), torch.cat([kept, extra_val]))


def _popcount(v: torch.Tensor, n: int) -> torch.Tensor:
    return sum(((v >> k) & 1) for k in range(n))


def noisy_observables(theta: torch.Tensor, rotation: str, p: float, d: int) -> torch.Tensor:
    """(n, d, d) fp64 symmetric matrices M_q with <Z_q> = h^T M_q h / |h|^2 on the noisy
    circuit of angles theta (L, n) (see the module docstring)."""
    if rotation not in ROTATIONS:
        raise AdapterError(f"rotation {rotation!r} is not one of {', '.join(ROTATIONS)}")
    L, n = theta.shape
    if d > MAX_NOISE_DIM:
        raise AdapterError(f"noise emulation is limited to hidden sizes up to {MAX_NOISE_DIM} (this model: {d})")
    N, keep = 2**n, 1 - 4 * p / 3
    angles = theta.detach().double().cpu().tolist()
    ring_key, ring_sign = _ring_table(n)
    obs = torch.arange(n)
    key = torch.tensor([_bit(n, q) for q in range(n)])  # Z_q: x = 0, z = bit q
    val = torch.ones(n, dtype=torch.float64)
    for l in reversed(range(L)):
        val = val * keep ** _popcount((key // N) | (key % N), n).double()  # depolarizing on every wire
        key, val = ring_key[key], val * ring_sign[key]
        for q in range(n):
            obs, key, val = _rotate(obs, key, val, n, q, angles[l][q], rotation)
    return _to_matrices(obs, key, val, n, d)


def _to_matrices(obs, key, val, n: int, d: int) -> torch.Tensor:
    """Sum of c P over the strings, real part, top-left d x d block -> (n, d, d).

    P[i, i ^ x] = (-i)^|x & z| (-1)^(z . i): strings with an odd number of Y are imaginary
    (they vanish on real states); for the others, row i of the band x is a Walsh-Hadamard
    transform over z."""
    N = 2**n
    x, z = key // N, key % N
    ny = _popcount(x & z, n)
    real = ny % 2 == 0
    C = torch.zeros(n, N, N, dtype=torch.float64)
    C.index_put_((obs[real], x[real], z[real]), val[real] * torch.where(ny[real] % 4 == 0, 1.0, -1.0).double(),
                 accumulate=True)
    a = n // 2
    ha, hb = (_sign_hadamard(k) for k in (a, n - a))
    G = (ha @ C.reshape(n * N, 2**a, 2 ** (n - a)) @ hb).reshape(n, N, N)  # G[q, x, i] = sum_z C (-1)^(z.i)
    i = torch.arange(d)
    return G[:, i[:, None] ^ i[None, :], i[:, None]].contiguous()  # M[q, i, j] = G[q, i ^ j, i]


def _sign_hadamard(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return h


def noisy_z(h: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """<Z> of the noisy circuit for h (..., d), obs (n, d, d) from noisy_observables -> (..., n)."""
    n, d, _ = obs.shape
    x = h.to(obs.dtype)
    y = (x @ obs.permute(1, 0, 2).reshape(d, n * d)).unflatten(-1, (n, d))  # (..., n, d): M_q h
    return (y * x[..., None, :]).sum(-1) / (x * x).sum(-1, keepdim=True).clamp_min(1e-30)
