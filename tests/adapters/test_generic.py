"""Generic adapter properties, for every case of the table (tests/adapters/cases.py)."""

import pytest
import torch

from adapters.files import load_dir, save_dir
from adapters.seams import SingleSeams
from adapters.sora import prune, to_lora
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, IDS, make

TOKENS = torch.tensor([[5, 9, 33, 100, 7, 61, 200, 12, 3, 44, 90]])


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(tiny_dir, device="cpu", max_batch=16, max_seq_len=64, max_adapters=8)  # lora and sora rows share one bank


def ref_logits(engine, ad, tokens=TOKENS):
    with torch.no_grad():
        return engine.model(tokens, seams=SingleSeams(ad) if ad is not None else None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip(case, engine, tmp_path):
    ad = make(case, engine.shape)
    back = load_dir(save_dir(ad, tmp_path / case.name), engine.shape)
    assert back.kind == ad.kind and back.config == ad.config
    assert back.tensors.keys() == ad.tensors.keys()
    for k in ad.tensors:
        assert torch.equal(back.tensors[k], ad.tensors[k]), k
    assert torch.equal(ref_logits(engine, back), ref_logits(engine, ad))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fresh_adapter_is_identity(case, engine):
    fresh = make(case, engine.shape, trained=False)
    trained = make(case, engine.shape)
    base = ref_logits(engine, None)
    if case.identity_at_init:
        assert torch.equal(ref_logits(engine, fresh), base)
    else:
        assert not torch.allclose(ref_logits(engine, fresh), base, atol=1e-3)
    assert not torch.allclose(ref_logits(engine, trained), base, atol=1e-3)


# Largest |logit - fp32 reference| allowed per row and step, as a share of the reference row's
# largest |logit| (about 2 here). bf16 keeps 8 significant bits (rounding 2^-9 = 0.2%) and the
# error grows through the layers, the adapters and the head: measured <= 1.7% for every case
# of the table, 1.2% for the base-model row, with the kernels and with the torch paths. fp16
# (11 bits; the torch paths, the kernels take fp32 and bf16): <= 0.21%.
TOL = {"float32": 5e-6, "bfloat16": 0.04, "float16": 0.01}


@pytest.fixture(scope="module")
def engines(engine, tiny_dir):
    """The module's fp32 engine and a bf16 one over the same checkpoint (same slot counts)."""
    return {"float32": engine, **{d: Engine(tiny_dir, device="cpu", dtype=d, max_batch=16, max_seq_len=64, max_adapters=8)
                                   for d in ("bfloat16", "float16")}}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch-banks"])
def test_mixed_batch_equals_per_row_loop(engines, dtype, kernels, monkeypatch):
    """One batch, two rows per case (two different adapters each) plus a base-model row,
    through the slot banks and the KV cache (prefill, then decode steps) == each row alone
    through its own adapter's forward in fp32; with the banks' fused CPU kernels (decode) and
    with their torch paths only; the engine in fp32, bf16 and fp16 (the reference is always the
    fp32 model: a bf16/fp16 row is within TOL of it, and much further from every other adapter's
    output, so a row served with the wrong adapter or none fails)."""
    from adapters import cpu_kernels

    engine, ref_engine = engines[dtype], engines["float32"]
    calls = {"lora_plan": 0, "qaa_rx_plan": 0}
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    elif cpu_kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    else:  # count the kernels' calls (through the plans the banks bind): served by them, not by a fallback
        for fn in calls:
            def binder(*a, _f=getattr(cpu_kernels, fn), _n=fn):
                plan = _f(*a)
                if plan is None:
                    return None

                def counted(*t):
                    calls[_n] += 1
                    return plan(*t)
                return counted
            monkeypatch.setattr(cpu_kernels, fn, binder)
    names, made = [], {}
    for i, case in enumerate(CASES * 2):
        name = f"{case.name}#{i}"
        made[name] = make(case, engine.shape, seed=i)
        engine.load_adapter(name, made[name])
        names.append(name)
    names.insert(3, None)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (len(names),), generator=g)]
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    seqs = [engine.new_sequence(p, sp, a) for p, a in zip(prompts, names)]
    from engine.steps import decode, prefill

    for s in seqs:
        engine.admit(s)
    step_logits = []
    try:
        with torch.no_grad():
            captured = []
            orig = engine.model.lm_head.forward
            engine.model.lm_head.forward = lambda x: captured.append(orig(x)) or captured[-1]
            prefill(engine.model, engine.cache, seqs, engine.seams_for)
            step_logits.append(captured[-1])
            for _ in range(5):
                decode(engine.model, engine.cache, seqs, engine.seams_for)
                step_logits.append(captured[-1])
    finally:
        engine.model.lm_head.forward = orig
        for s in seqs:
            engine.cache.free(s.slot)
    worst = {}
    for i, (s, name) in enumerate(zip(seqs, names)):
        full = torch.tensor([s.prompt_ids + s.out_ids[:-1]])
        others = [None, *made] if dtype != "float32" else [name]
        refs = {o: ref_logits(ref_engine, made[o] if o else None, full)[0] for o in others}  # (T, V) each
        ref = refs[name]
        n = len(s.prompt_ids)
        for step, logits in enumerate(step_logits):
            assert logits.dtype == torch.float32  # the sampler's input, whatever the model's dtype
            want = ref[n - 1 + step]
            diff = (logits[i].reshape(-1) - want).abs().max().item()
            worst[name] = max(worst.get(name, 0.0), diff / want.abs().max().item())
            assert diff <= TOL[dtype] * want.abs().max().item(), f"{name} step {step}: {diff}"
            if dtype != "float32":  # the tolerance tells adapters apart
                nearest = min((refs[o][n - 1 + step] - want).abs().max().item() for o in refs if o != name)
                assert diff < nearest / 2, f"{name} step {step}: {diff} vs another adapter's {nearest}"
    print(dtype, "worst relative error per row:", {k: round(v, 4) for k, v in worst.items()})  # shown with -s
    served = kernels and getattr(torch, dtype) in cpu_kernels.SUFFIX  # fp16: the torch paths
    assert all(calls.values()) if served else not any(calls.values()), calls
    for name in made:
        engine.adapters.unload(name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cleared_slot_keeps_no_trace(case, engine, tiny_dir):
    """Load A and generate with it, unload it, load B into the same slot: rows see exactly what
    a fresh bank gives B (nothing kept from A: not its weights, nor the routing built for it,
    which the engine reuses while the batch composition repeats)."""
    other = CASES[(CASES.index(case) + 1) % len(CASES)]
    a = make(other if other.kind == case.kind else case, engine.shape, seed=11)
    b = make(case, engine.shape, seed=12)
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    h_a = engine.load_adapter("a", a)
    engine.generate(["some prompt"], sp, adapters=["a"])
    routing = engine.adapters.seams_for([h_a], engine.device)
    assert engine.adapters.seams_for([h_a], engine.device) is routing  # kept while nothing changes
    engine.adapters.unload("a")
    h_b = engine.load_adapter("b", b)
    if h_a.kind == h_b.kind:
        assert h_b.slot == h_a.slot
    fresh = Engine(tiny_dir, device="cpu", max_batch=2, max_seq_len=64, max_adapters=4)
    fresh.load_adapter("b", b)
    used = engine.generate(["some prompt"], sp, adapters=["b"])[0].token_ids
    clean = fresh.generate(["some prompt"], sp, adapters=["b"])[0].token_ids
    engine.adapters.unload("b")
    assert used == clean
    # and a row with no adapter is the base model again
    assert engine.generate(["some prompt"], sp)[0].token_ids == fresh.generate(["some prompt"], sp)[0].token_ids


def test_sora_pruned_and_exported_lora_equal_unpruned(engine):
    case = next(c for c in CASES if c.kind == "sora")
    ad = make(case, engine.shape, seed=3)
    n_zero = sum(int((v == 0).sum()) for k, v in ad.tensors.items() if k.endswith("lora_gate"))
    assert n_zero > 0
    pruned, lora = prune(ad), to_lora(ad)
    assert pruned.n_params() < ad.n_params() and lora.kind == "lora"
    base = ref_logits(engine, ad)
    assert (ref_logits(engine, pruned) - base).abs().max() <= 1e-5
    assert (ref_logits(engine, lora) - base).abs().max() <= 1e-5
