"""Bad adapter files are refused with an error naming the problem; nothing is half-loaded."""

import io
import json

import pytest
import torch
from safetensors.torch import save

from adapters.base import AdapterError
from adapters.files import CONFIG_NAME, WEIGHTS_NAME, load_dir, save_dir
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, make


def _lora(shape):
    return make(CASES[0], shape, seed=1)


def _write(path, config: dict | bytes, tensors: dict | bytes):
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    (path / WEIGHTS_NAME).write_bytes(tensors if isinstance(tensors, bytes) else save(tensors))
    return path


def _good(tmp_path, shape):
    d = save_dir(_lora(shape), tmp_path / "good")
    return json.loads((d / CONFIG_NAME).read_text()), dict(load_dir(d, shape).tensors), d


def _pickle_bytes(tensors):
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def corruptions():
    """(name, make(cfg, tensors, good_dir, tmp) -> adapter dir, words the error must contain)."""
    first = lambda t: sorted(t)[0]  # noqa: E731

    return [
        ("unknown type", lambda c, t, g, p: _write(p, {**c, "peft_type": "IA3"}, t), ["unknown adapter type", "IA3"]),
        ("wrong shape", lambda c, t, g, p: _write(p, c, {**t, first(t): torch.zeros(4, 7)}), ["shape", "(4, 7)"]),
        ("nan", lambda c, t, g, p: _write(p, c, {**t, first(t): torch.full_like(t[first(t)], float("nan"))}), ["NaN"]),
        ("inf", lambda c, t, g, p: _write(p, c, {**t, first(t): torch.full_like(t[first(t)], float("inf"))}), ["Inf"]),
        ("missing tensor", lambda c, t, g, p: _write(p, c, {k: v for k, v in t.items() if k != first(t)}), ["lacks"]),
        ("extra tensor", lambda c, t, g, p: _write(p, c, {**t, "base_model.model.extra.weight": torch.zeros(2)}), ["unexpected"]),
        ("integer tensor", lambda c, t, g, p: _write(p, c, {**t, first(t): t[first(t)].long()}), ["dtype"]),
        ("pickle named .bin", lambda c, t, g, p: _pickle_only(p, c, t), ["pickle"]),
        ("pickle in .safetensors", lambda c, t, g, p: _write(p, c, _pickle_bytes(t)), ["pickle"]),
        ("truncated", lambda c, t, g, p: _write(p, c, (g / WEIGHTS_NAME).read_bytes()[:-100]), ["safetensors"]),
        ("config not json", lambda c, t, g, p: _write(p, b"{r: 4,", t), ["not valid JSON"]),
        ("config not object", lambda c, t, g, p: _write(p, b"[1, 2]", t), ["JSON object"]),
        ("unknown field", lambda c, t, g, p: _write(p, {**c, "lora_sparkle": 3}, t), ["lora_sparkle"]),
        ("unsupported field value", lambda c, t, g, p: _write(p, {**c, "use_dora": True}, t), ["use_dora"]),
        ("untargetable module", lambda c, t, g, p: _write(p, {**c, "target_modules": ["q_proj", "lm_head"]}, t), ["lm_head"]),
        ("bad rank", lambda c, t, g, p: _write(p, {**c, "r": 0}, t), ["r must be"]),
        ("layer out of range", lambda c, t, g, p: _write(p, {**c, "layers_to_transform": [7]}, t), ["layer 7"]),
    ]


def _pickle_only(path, cfg, tensors):
    path.mkdir(parents=True)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    (path / "adapter_model.bin").write_bytes(_pickle_bytes(tensors))
    return path


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(tiny_dir, device="cpu", max_batch=2, max_seq_len=64, max_adapters=2)


@pytest.mark.parametrize("name,corrupt,words", corruptions(), ids=[c[0] for c in corruptions()])
def test_bad_adapter_is_refused_and_nothing_changes(name, corrupt, words, engine, tmp_path):
    cfg, tensors, good = _good(tmp_path, engine.shape)
    engine.load_adapter("good", good)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    before = engine.generate(["hello"], sp, adapters=["good"])[0].token_ids
    handles, free = dict(engine.adapters.handles), {k: list(v) for k, v in engine.adapters.free.items()}
    bad = corrupt(cfg, tensors, good, tmp_path / "bad")
    for target in ("new", "good"):  # a new name, and replacing a loaded adapter
        with pytest.raises(AdapterError) as e:
            engine.load_adapter(target, bad)
        msg = str(e.value)
        assert all(w in msg for w in words), msg
        assert "\n" not in msg
    assert engine.adapters.handles == handles and engine.adapters.free == free
    assert engine.generate(["hello"], sp, adapters=["good"])[0].token_ids == before
    engine.adapters.unload("good")


def test_prefix_config_for_another_model_is_refused(engine, tmp_path):
    ad = make(next(c for c in CASES if c.kind == "prefix"), engine.shape)
    d = save_dir(ad, tmp_path / "p")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["num_layers"] = 12
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="num_layers=12"):
        load_dir(d, engine.shape)


def test_rank_above_bank_limit_leaves_slot_untouched(engine):
    from adapters.lora import LoraConfig
    from adapters.registry import get_type

    shape = engine.shape
    big = LoraConfig(r=100, target_modules=["q_proj"])
    t = get_type("lora")
    from adapters.base import Adapter

    ad = Adapter("lora", big, {k: torch.ones(s) for k, s in t.expected_shapes(big, shape).items()}, shape)
    with pytest.raises(AdapterError, match="rank 100"):
        engine.load_adapter("big", ad)
    assert "big" not in engine.adapters.handles


def test_safetensors_whose_header_length_starts_like_a_pickle_loads(engine):
    """The u64 header length can begin with byte 0x80, pickle's magic: it is still safetensors."""
    from adapters.files import parse_tensors

    tensors = dict(_lora(engine.shape).tensors)
    for pad in range(300):
        data = save(tensors, metadata={"pad": "x" * pad})
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    back = parse_tensors(data)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
