"""Decoding: greedy against transformers' generate, batch independence, sampling semantics."""

import pytest
import torch

from engine.engine import Engine
from engine.sampling import SamplingParams, apply_repetition_penalty, warp
from engine.tokenizer import StreamDecoder, Tokenizer

PROMPTS = ["hello there", "a much longer prompt with several words in it", "x", "¿qué tal? 😀"]


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    return Engine(tiny_dir, device="cpu", max_batch=8, max_seq_len=128)


def _one_by_one(engine, prompts, params):
    return [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]


def test_batched_greedy_equals_each_row_alone(tiny_engine):
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (20, 7, 15, 12)]
    batched = tiny_engine.generate(PROMPTS, params)
    alone = _one_by_one(tiny_engine, PROMPTS, params)
    for b, a, p in zip(batched, alone, params):
        assert b.token_ids == a.token_ids
        assert len(b.token_ids) == p.max_new_tokens and b.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    sp = SamplingParams(max_new_tokens=24, temperature=1.3, top_k=40, top_p=0.95, seed=1234, ignore_eos=True)
    alone = tiny_engine.generate([PROMPTS[0]], sp)[0].token_ids
    again = tiny_engine.generate([PROMPTS[0]], sp)[0].token_ids
    mates = [SamplingParams(max_new_tokens=9, temperature=0.7, seed=s, ignore_eos=True) for s in (1, 2)]
    in_batch = tiny_engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [mates[0], sp, mates[1]])[1].token_ids
    other_seed = tiny_engine.generate([PROMPTS[0]], SamplingParams(**{**sp.__dict__, "seed": 99}))[0].token_ids
    assert alone == again == in_batch
    assert alone != other_seed


def test_stop_string_ends_text_before_it(tiny_engine):
    sp = SamplingParams(max_new_tokens=30, ignore_eos=True)
    full = tiny_engine.generate([PROMPTS[1]], sp)[0].text
    stop = full[10:13]
    cut = full.find(stop)
    out = tiny_engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:cut]


def test_eos_finishes_with_stop(tiny_dir):
    """Generation ends at the first EOS id, which is not part of the text."""
    engine = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=64)
    free = engine.generate(["abc"], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    engine.tokenizer.eos_ids = frozenset({free.token_ids[3]})
    out = engine.generate(["abc"], SamplingParams(max_new_tokens=10))[0]
    assert out.token_ids == free.token_ids[:4] and out.finish_reason == "stop"
    assert out.text == engine.tokenizer.decode(free.token_ids[:3])


def test_context_limit_truncates_with_length(tiny_dir):
    engine = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=16)
    out = engine.generate(["0123456789"], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.prompt_tokens + len(out.token_ids) == 16


def test_sampler_matches_transformers_logits_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=g) * 3
    history = torch.randint(0, 500, (40,), generator=g)
    for t, k, p, rp in [(0.7, 0, 0.9, 1.3), (1.5, 20, 1.0, 1.0), (1.0, 50, 0.5, 0.8), (0.3, 5, 0.99, 1.1)]:
        ref = RepetitionPenaltyLogitsProcessor(rp)(history[None], logits.clone())
        ref = TemperatureLogitsWarper(t)(history[None], ref)
        if k:
            ref = TopKLogitsWarper(k)(history[None], ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(history[None], ref)
        ours = warp(apply_repetition_penalty(logits[0].clone(), history, rp), SamplingParams(temperature=t, top_k=k, top_p=p))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref[0]))
        kept = ~torch.isinf(ours)
        assert torch.allclose(ours[kept], ref[0][kept], atol=1e-6)


def test_stream_decoder_reassembles_multibyte_text(tiny_dir):
    tok = Tokenizer(tiny_dir)
    text = "naïve café — 😀 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # bytes, so characters are split across tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_invalid_sampling_params_are_named():
    from engine.errors import InputError

    for kwargs, word in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                         ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop")]:
        with pytest.raises(InputError, match=word):
            SamplingParams(**kwargs)


# --- the default model -------------------------------------------------------------------------

def test_default_model_greedy_matches_transformers_generate(default_dir):
    from transformers import AutoModelForCausalLM

    engine = Engine(default_dir, device="cpu", max_batch=3)
    prompts = ["The three primary colors are", "def add(a, b):", "Once upon a time, in a small village,"]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=32))
    ref = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    for p, o in zip(prompts, ours):
        ids = torch.tensor([engine.tokenizer.encode(p)])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        ref_ids = out[0, ids.shape[1]:].tolist()
        assert o.token_ids == ref_ids, p
        assert len(o.token_ids) == 32


def test_default_chat_template_matches_transformers(default_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(default_dir)
    tok = Tokenizer(default_dir)
    for msgs in ([{"role": "user", "content": "Who are you?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]):
        assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = "Ünïcode, code `x = 1`, and 😀."
    assert tok.encode(text) == ref(text).input_ids


def test_a_row_whose_bookkeeping_fails_ends_alone(tiny_engine):
    """A row whose own append raises (stop strings, detokenizing) finishes with 'error' and
    its exception; the rows beside it go on exactly as without it."""
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True) for _ in PROMPTS[:3]]
    clean = tiny_engine.generate(PROMPTS[:3], params)
    seqs = [tiny_engine.new_sequence(tiny_engine.encode_prompt(p), sp) for p, sp in zip(PROMPTS[:3], params)]
    real = seqs[1].append

    def broken(token):
        if len(seqs[1].out_ids) >= 4:
            raise RuntimeError("bookkeeping failed")
        return real(token)

    seqs[1].append = broken
    tiny_engine.run(seqs)
    assert seqs[1].finish_reason == "error" and "bookkeeping" in str(seqs[1].error)
    assert len(seqs[1].out_ids) == 4
    assert [s.out_ids for s in (seqs[0], seqs[2])] == [clean[0].token_ids, clean[2].token_ids]


def test_logit_bias_bans_a_token_and_min_tokens_holds_back_eos(tiny_dir):
    engine = Engine(tiny_dir, device="cpu", max_batch=2, max_seq_len=64)
    free = engine.generate(["abc"], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].token_ids
    banned = engine.generate(["abc"], SamplingParams(max_new_tokens=10, ignore_eos=True,
                                                    logit_bias={free[0]: -100}))[0].token_ids
    assert free[0] not in banned
    k = next(i for i in range(1, 10) if free[i] not in free[:i])  # a token first drawn at step k
    engine.tokenizer.eos_ids = frozenset({free[k]})
    assert engine.generate(["abc"], SamplingParams(max_new_tokens=10))[0].token_ids == free[: k + 1]
    held = engine.generate(["abc"], SamplingParams(max_new_tokens=10, min_tokens=k + 3))[0]
    assert len(held.token_ids) >= k + 3 and free[k] not in held.token_ids[: k + 3]
    # a stop token ends generation as EOS does, ignore_eos or not
    cut = engine.generate(["abc"], SamplingParams(max_new_tokens=10, ignore_eos=True, stop_token_ids=[free[k]]))[0]
    assert cut.token_ids == free[: k + 1] and cut.finish_reason == "stop"


def test_presence_and_frequency_penalties_follow_openais_definition():
    from engine.sampling import adjust

    g = torch.Generator().manual_seed(0)
    logits, out = torch.randn(50, generator=g), [3, 3, 7, 3, 9]
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, logit_bias={5: 2.5, 3: -1.0})
    got = adjust(logits.clone(), p, None, out, ())
    want = logits.clone()
    for t in range(50):  # mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
        c = out.count(t)
        want[t] -= c * 0.3 + (c > 0) * 0.7
    want[5] += 2.5
    want[3] -= 1.0
    assert torch.allclose(got, want, atol=1e-6)
