"""The captured decode step (engine.graph) against the eager one, in lockstep.

Two engines on the same tiny model and the same adapters (every case of the adapter table,
plus base-model rows) run one schedule as the server's scheduler runs it: compact, admit and
prefill newcomers, decode the running rows, newcomers join the next step, rows finish at
their own lengths. Every decode step's logits of the captured step are compared with the
eager engine's; both then take the eager side's tokens, so the two stay in lockstep. The
eager engine has its own KV cache, so a captured step that wrote outside its rows (padding
rows into an admitted sequence's slot) would show up in later steps' logits.
"""

import random

import pytest
import torch
from torch._dynamo.utils import counters

from adapters.qaa import QAAConfig
from engine import steps
from engine.engine import Engine
from engine.graph import GraphConfig, bucket, buckets
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, Case, make

MAX_BATCH, MAX_SEQ = 8, 32


def engines(tiny_dir, cfg, dtype=None):
    eager = Engine(tiny_dir, device="cpu", dtype=dtype, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, max_adapters=8)
    compiled = Engine(tiny_dir, device="cpu", dtype=dtype, max_batch=MAX_BATCH, max_seq_len=MAX_SEQ, max_adapters=8,
                      compile=GraphConfig(**{**cfg, "warm_up": False}))
    names = []
    for i, case in enumerate(CASES):
        ad = make(case, eager.shape, seed=i)
        for e in (eager, compiled):
            e.load_adapter(case.name, ad)
        names.append(case.name)
    if cfg.get("warm_up", True):
        compiled.graph.warm_up()  # after loading: the banks' layout is in the captured shapes
    return eager, compiled, names + [None]


def lockstep(eager, compiled, names, n_steps, seed=0, fixed=None, atol=1e-4):
    """Run the schedule for n_steps scheduler steps, asserting equal logits at every decode;
    returns the largest difference. fixed: adapter names admitted at once, then decoding
    together to the end (no churn)."""
    rng = random.Random(seed)
    running, worst = [], 0.0
    queue = list(fixed) if fixed is not None else None
    for _ in range(n_steps):
        for e, k in ((eager, 0), (compiled, 1)):
            e.compact([pair[k] for pair in running])
        running.sort(key=lambda pair: pair[0].slot)
        admitted = []
        while len(running) + len(admitted) < MAX_BATCH and (queue if fixed is not None else rng.random() < 0.6):
            name = queue.pop(0) if fixed is not None else rng.choice(names)
            prompt = [rng.randrange(3, 300) for _ in range(rng.randint(2, 6))]
            sp = SamplingParams(max_new_tokens=n_steps + 1 if fixed is not None else rng.randint(1, 14), ignore_eos=True)
            pair = [e.new_sequence(prompt, sp, name) for e in (eager, compiled)]
            for e, s in zip((eager, compiled), pair):
                e.admit(s)
            admitted.append(pair)
        if admitted:  # prefill is eager on both sides: the same computation, the same first tokens
            for e, k in ((eager, 0), (compiled, 1)):
                seqs = [p[k] for p in admitted]
                steps.prefill(e.model, e.cache, seqs, e.seams_for)
            assert [p[0].out_ids for p in admitted] == [p[1].out_ids for p in admitted]
        if running:
            seqs_e, seqs_c = [p[0] for p in running], [p[1] for p in running]
            assert compiled.graph.serves(seqs_c)  # rows in slots 0..B-1, as the scheduler keeps them
            with torch.inference_mode():
                ref = eager.model(torch.tensor([[s.out_ids[-1]] for s in seqs_e]), torch.tensor([[s.pos] for s in seqs_e]),
                                  eager.cache, torch.tensor([s.slot for s in seqs_e]), eager.seams_for(seqs_e))[:, 0]
            got = compiled.graph.logits(seqs_c)
            worst = max(worst, (got - ref).abs().max().item())
            assert torch.allclose(got, ref, atol=atol, rtol=0), (got - ref).abs().max().item()
            steps._sample_into(seqs_e, ref)
            for s_e, s_c in zip(seqs_e, seqs_c):
                s_c.append(s_e.out_ids[-1])
        for e, k in ((eager, 0), (compiled, 1)):
            for pair in running + admitted:
                if pair[k].finished and pair[k].slot >= 0:
                    e.cache.free(pair[k].slot)
                    pair[k].slot = -1
        running = [p for p in running + admitted if not p[0].finished]
    return worst


def test_buckets():
    assert buckets(1, 16) == [1, 2, 4, 8, 16] and buckets(1, 12) == [1, 2, 4, 8, 12]
    assert buckets(128, 300) == [128, 256, 300] and buckets(128, 64) == [64]
    assert bucket(5, [1, 2, 4, 8]) == 8 and bucket(4, [1, 2, 4, 8]) == 4


def test_static_step_equals_eager(tiny_dir):
    """The static form itself, not compiled (backend=None): padding rows, the scratch slot,
    the KV read as a view of fixed length, StaticSeams through the banks' static methods ==
    the eager step, over churning mixed batches of every adapter case and base rows."""
    eager, compiled, names = engines(tiny_dir, dict(backend=None, min_length=16))
    lockstep(eager, compiled, names, 60, atol=1e-5)
    g = compiled.graph
    assert len({B for B, _ in g.steps}) >= 3 and {S for _, S in g.steps} == {16, 32}  # the schedule moved between buckets
    assert g.fallbacks == 0


def test_no_recompiles_over_200_changing_steps(tiny_dir):
    """torch.compile (aot_eager: dynamo's tracing, guards and AOT functionalization of the
    in-place KV writes, without inductor's code generation) captures the whole step
    (fullgraph=True fails on any graph break), and after the warm-up of every bucket, 200
    scheduler steps over changing sizes, rows finishing and joining, and changing adapter
    mixes compile nothing more: recompiles are decided by dynamo's guards, before any backend,
    so this holds for inductor as well. The logits equal eager's at every step."""
    eager, compiled, names = engines(tiny_dir, dict(backend="aot_eager", min_length=16))
    g = compiled.graph
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        lockstep(eager, compiled, names, 200, seed=1)
    assert counters["stats"]["unique_graphs"] == graphs
    assert {B for B, _ in g.steps} == set(g.batches) and {S for _, S in g.steps} == set(g.lengths)
    assert g.fallbacks == 0


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.08)], ids=["fp32", "bf16"])
def test_inductor_step_equals_eager(tiny_dir, dtype, atol):
    """Inductor's generated code for one bucket (7 rows: every adapter case and a base row,
    padded to 8) computes the eager step's logits. In bf16 the two sides round differently
    (eager: oneDNN-packed GEMMs and the C kernels; compiled: plain matmuls and the banks' torch
    paths), each within ~2% of fp32's largest logit (~2 here; tests/adapters/test_generic.py)."""
    eager, compiled, names = engines(tiny_dir, dict(backend="inductor", min_length=MAX_SEQ, warm_up=False), dtype)
    lockstep(eager, compiled, names, 6, fixed=names, atol=atol)
    assert set(compiled.graph.steps) == {(8, MAX_SEQ)}


def test_emulated_qaa_rows_take_the_eager_step(tiny_dir):
    """Shot emulation samples on the host side of the step; a batch with such a row is not captured."""
    e = Engine(tiny_dir, device="cpu", max_batch=2, max_seq_len=MAX_SEQ, compile=GraphConfig(backend=None))
    ad = make(Case("qaa-shots", "qaa", lambda: QAAConfig(circuit_layers=1, qaa_shots=64)), e.shape)
    e.load_adapter("shots", ad)
    out = e.generate(["abc", "de"], SamplingParams(max_new_tokens=3, ignore_eos=True), adapters=["shots", None])
    assert [len(o.token_ids) for o in out] == [3, 3]
    assert e.graph.fallbacks == 2 and not e.graph.steps
