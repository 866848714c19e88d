"""Our forward against transformers' model on the same weights (fp32, max abs diff <= 1e-4)."""

import pytest
import torch

from engine.kv_cache import KVCache
from engine.weights import load_model
from tests.tiny import write_tiny_model

TOL = 1e-4

# One table of checkpoint shapes; every test below runs on each.
CONFIGS = {
    "llama": {},
    "untied-mha": dict(tie_word_embeddings=False, num_key_value_heads=4),
    "mqa-bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "mistral-window": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=5),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(our model, transformers' model) on the same random weights."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_model(tmp_path_factory.mktemp(request.param), seed=1, **CONFIGS[request.param])
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return load_model(path), ref


def _ragged(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def _ref_logits(ref, ids):
    with torch.no_grad():
        return ref(ids[None]).logits[0]  # (T, V)


def test_padded_prefill_with_cache_matches_reference(pair):
    ours, ref = pair
    rows = _ragged(ours.cfg.vocab_size, [11, 4, 17, 1])
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    cache = KVCache(ours.cfg, n_slots=6, max_seq=32)
    slots = torch.tensor([5, 0, 3, 2])  # rows need not use slots in order
    with torch.no_grad():
        logits = ours(tokens, torch.arange(T).expand(len(rows), T), cache, slots)
    for i, r in enumerate(rows):
        diff = (logits[i, : len(r)] - _ref_logits(ref, r)).abs().max().item()
        assert diff <= TOL, f"row {i}: max abs diff {diff}"


def test_decode_steps_at_mixed_positions_match_reference(pair):
    """Rows prefilled to different lengths, then decoded together one token a step."""
    ours, ref = pair
    full = _ragged(ours.cfg.vocab_size, [14, 9, 12], seed=3)
    prompt_lens = [6, 2, 9]
    cache = KVCache(ours.cfg, n_slots=3, max_seq=32)
    slots = torch.tensor([2, 0, 1])
    with torch.no_grad():
        T = max(prompt_lens)
        tokens = torch.zeros(3, T, dtype=torch.long)
        for i, (r, n) in enumerate(zip(full, prompt_lens)):
            tokens[i, :n] = r[:n]
        ours(tokens, torch.arange(T).expand(3, T), cache, slots)
        refs = [_ref_logits(ref, r) for r in full]
        for step in range(3):
            pos = torch.tensor([[n + step] for n in prompt_lens])
            tok = torch.stack([r[n + step] for r, n in zip(full, prompt_lens)])[:, None]
            logits = ours(tok, pos, cache, slots)[:, 0]
            for i, n in enumerate(prompt_lens):
                diff = (logits[i] - refs[i][n + step]).abs().max().item()
                assert diff <= TOL, f"step {step} row {i}: max abs diff {diff}"


def test_cacheless_forward_matches_reference(pair):
    """The training path (no KV cache, right padding) sees what the reference sees."""
    ours, ref = pair
    rows = _ragged(ours.cfg.vocab_size, [7, 13], seed=5)
    tokens = torch.zeros(2, 13, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    with torch.no_grad():
        logits = ours(tokens)
    for i, r in enumerate(rows):
        assert (logits[i, : len(r)] - _ref_logits(ref, r)).abs().max().item() <= TOL


def test_parameter_count_matches_reference(pair):
    ours, ref = pair
    assert ours.cfg.n_params() == ref.num_parameters()


def test_default_model_logits_match_transformers(default_dir):
    from transformers import AutoModelForCausalLM

    from engine.tokenizer import Tokenizer

    ours = load_model(default_dir)
    ref = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    tok = Tokenizer(default_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Hi"]
    rows = [torch.tensor(tok.encode(t)) for t in texts]
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    cache = KVCache(ours.cfg, n_slots=3, max_seq=64)
    with torch.no_grad():
        logits = ours(tokens, torch.arange(T).expand(3, T), cache, torch.arange(3))
    for i, r in enumerate(rows):
        diff = (logits[i, : len(r)] - _ref_logits(ref, r)).abs().max().item()
        assert diff <= TOL, f"{texts[i]!r}: max abs diff {diff}"
