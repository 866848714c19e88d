"""The serving dtype: auto picks bf16 where the device does it natively, and a bf16 engine keeps
every part in the dtype its design says (the model, the KV cache and the LoRA/prefix banks in
bf16; QAA's circuit bank and the logits in fp32). Accuracy against fp32, per adapter type and
per row of a mixed batch, is in tests/adapters/test_generic.py; the kernels', in
test_cpu_kernels.py. Nothing here needs a CPU with bf16: torch does bf16 math on any CPU."""

import pytest
import torch

from engine.engine import Engine, QaaError, cpu_bf16, pick_dtype
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, make

# Flags lines as /proc/cpuinfo prints them (trimmed): Sapphire Rapids, Zen 4, Ice Lake, ARM.
SPR = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
ICX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
CPUS = [("sapphire-rapids", SPR, "amx"), ("zen4", ZEN4, "avx512_bf16"), ("ice-lake", ICX, None), ("arm", ARM, None),
        ("no-cpuinfo", "", None)]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("name,info,found", CPUS, ids=[c[0] for c in CPUS])
def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(name, info, found):
    assert cpu_bf16(info) == found
    assert pick_dtype("auto", CPU, info) == (torch.bfloat16 if found else torch.float32)
    assert pick_dtype("auto", CUDA, info) == torch.bfloat16  # CUDA: bf16 whatever the host CPU


@pytest.mark.parametrize("given,want", [("float32", torch.float32), ("fp32", torch.float32),
                                        ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                        ("float16", torch.float16), ("fp16", torch.float16)])
def test_a_named_dtype_overrides_auto_on_either_device(given, want):
    for device in (CPU, CUDA):
        for info in (SPR, ICX):
            assert pick_dtype(given, device, info) == want


def test_unset_dtype_reads_the_environment_else_auto(monkeypatch):
    monkeypatch.setenv("QAA_DTYPE", "bfloat16")
    assert pick_dtype(None, CPU, ICX) == torch.bfloat16
    monkeypatch.delenv("QAA_DTYPE")
    assert pick_dtype(None, CPU, ICX) == torch.float32 and pick_dtype(None, CPU, SPR) == torch.bfloat16
    with pytest.raises(QaaError, match="float64"):
        pick_dtype("float64", CPU, SPR)


@pytest.fixture(scope="module")
def bf16(tiny_dir):
    return Engine(tiny_dir, device="cpu", dtype="bfloat16", max_batch=4, max_seq_len=64, max_adapters=4)


def test_a_bf16_engine_keeps_each_part_in_its_dtype(bf16):
    e = bf16
    assert all(t.dtype == torch.bfloat16 for t in e.model.state_dict().values() if t.is_floating_point())
    assert e.cache.k[0].dtype == e.cache.v[0].dtype == torch.bfloat16
    for case in CASES:
        e.load_adapter(case.name, make(case, e.shape))
    banks = e.adapters.banks
    assert all(t.dtype == torch.bfloat16 for A, Bt in banks["lora"].mods.values() for t in (A, Bt))
    assert banks["prefix"].kv_bank.dtype == torch.bfloat16
    for *circuit, upb in banks["qaa"].mods.values():  # the circuit and <Z> stay fp32; [W_up | b] is a weight
        assert all(c.dtype == torch.float32 for c in circuit) and upb.dtype == torch.bfloat16
    logits = e.model(torch.tensor([[5, 6, 7]]))
    assert logits.dtype == torch.float32  # what the sampler, logprobs, penalties and grammars see
    for case in CASES:
        e.adapters.unload(case.name)


def test_bf16_sampling_penalties_and_logprobs_run_on_fp32_logits(bf16):
    """Sampling with every logit adjustment, and logprobs, on a bf16 engine; the logprobs are
    computed in fp32 (not all of them are bf16 numbers, as a bf16 log-softmax's would be)."""
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3,
                        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={7: -100.0}, seed=3, logprobs=3,
                        ignore_eos=True)
    seq = bf16.new_sequence(bf16.encode_prompt("hello there"), sp)
    bf16.run([seq])
    assert len(seq.out_ids) == 6 and 7 not in seq.out_ids
    lps = []
    for lp, top in seq.logprobs:
        assert len(top) == 3 and top[0][1] >= lp - 1e-6
        lps += [lp, *(v for _, v in top)]
    lps = torch.tensor(lps)
    assert lps.isfinite().all() and not torch.equal(lps.bfloat16().float(), lps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 64])
def test_packed_bf16_weights_give_the_plain_matmul(dtype, M):
    """bf16 on the CPU packs weights for oneDNN (when this torch can): without a bias the same
    numbers as x @ wt, bit for bit, at any number of rows; a bias is added before the one
    rounding (x @ wt + b rounds twice), so that is within bf16's precision of the fp32 sum.
    fp32 is never packed."""
    from engine.model import frozen_matmul, pack_weight

    g = torch.Generator().manual_seed(M)
    wt, b = torch.randn(96, 160, generator=g).to(dtype), torch.randn(160, generator=g).to(dtype)
    x = torch.randn(M, 3, 96, generator=g).to(dtype)
    packed = pack_weight(wt)
    assert packed is None if dtype == torch.float32 else True
    assert torch.equal(frozen_matmul(x, wt, None, packed), x @ wt)
    want = x.float() @ wt.float() + b.float()
    torch.testing.assert_close(frozen_matmul(x, wt, b, packed).float(), want, rtol=2**-7, atol=1e-5 * want.abs().max().item())


def test_a_bf16_cpu_engine_packs_the_gemms_it_runs(bf16):
    from engine.model import pack_weight

    if pack_weight(torch.zeros(4, 4, dtype=torch.bfloat16)) is None:
        pytest.skip("this torch has no oneDNN bf16 linear: the plain matmul serves")
    blk = bf16.model.model.layers[0]
    assert all(p is not None for p in (blk.self_attn.qkv_packed, blk.self_attn.o_proj.packed, blk.mlp.gate_up_packed,
                                       blk.mlp.down_proj.packed, bf16.model.lm_head.packed))
