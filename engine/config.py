"""Model shape and RoPE settings read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ModelError

# model_type values whose forward is the Llama block (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int
    """Rows of the embedding and of the output head."""
    dim: int
    """Hidden size d of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Query heads per attention layer."""
    n_kv_heads: int
    """Key/value heads (GQA: n_heads is a multiple of it)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    head_dim: int = 0
    """Per-head width; 0 means dim // n_heads."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict = field(default_factory=dict)
    """The checkpoint's rope scaling block (`rope_type` + its fields); empty = plain RoPE."""
    max_position: int = 2048
    """Longest context the checkpoint was trained for (`max_position_embeddings`)."""
    tie_embeddings: bool = False
    """Output head shares the embedding matrix."""
    qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2, `attention_bias`)."""
    o_bias: bool = False
    """o_proj carries a bias (`attention_bias` on Llama)."""
    mlp_bias: bool = False
    """gate/up/down projections carry a bias."""
    sliding_window: int | None = None
    """Mistral-style local attention window, None for full attention."""
    model_type: str = "llama"
    """The checkpoint's model_type, kept for messages and names."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id from config.json, if any."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids from config.json, if any."""

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE:
            raise ModelError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE)})")

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Build from a parsed HF config.json (transformers 4.x or 5.x spelling)."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_TYPES:
            raise ModelError(
                f"model_type {mt!r} is not supported: qaa-serve runs Llama-family checkpoints "
                f"({', '.join(SUPPORTED_TYPES)})"
            )
        # transformers 5 nests theta and scaling in rope_parameters; 4.x keeps them top-level.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window = cfg.get("sliding_window")
        if mt == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        attn_bias = bool(cfg.get("attention_bias", False))
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                intermediate_size=cfg["intermediate_size"],
                head_dim=cfg.get("head_dim") or 0,
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=float(theta),
                rope_scaling=rope,
                max_position=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=attn_bias or mt == "qwen2",
                o_bias=attn_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=window,
                model_type=mt,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos,
            )
        except KeyError as e:
            raise ModelError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        try:
            return cls.from_hf(json.loads(p.read_text()))
        except FileNotFoundError:
            raise ModelError(f"{path} has no config.json: not a Hugging Face checkpoint directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{p} is not valid JSON: {e}") from None

    def shape(self):
        """The base-model facts adapters need."""
        from adapters.base import BaseShape

        return BaseShape(self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim,
                         self.intermediate_size, self.n_params())

    def n_params(self) -> int:
        """Parameter count of the base model (what HF's num_parameters reports)."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        attn += (self.n_heads + 2 * self.n_kv_heads) * hd * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def inv_freq(self):
        """RoPE inverse frequencies (head_dim // 2,), with the checkpoint's scaling applied."""
        import torch

        hd = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if kind == "linear":
            inv = inv / self.rope_scaling["factor"]
        elif kind == "llama3":
            s = self.rope_scaling
            factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_ctx = s["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
            mid = (1 - smooth) * inv / factor + smooth * inv
            is_mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
            inv = torch.where(is_mid, mid, scaled)
        return inv.float()
