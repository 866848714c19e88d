"""Fused CPU kernels for adapter modules (cpu_kernels.c), built on first use.

At decode an adapter module is a handful of tiny torch ops per step (for QAA ~10: two
Walsh-Hadamard transforms as Kronecker matmuls, the phase, the readout, the up-projection;
for LoRA a gather, two bmm and an index_add), and their dispatch, not their arithmetic, is
the cost: ~150 us per QAA module for two rows in a real decode step. Each C kernel does one
module for every listed row in one call, reading the slot banks directly. For training, a
QAA RX module's <Z> and its backward are one kernel each (`rx_z`), with butterfly
transforms instead of the Kronecker matmuls' ~6x more arithmetic, and no 2^n-sized
activations kept between the passes. Shot emulation of an RX module runs in the same
kernel (`qaa_rx_(..., shots=N)`): the circuit's exact output distribution, an exact
multinomial sample of N outcomes (cpu_shots.c: a binary tree of binomial splits, seeded per
adapter, call and vector) and <Z> read from those counts, then the up-projection.

They are compiled once per machine with the system C compiler ($CC, else `cc`) into
$QAA_CACHE_DIR/kernels (a file named by the hash of the sources, flags and CPU) and loaded
with ctypes. Where Python's headers are here, the same file is also a CPython extension
(cpu_entry.c): the serving kernels bound by `lora_plan` and `qaa_rx_plan` are called through
it, at a fraction of a ctypes call's cost in a decode step (see cpu_entry.c; QAA_CPU_ENTRY=0
turns it off). Without a compiler, or with QAA_CPU_KERNEL=0, `library()` is None and the
banks keep their torch paths (the references these kernels are tested against).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import subprocess
import sysconfig
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from adapters.base import cache_root, cpu_flags, cpuinfo
from adapters.circuit import readout

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SOURCES = [SOURCE, SOURCE.with_name("cpu_shots.c")]
HEADERS = [SOURCE.with_name("cpu_shots.h")]
ENTRY = SOURCE.with_name("cpu_entry.c")
ENTRY_SWITCH = "QAA_CPU_ENTRY"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC"]
ENV_SWITCH = "QAA_CPU_KERNEL"
MAX_TOKENS = 64
"""Beyond this many vectors per LoRA module (prefill), the torch path's GEMMs take over.
(QAA's kernel beats its torch path at every size measured, up to 512 tokens; no limit.)"""
MAX_LORA_RANK = 256
"""tmp[] in lora_delta."""
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
"""The activation dtypes the serving kernels take (the model's dtype), and their symbols' suffix."""
LORA_VARIANTS = {(torch.float32, torch.float32): "f32", (torch.bfloat16, torch.bfloat16): "bf16",
                 (torch.bfloat16, torch.float32): "bf16_w32"}
"""(activation dtype, LoRA bank dtype) -> lora_delta's suffix."""


def _cpu_id() -> str:
    # -march=native code must not be reused on another CPU sharing the cache directory
    return (cpu_flags(cpuinfo()) if cpuinfo() else platform.machine()) + platform.processor()


def _python_include() -> str | None:
    """Where Python.h is, when this interpreter's headers are installed."""
    inc = sysconfig.get_paths().get("include")
    return inc if inc and Path(inc, "Python.h").is_file() else None


@lru_cache(maxsize=1)
def library():
    """The loaded shared library (argument types set), or None when it cannot be had here."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    cc = os.environ.get("CC", "cc")
    inc = _python_include()
    sources = SOURCES + ([ENTRY] if inc else [])
    flags = FLAGS + (["-I", inc] if inc else [])
    texts = [f.read_text() for f in sources + HEADERS]
    digest = hashlib.sha256("\0".join([*texts, cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"cpu_kernels-{digest}.so"
    try:
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            try:  # build beside the target and rename: concurrent builders never see half a file
                subprocess.run([cc, *flags, "-o", tmp, *map(str, sources), "-lm"], check=True, capture_output=True,
                               timeout=120)
                os.replace(tmp, lib)
            finally:
                Path(tmp).unlink(missing_ok=True)
        so = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"QAA CPU kernel unavailable ({e} {detail.decode(errors='replace')[:200]}); "
                      "using the torch path", RuntimeWarning, stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    argtypes = {"qaa_rx_z": [ptr, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64, ptr],
                "qaa_rx_z_backward": [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr],
                "qaa_binomial_draws": [i64, ctypes.c_double, i64, i64, ptr],
                "qaa_multinomial": [ptr, i64, i64, i64, i64, i64, ptr, i64]}
    for sfx in SUFFIX.values():
        argtypes[f"qaa_rx_residual_{sfx}"] = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64]
    argtypes["qaa_rx_residual_bf16_w16"] = argtypes["qaa_rx_residual_bf16"]
    for sfx in LORA_VARIANTS.values():
        argtypes[f"lora_delta_{sfx}"] = [ptr, i64, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, i64]
    for name, types in argtypes.items():
        f = getattr(so, name)
        f.argtypes, f.restype = types, None
    return so


@lru_cache(maxsize=1)
def entry():
    """The library's CPython entry module (cpu_entry.c), or None: no library, no Python headers
    when it was built, or QAA_CPU_ENTRY=0. The kernels it calls are the library's own."""
    so = library()
    if so is None or os.environ.get(ENTRY_SWITCH, "1") == "0":
        return None
    if not hasattr(so, "PyInit_qaa_cpu_entry"):
        return None  # built without Python's headers
    loader = importlib.machinery.ExtensionFileLoader("qaa_cpu_entry", so._name)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("qaa_cpu_entry", loader))
    loader.exec_module(mod)
    return mod


def _kernel(family: str, variant: str):
    """A callable running `{family}_{variant}` on its arguments given as ints (pointers as
    addresses): through the entry module where there is one, else through ctypes."""
    mod = entry()
    if mod is None:
        return getattr(library(), f"{family}_{variant}")
    call, variants = (mod.lora, mod.lora_variants) if family == "lora_delta" else (mod.qaa, mod.qaa_variants)
    return functools.partial(call, variants.index(variant))


@lru_cache(maxsize=None)
def masks(n: int, L: int) -> torch.Tensor:
    """(n,) int64: readout(n, L)[j, q] = (-1)^popcount(j & masks[q]) (the ring permutations
    are linear over GF(2), so each wire's readout is a parity of the basis index)."""
    r = readout(n, L, "cpu")
    m = [sum(1 << k for k in range(n) if r[1 << k, q] < 0) for q in range(n)]
    j = torch.arange(1 << n)
    for q, mq in enumerate(m):  # the claim above, checked once per (n, L)
        parity = torch.zeros_like(j)
        for k in range(n):
            parity ^= (j & mq) >> k & 1
        assert torch.equal(r[:, q], (1 - 2 * parity).float()), "readout is not a parity"
    return torch.tensor(m, dtype=torch.int64)


def usable(*tensors: torch.Tensor, dtypes=tuple(SUFFIX)) -> bool:
    """The serving kernels take CPU tensors of one dtype among `dtypes` (fp32 or bf16; training's
    rx_z: fp32 only) whose last dim is contiguous."""
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype != dtype or t.stride(-1) != 1 or t.device.type != "cpu":
            return False
    return dtype in dtypes and library() is not None


def qaa_rx_plan(rows: torch.Tensor, slots: torch.Tensor, phase: torch.Tensor, upb: torch.Tensor, n: int, L: int,
                dtype: torch.dtype):
    """`qaa_rx_` for one routing and module, bound once: plan(h, shots=0, seed=0, counter=0,
    threads=None) adds into h (B, T, d) of `dtype`. Decode steps repeat their routing, so the
    banks keep a plan per module and pay only for h's pointer and shape per call (the ctypes
    call dominates a small batch's cost). None when the kernel cannot take `dtype` here."""
    assert phase.is_contiguous() and upb.is_contiguous() and rows.is_contiguous() and slots.is_contiguous()
    assert phase.dtype == torch.float32 and upb.dtype in (torch.float32, dtype)
    if dtype not in SUFFIX or library() is None:
        return None
    fn = _kernel("qaa_rx_residual", SUFFIX[dtype] + ("_w16" if upb.dtype == torch.bfloat16 else ""))
    m, R = masks(n, L), rows.numel()
    fixed = (rows.data_ptr(), slots.data_ptr(), 0)
    tail = (phase.data_ptr(), upb.data_ptr(), n, m.data_ptr())
    held = (rows, slots, phase, upb, m)

    def plan(h: torch.Tensor, shots: int = 0, seed: int = 0, counter: int = 0, threads: int | None = None):
        # as few questions to h as it takes to be safe: in a step each one is a cold call
        if h.dtype != dtype or not h.is_contiguous():
            raise TypeError(f"qaa_rx plan for contiguous {dtype} activations, given {h.dtype}")
        _, T, d = h.shape
        fn(h.data_ptr(), T, d, *fixed, R * T, *tail, shots, seed, counter, threads or torch.get_num_threads())
        return h

    plan.held = held  # the pointers bound above stay valid while the plan lives
    return plan


def qaa_rx_(h: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, phase: torch.Tensor,
            upb: torch.Tensor, n: int, L: int, shots: int = 0, seed: int = 0, counter: int = 0,
            threads: int | None = None) -> torch.Tensor:
    """In place: h[rows[i]] += W_up z + b with slot slots[i]'s RX circuit, for every i.

    h (B, T, d) fp32 or bf16 contiguous; rows, slots (R,) int64; phase (S, 2, 2^n) fp32 (the
    circuit and <Z> are fp32 whatever h's dtype); upb (S, n + 1, d) fp32, or bf16 with bf16 h
    (a weight, held in the model's dtype like LoRA's factors; read into fp32).
    shots > 0: z is the shot estimate of emulation.shot_z instead (same distribution: counts
    multinomial over the exact output distribution, every wire read from them), vector
    v = i * T + t drawing from the stream (seed, counter, v), whatever the thread count; the
    caller passes a new counter per call.
    """
    return qaa_rx_plan(rows, slots, phase, upb, n, L, h.dtype)(h, shots, seed, counter, threads)


def lora_plan(rows: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
              dtype: torch.dtype):
    """`lora_` for one routing and module, bound once (see qaa_rx_plan): plan(y, x) adds into
    y. None when the kernel cannot take activations of `dtype` with this bank here."""
    assert A.is_contiguous() and Bt.is_contiguous() and A.shape[1] <= MAX_LORA_RANK and A.dtype == Bt.dtype
    assert rows.is_contiguous() and slots.is_contiguous() and ranks.is_contiguous()
    if (dtype, A.dtype) not in LORA_VARIANTS or library() is None:
        return None
    fn = _kernel("lora_delta", LORA_VARIANTS[(dtype, A.dtype)])
    fixed = (rows.data_ptr(), slots.data_ptr(), rows.numel(), ranks.data_ptr(), A.data_ptr(), Bt.data_ptr(), A.shape[1])
    held = (rows, slots, ranks, A, Bt)
    din, dout, item = A.shape[2], Bt.shape[2], torch.empty(0, dtype=dtype).element_size()

    def plan(y: torch.Tensor, x: torch.Tensor, col: int = 0) -> torch.Tensor:
        """Adds into y[..., col : col + dout] (y may be a fused q|k|v output)."""
        # as few questions to x and y as it takes to be safe: in a step each one is a cold call
        (B, T, dx), (By, Ty, dy), (ys0, ys1, y1), (xs0, xs1, x1) = x.shape, y.shape, y.stride(), x.stride()
        if x.dtype != dtype or y.dtype != dtype or x1 != 1 or y1 != 1:
            raise TypeError(f"lora plan for {dtype} activations with contiguous last dims, given {x.dtype}, {y.dtype}")
        if dx != din or (By, Ty) != (B, T) or not 0 <= col <= dy - dout:
            raise ValueError(f"lora plan for ({din} -> {dout}) columns {col}.. of x {tuple(x.shape)}, y {tuple(y.shape)}")
        fn(y.data_ptr() + col * item, ys0, ys1, x.data_ptr(), xs0, xs1, T, din, dout, *fixed, torch.get_num_threads())
        return y

    plan.held = held  # the pointers bound above stay valid while the plan lives
    return plan


def lora_(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor,
          A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """In place: y[rows[i]] += x[rows[i]] @ A[s, :r].T @ Bt[s, :r], s = slots[i], r = ranks[s].

    x (B, T, din), y (B, T, dout) with contiguous last dims (y may be a slice of a wider
    output), fp32 or bf16; A (S, R, din), Bt (S, R, dout) contiguous, of x's dtype or fp32;
    ranks (S,) int64.
    """
    return lora_plan(rows, slots, ranks, A, Bt, x.dtype)(y, x)


class _RXZ(torch.autograd.Function):
    """<Z> of one RX circuit, given as (cos, sin) of its phase, for hidden states h (..., d):
    the same function as circuit.expectations(h, stack(cs, sn), "RX", n, L), with gradients
    for h, cs and sn from qaa_rx_z_backward (which recomputes the forward per vector, so only
    h is kept for the backward pass)."""

    @staticmethod
    def forward(ctx, h, cs, sn, n: int, L: int):
        x = h.detach().reshape(-1, h.shape[-1]).contiguous()
        cs, sn = cs.detach().contiguous(), sn.detach().contiguous()
        M, d = x.shape
        z, m = torch.empty(M, n), masks(n, L)
        library().qaa_rx_z(x.data_ptr(), M, d, cs.data_ptr(), sn.data_ptr(), n, m.data_ptr(), 0, 0, 0, z.data_ptr())
        ctx.save_for_backward(x, cs, sn)
        ctx.n, ctx.L, ctx.shape = n, L, h.shape
        return z.view(*h.shape[:-1], n)

    @staticmethod
    def backward(ctx, gz):
        x, cs, sn = ctx.saved_tensors
        n, (M, d) = ctx.n, x.shape
        gz = gz.reshape(M, n).float().contiguous()
        gh, gcs, gsn, m = torch.empty_like(x), torch.zeros_like(cs), torch.zeros_like(sn), masks(n, ctx.L)
        library().qaa_rx_z_backward(x.data_ptr(), M, d, cs.data_ptr(), sn.data_ptr(), n, m.data_ptr(),
                                    gz.data_ptr(), gh.data_ptr(), gcs.data_ptr(), gsn.data_ptr())
        return gh.view(ctx.shape), gcs, gsn, None, None


def rx_z(h: torch.Tensor, compiled: torch.Tensor, n: int, L: int) -> torch.Tensor:
    """<Z> (..., n) of an RX circuit compiled to (2, 2^n) = (cos, sin), differentiable in h and
    in `compiled` (so in the angles); h fp32 on the CPU (see `usable`: dtypes=(torch.float32,))."""
    return _RXZ.apply(h, compiled[0], compiled[1], n, L)


def rx_shot_z(h: torch.Tensor, compiled: torch.Tensor, n: int, L: int, shots: int, seed: int = 0,
              counter: int = 0) -> torch.Tensor:
    """The fused kernel's shot estimates of <Z> (..., n) for fp32 h (..., d) on one RX circuit
    compiled to (2, 2^n): vector v of h's flattened rows from the stream (seed, counter, v), as
    qaa_rx_ draws them (tests and references; no gradient)."""
    x = h.detach().reshape(-1, h.shape[-1]).float().contiguous()
    cs, sn = (c.detach().float().contiguous() for c in compiled)
    z = torch.empty(x.shape[0], n)
    library().qaa_rx_z(x.data_ptr(), x.shape[0], x.shape[1], cs.data_ptr(), sn.data_ptr(), n, masks(n, L).data_ptr(),
                       shots, seed, counter, z.data_ptr())
    return z.view(*h.shape[:-1], n)


def multinomial(probs: torch.Tensor, shots: int, seed: int = 0, counter: int = 0,
                threads: int | None = None) -> torch.Tensor:
    """The fused kernel's sampler on its own: counts (R, K) of `shots` draws from each row of
    probs (R, K = 2^n), row r from the stream (seed, counter, r) (tests)."""
    w = probs.detach().float().contiguous()
    R, K = w.shape
    counts = torch.empty_like(w)
    library().qaa_multinomial(w.data_ptr(), R, K.bit_length() - 1, shots, seed, counter, counts.data_ptr(),
                              threads or torch.get_num_threads())
    return counts


def binomial_draws(n: int, p: float, M: int, seed: int = 0) -> torch.Tensor:
    """M draws of Bin(n, p) from the fused kernel's sampler, one stream (tests)."""
    out = torch.empty(M, dtype=torch.int64)
    library().qaa_binomial_draws(n, p, M, seed, out.data_ptr())
    return out
