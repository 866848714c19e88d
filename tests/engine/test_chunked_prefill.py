"""Chunked prefill: decode tokens and prompt chunks of other rows in one forward.

Every sampled distribution must equal the one the row gets alone, through its own adapter's
differentiable forward over its whole sequence (no cache, no banks): whatever the chunk
sizes, whichever rows decode beside the chunks, and however the decode rows' slots lie
(consecutive, with chunk rows between them, or scattered).
"""

import pytest
import torch

from adapters.seams import SingleSeams
from engine import steps
from engine.engine import Engine
from engine.layout import mixed
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, make


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(tiny_dir, device="cpu", max_batch=16, max_seq_len=96, max_adapters=8)


def _reference(engine, ad, ids):
    with torch.no_grad():
        return engine.model(torch.tensor([ids]), seams=SingleSeams(ad) if ad is not None else None)[0]  # (T, V)


# which rows decode from the start (their prompts prefilled whole in step 0); the others
# are fed in chunks while those decode
PATTERNS = {
    "chunk-rows-between-decode-rows": lambda n: set(range(0, n, 2)),  # idle rows in the decode span
    "decode-rows-scattered": lambda n: {0, n - 1},  # a gather of two far-apart slots
    "all-chunked": lambda n: set(),
}


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_chunks_beside_decode_rows_equal_each_row_alone(engine, pattern, chunk, monkeypatch):
    made = {}
    for i, case in enumerate(CASES):
        made[case.name] = make(case, engine.shape, seed=30 + i)
        engine.load_adapter(case.name, made[case.name])
    names = [c.name for c in CASES] + [None]
    g = torch.Generator().manual_seed(len(pattern) + chunk)
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist()
               for n in torch.randint(chunk + 2, 20, (len(names),), generator=g)]
    seqs = [engine.new_sequence(p, SamplingParams(max_new_tokens=5, ignore_eos=True), a) for p, a in zip(prompts, names)]
    seen = {id(s): [] for s in seqs}
    real = steps._sample_into

    def capture(sampled, logits):
        for s, row in zip(sampled, logits):
            seen[id(s)].append(row.clone())
        return real(sampled, logits)

    monkeypatch.setattr(steps, "_sample_into", capture)
    first = PATTERNS[pattern](len(seqs))
    mixed_steps = 0
    try:
        for s in seqs:
            engine.admit(s)
        if first:
            steps.prefill(engine.model, engine.cache, [s for i, s in enumerate(seqs) if i in first], engine.seams_for)
        while any(not s.finished for s in seqs):
            work = [(s, min(chunk, len(s.prompt_ids) - s.prefilled) if s.prefilling else 1)
                    for s in seqs if not s.finished]
            mixed_steps += any(n == 1 and not s.prefilling for s, n in work) and any(s.prefilling for s, _ in work)
            texts = steps.step(engine.model, engine.cache, work, engine.seams_for)
            assert [t is None for t in texts] == [s.prefilling for s, _ in work]
    finally:
        for s in seqs:
            engine.cache.free(s.slot)
        for c in CASES:
            engine.adapters.unload(c.name)
    assert mixed_steps or not first
    for s, name in zip(seqs, names):
        assert len(s.out_ids) == 5 and s.finish_reason == "length"
        ref = _reference(engine, made.get(name), s.prompt_ids + s.out_ids[:-1])
        n = len(s.prompt_ids)
        for k, logits in enumerate(seen[id(s)]):
            diff = (logits - ref[n - 1 + k]).abs().max().item()
            assert diff <= 1e-5, f"{name} token {k}: {diff}"


def test_layout_reads_decode_rows_as_a_view_when_it_can():
    """Consecutive slots: a view; holes filled by chunk rows: a view with idle rows; slots far
    apart: a gather. Tokens are decode tokens first, then each chunk's."""
    lay = mixed([(0, 5), (1, 7), (2, 3)], [], "cpu")
    (sp,) = lay.spans
    assert (sp.first, sp.B, sp.sel) == (0, 3, None) and sp.length == 8
    lay = mixed([(4, 5), (2, 7)], [(3, 0, 4)], "cpu")
    dec, ch = lay.spans
    assert (dec.first, dec.B, dec.sel.tolist()) == (2, 3, [2, 0])
    assert dec.mask[1, 0, 0].tolist() == [True] + [False] * 7  # the idle row (slot 3) sees key 0 only
    assert (ch.start, ch.n, ch.first, ch.length) == (2, 4, 3, 4)
    assert lay.rows.tolist() == [4, 2, 3, 3, 3, 3] and lay.pos.tolist() == [5, 7, 0, 1, 2, 3]
    (sp,) = mixed([(0, 1), (9, 1)], [], "cpu").spans
    assert sp.first is None and sp.slots.tolist() == [0, 9]


@pytest.mark.parametrize("chunk", [4, None], ids=["in-chunks", "whole"])
@pytest.mark.parametrize("case", [None, "prefix", "qaa-rx"])
def test_prompt_logprobs_are_the_models_log_softmax_at_each_prompt_token(engine, case, chunk):
    """Each prompt token after the first gets log p(token | the tokens before it) and the top 3
    at its place, from the full forward's fp32 log-softmax; the first token gets none."""
    c = next((c for c in CASES if c.name == case), None)
    ad = make(c, engine.shape, seed=5) if c else None
    if ad is not None:
        engine.load_adapter("p", ad)
    prompt = torch.randint(3, 250, (15,), generator=torch.Generator().manual_seed(2)).tolist()
    s = engine.new_sequence(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True, logprobs=3, prompt_logprobs=True),
                            "p" if ad is not None else None)
    other = engine.new_sequence([7, 8, 9], SamplingParams(max_new_tokens=4, ignore_eos=True))  # a decode row beside
    try:
        engine.admit(s)
        engine.admit(other)
        steps.prefill(engine.model, engine.cache, [other], engine.seams_for)
        while s.prefilling:
            n = min(chunk or len(prompt), len(prompt) - s.prefilled)
            steps.step(engine.model, engine.cache, [(other, 1), (s, n)], engine.seams_for)
    finally:
        engine.cache.free(s.slot)
        engine.cache.free(other.slot)
        if ad is not None:
            engine.adapters.unload("p")
    ref = _reference(engine, ad, prompt).float().log_softmax(-1)  # (T, V)
    assert len(s.prompt_logprobs) == len(prompt) and s.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        lp, top = s.prompt_logprobs[i]
        assert lp == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        want = ref[i - 1].topk(3)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)
