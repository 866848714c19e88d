"""Synthetic adapters with random non-zero weights, written from the server's `/info`.

The load test speaks only HTTP, so it does not import the server's adapter code: it writes
the two upload files in the documented format (PEFT keys and config fields for LoRA and
prefix tuning; the same layout with `"peft_type": "SORA"` / `"QAA"` for the others) from
the base model's shape that `GET /info` reports. The server validates every upload, so a
file that does not fit the model is refused there, by name.

Sizes follow the survey's defaults scaled to serving: LoRA and SoRA r=8 on q_proj and
v_proj, prefix tuning with 30 virtual tokens, QAA with 2 RX layers after attention and MLP
of every layer.
"""

from __future__ import annotations

import json
import math

import numpy as np
from safetensors.numpy import save

TYPES = ("qaa", "lora", "sora", "prefix")
LAYER = "base_model.model.model.layers.{}"
RANK, TARGETS, VIRTUAL_TOKENS, CIRCUIT_LAYERS = 8, ("q_proj", "v_proj"), 30, 2


def _dims(mc: dict) -> dict[str, tuple[int, int]]:
    d, hd = mc["hidden_size"], mc["head_dim"]
    return {"q_proj": (d, mc["num_attention_heads"] * hd), "v_proj": (d, mc["num_key_value_heads"] * hd)}


def _lora(mc, rng, gates: bool):
    t = {}
    for layer in range(mc["num_hidden_layers"]):
        for proj, (fan_in, fan_out) in _dims(mc).items():
            base = f"{LAYER.format(layer)}.self_attn.{proj}"
            t[f"{base}.lora_A.weight"] = rng.normal(0, 1 / math.sqrt(fan_in), (RANK, fan_in))
            t[f"{base}.lora_B.weight"] = rng.normal(0, 0.02, (fan_out, RANK))
            if gates:  # SoRA: a gate per rank, some of them pruned to zero
                t[f"{base}.lora_gate"] = rng.normal(0, 1, RANK) * (rng.random(RANK) > 0.25)
    cfg = {"peft_type": "SORA" if gates else "LORA", "r": RANK, "lora_alpha": 2 * RANK,
           "target_modules": list(TARGETS), "task_type": "CAUSAL_LM"}
    return cfg, t


def _prefix(mc, rng):
    kv = mc["num_key_value_heads"] * mc["head_dim"]
    t = {"prompt_embeddings": rng.normal(0, 1, (VIRTUAL_TOKENS, mc["num_hidden_layers"] * 2 * kv))}
    cfg = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": VIRTUAL_TOKENS, "token_dim": kv,
           "num_attention_heads": mc["num_key_value_heads"], "num_layers": mc["num_hidden_layers"],
           "num_transformer_submodules": 1, "encoder_hidden_size": kv, "prefix_projection": False,
           "task_type": "CAUSAL_LM"}
    return cfg, t


def _qaa(mc, rng):
    d = mc["hidden_size"]
    n = max(1, math.ceil(math.log2(d)))
    t = {}
    for layer in range(mc["num_hidden_layers"]):
        for where in ("attn", "mlp"):
            base = f"{LAYER.format(layer)}.qaa_{where}"
            t[f"{base}.angles"] = rng.uniform(0, 2 * math.pi, (CIRCUIT_LAYERS, n))
            t[f"{base}.up.weight"] = rng.normal(0, 0.02, (d, n))
            t[f"{base}.up.bias"] = rng.normal(0, 0.01, d)
    cfg = {"peft_type": "QAA", "circuit_layers": CIRCUIT_LAYERS, "rotation": "RX", "placement": ["attn", "mlp"],
           "bias": True, "hidden_size": d, "n_qubits": n, "task_type": "CAUSAL_LM"}
    return cfg, t


def adapter_files(kind: str, model_config: dict, seed: int, model_id: str | None = None) -> dict[str, bytes]:
    """{"adapter_config.json": ..., "adapter_model.safetensors": ...} for one synthetic adapter."""
    rng = np.random.default_rng(seed)
    if kind in ("lora", "sora"):
        cfg, tensors = _lora(model_config, rng, gates=kind == "sora")
    elif kind == "prefix":
        cfg, tensors = _prefix(model_config, rng)
    elif kind == "qaa":
        cfg, tensors = _qaa(model_config, rng)
    else:
        raise ValueError(f"unknown adapter type {kind!r} (use {', '.join(TYPES)})")
    if model_id:
        cfg["base_model_name_or_path"] = model_id
    weights = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()})
    return {"adapter_config.json": json.dumps(cfg, indent=2).encode(), "adapter_model.safetensors": weights}
