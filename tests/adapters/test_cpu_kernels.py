"""The fused CPU kernels (adapters/cpu_kernels.c) against the torch math they replace.

The QAA reference is circuit.expectations (itself checked against PennyLane in
test_qaa_circuit.py), row by row; the LoRA reference is x @ A.T @ B.T; both in fp32. The
serving kernels run on fp32 and on bf16 activations: a bf16 result is the fp32 reference on the
same (bf16) inputs, rounded once. Whole-model coverage (the banks inside a mixed batch, with
and without the kernels, fp32 and bf16) is in test_generic.py.
"""

import warnings

import pytest
import torch

from adapters import cpu_kernels
from adapters.circuit import compile_circuit, expectations


def check_rounded_once(got: torch.Tensor, want: torch.Tensor) -> None:
    """got (in its dtype) == want (fp32, computed from the same inputs), up to fp32 summation
    order and, for bf16, one rounding: within bf16's relative precision 2^-8, and equal to
    want rounded to bf16 almost everywhere (an fp32 difference in the last bits can only move a
    value lying next to a rounding boundary)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5)
    assert (got == want.to(got.dtype)).float().mean() > 0.99


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,L,T", [(64, 1, 3), (100, 2, 3), (576, 2, 3), (300, 3, 3), (576, 2, 100)])
def test_qaa_rx_kernel_equals_circuit_math(lib, d, L, T, dtype):
    """T = 100: 300 vectors, split over OpenMP threads. The circuit, <Z> and [W_up | b] are
    fp32 whatever h's dtype."""
    n = (d - 1).bit_length()
    g = torch.Generator().manual_seed(d + L)
    S = 4
    phase = torch.stack([compile_circuit(torch.rand(L, n, generator=g) * 6.3, "RX") for _ in range(S)])
    upb = torch.randn(S, n + 1, d, generator=g)
    h = torch.randn(5, T, d, generator=g).to(dtype)
    rows, slots = torch.tensor([4, 0, 2]), torch.tensor([1, 3, 1])
    want = h.float().clone()
    for r, s in zip(rows.tolist(), slots.tolist()):
        z1 = expectations(h[r].float(), phase[s], "RX", n, L, with_one=True)  # (T, n + 1)
        want[r] = h[r].float() + z1 @ upb[s]
    got = cpu_kernels.qaa_rx_(h.clone(), rows, slots, phase, upb, n, L)
    assert got.dtype == dtype
    check_rounded_once(got[[4, 0, 2]], want[[4, 0, 2]])
    assert torch.equal(got[[1, 3]], h[[1, 3]])  # rows not listed are untouched


@pytest.mark.parametrize("d,L,tokens", [(576, 2, 100), (100, 3, 7), (64, 1, 1)])
def test_rx_z_values_and_gradients_equal_autograd_through_the_circuit(lib, d, L, tokens):
    """Training's kernel pair (forward + hand-written backward, split over threads when there
    are many tokens) == autograd through circuit_z, for h and for the angles."""
    from adapters.circuit import circuit_z

    n = (d - 1).bit_length()
    g = torch.Generator().manual_seed(d)
    theta0, h0 = torch.rand(L, n, generator=g) * 6.3, torch.randn(2, tokens, d, generator=g)
    w = torch.randn(2, tokens, n, generator=g)
    out = []
    for f in (lambda h, t: circuit_z(h, t, "RX"), lambda h, t: cpu_kernels.rx_z(h, compile_circuit(t, "RX"), n, L)):
        h, theta = h0.clone().requires_grad_(), theta0.clone().requires_grad_()
        z = f(h, theta)
        (z * w).sum().backward()
        out.append((z.detach(), h.grad, theta.grad))
    for want, got in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("act,bank", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                      (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32-bank"])
@pytest.mark.parametrize("T", [2, 5], ids=["one-thread", "split"])  # split from 8 (row, token) pairs
def test_lora_kernel_adds_into_a_slice(lib, T, act, bank):
    g = torch.Generator().manual_seed(0)
    S, R, din, dout = 4, 8, 48, 40
    A, Bt = torch.randn(S, R, din, generator=g).to(bank), torch.randn(S, R, dout, generator=g).to(bank)
    ranks = torch.tensor([0, 8, 3, 0])  # slot 3 holds an adapter without this module
    x = torch.randn(4, T, din, generator=g).to(act)
    wide = torch.randn(4, T, dout + 16, generator=g).to(act)
    y = wide[..., 10 : 10 + dout]  # a column slice, as q of a fused q|k|v output
    want = wide.float().clone()
    rows, slots = torch.tensor([0, 1, 3]), torch.tensor([1, 2, 3])
    for r, s in zip(rows.tolist(), slots.tolist()):
        k = ranks[s].item()
        want[r, :, 10 : 10 + dout] += x[r].float() @ A[s, :k].float().T @ Bt[s, :k].float()
    before = wide.clone()
    cpu_kernels.lora_(y, x, rows, slots, ranks, A, Bt)
    check_rounded_once(wide[[0, 1]], want[[0, 1]])
    assert torch.equal(wide[:, :, :10], before[:, :, :10]) and torch.equal(wide[:, :, 10 + dout :], before[:, :, 10 + dout :])
    assert torch.equal(wide[[2, 3]], before[[2, 3]])  # row 2 is not listed; row 3's slot has rank 0


def test_masks_are_the_readout_parities():
    from adapters.circuit import readout

    for n, L in [(3, 1), (6, 2), (10, 2), (7, 5)]:
        m = cpu_kernels.masks(n, L)
        j = torch.arange(1 << n)
        for q in range(n):
            parity = torch.tensor([bin(i & int(m[q])).count("1") % 2 for i in j.tolist()])
            assert torch.equal(readout(n, L, "cpu")[:, q], (1 - 2 * parity).float())


def test_no_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("QAA_CACHE_DIR", str(tmp_path))
    cpu_kernels.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_kernels.library() is None
        assert any("using the torch path" in str(w.message) for w in caught)
        assert not cpu_kernels.usable(torch.zeros(2, 1, 4))
        assert not list((tmp_path / "kernels").glob("*"))  # no half-built file left behind
    finally:
        cpu_kernels.library.cache_clear()


# --- the CPython entry (cpu_entry.c) and its ctypes fallback ----------------------------------

def _serving_calls(dtype):
    """Both serving kernels through their plans on one set of inputs: (LoRA's y, QAA's h)."""
    g = torch.Generator().manual_seed(7)
    S, R, d, n, L = 3, 8, 100, 7, 2
    A, Bt = torch.randn(S, R, d, generator=g).to(dtype), torch.randn(S, R, d, generator=g).to(dtype)
    ranks, rows, slots = torch.tensor([0, 8, 5]), torch.tensor([2, 0]), torch.tensor([1, 2])
    x = torch.randn(3, 4, d, generator=g).to(dtype)
    y = torch.randn(3, 4, d, generator=g).to(dtype)
    cpu_kernels.lora_plan(rows, slots, ranks, A, Bt, dtype)(y, x)
    phase = torch.stack([compile_circuit(torch.rand(L, n, generator=g) * 6.3, "RX") for _ in range(S)])
    upb = torch.randn(S, n + 1, d, generator=g).to(dtype)
    h = torch.randn(3, 4, d, generator=g).to(dtype)
    cpu_kernels.qaa_rx_plan(rows, slots, phase, upb, n, L, dtype)(h)
    return y, h


@pytest.fixture
def ctypes_only(monkeypatch):
    """The plans bound through ctypes, as where the library was built without Python's headers."""
    monkeypatch.setenv(cpu_kernels.ENTRY_SWITCH, "0")
    cpu_kernels.entry.cache_clear()
    yield
    monkeypatch.delenv(cpu_kernels.ENTRY_SWITCH)
    cpu_kernels.entry.cache_clear()


def test_the_entry_is_built_where_pythons_headers_are(lib):
    if cpu_kernels._python_include() is None:
        pytest.skip("no Python.h for this interpreter: the plans call the kernels through ctypes")
    mod = cpu_kernels.entry()
    assert mod is not None, "Python's headers are here and the entry did not build"
    assert set(mod.lora_variants) == set(cpu_kernels.LORA_VARIANTS.values())
    assert set(mod.qaa_variants) == {"f32", "bf16", "bf16_w16"}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_entry_and_ctypes_give_the_same_bits(lib, dtype, request):
    via_entry = _serving_calls(dtype)
    request.getfixturevalue("ctypes_only")
    assert cpu_kernels.entry() is None
    via_ctypes = _serving_calls(dtype)
    for a, b in zip(via_entry, via_ctypes):
        assert torch.equal(a, b)


def test_entry_refuses_wrong_calls_before_touching_memory(lib):
    mod = cpu_kernels.entry()
    if mod is None:
        pytest.skip("built without Python's headers")
    with pytest.raises(TypeError, match="lora takes 18 integer arguments"):
        mod.lora(0, 1, 2)
    with pytest.raises(ValueError, match="qaa: no variant 7"):
        mod.qaa(7, *[0] * 15)
    with pytest.raises(TypeError):
        mod.qaa(0, *["0"] * 15)


def test_plans_refuse_activations_of_another_dtype(lib):
    A = torch.zeros(2, 4, 8)
    plan = cpu_kernels.lora_plan(torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 4]), A, A.clone(), torch.float32)
    with pytest.raises(TypeError, match="lora plan"):
        plan(torch.zeros(1, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 8, dtype=torch.bfloat16))


def test_without_pythons_headers_the_library_still_serves_through_ctypes(monkeypatch, tmp_path, lib):
    monkeypatch.setattr(cpu_kernels, "_python_include", lambda: None)
    monkeypatch.setenv("QAA_CACHE_DIR", str(tmp_path))
    cpu_kernels.library.cache_clear()
    cpu_kernels.entry.cache_clear()
    try:
        assert cpu_kernels.library() is not None and cpu_kernels.entry() is None
        got = _serving_calls(torch.float32)
    finally:
        cpu_kernels.library.cache_clear()
        cpu_kernels.entry.cache_clear()
    want = _serving_calls(torch.float32)  # the usual library, through the entry where it is built
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_lora_plan_adds_into_a_column_range_and_checks_it(lib, dtype):
    """plan(y, x, col) on a fused q|k|v output == the kernel on the column slice, bit for bit,
    columns outside untouched; a range or shape that does not fit is refused, not written."""
    g = torch.Generator().manual_seed(3)
    S, R, din, dout = 3, 8, 48, 40
    A, Bt = torch.randn(S, R, din, generator=g).to(dtype), torch.randn(S, R, dout, generator=g).to(dtype)
    ranks, rows, slots = torch.tensor([0, 8, 4]), torch.tensor([0, 2]), torch.tensor([2, 1])
    x = torch.randn(3, 1, din, generator=g).to(dtype)
    wide = torch.randn(3, 1, dout + 30, generator=g).to(dtype)
    want = wide.clone()
    cpu_kernels.lora_(want[..., 10 : 10 + dout], x, rows, slots, ranks, A, Bt)
    plan = cpu_kernels.lora_plan(rows, slots, ranks, A, Bt, dtype)
    got = plan(wide.clone(), x, 10)
    assert torch.equal(got, want) and not torch.equal(got, wide)
    before = wide.clone()
    for bad in (lambda: plan(wide, x, 31), lambda: plan(wide, x, -1), lambda: plan(wide[:2], x, 0),
                lambda: plan(wide, x[..., :40], 0)):
        with pytest.raises(ValueError, match="lora plan"):
            bad()
    assert torch.equal(wide, before)
