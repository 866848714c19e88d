"""Prefix tuning in Hugging Face PEFT's format.

File: one tensor `prompt_embeddings` (P, n_layers * 2 * token_dim), token_dim = n_kv_heads *
head_dim (PEFT sizes prefixes by key/value heads on GQA models). Row p, viewed as
(2 * n_layers, n_kv_heads, head_dim), holds virtual token p's key (even index) and value (odd
index) for every layer. The prefix is used as is (no RoPE), and the real tokens take
positions P, P+1, ... after it, as in PEFT.

Serving writes the prefix into positions 0..P-1 of the request's KV-cache slot at admission;
training and the reference path hand it to attention through the `prefix` seam.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from adapters.base import AdapterError, BaseShape, Capacity, check_positive_int, config_from_dict
from adapters.registry import AdapterType, register

KEY = "prompt_embeddings"


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 30
    """P: virtual tokens in front of every prompt."""
    token_dim: int | None = None
    """n_kv_heads * head_dim of the base model (filled in when None)."""
    num_attention_heads: int | None = None
    """PEFT's field: the base model's key/value heads."""
    num_layers: int | None = None
    """PEFT's field: the base model's layers."""
    num_transformer_submodules: int | None = 1
    """1 for decoder-only models."""
    encoder_hidden_size: int | None = None
    """PEFT's reparametrisation width (training only; the file holds the final prefix)."""
    prefix_projection: bool = False
    """PEFT trained through an MLP; the saved prompt_embeddings are already projected."""
    task_type: str | None = "CAUSAL_LM"
    """Only causal LM is served."""
    base_model_name_or_path: str | None = None
    """PEFT metadata."""
    inference_mode: bool = True
    """PEFT metadata."""
    init_weights: object = None
    """PEFT metadata."""
    modules_to_save: object = None
    """Must be None: prefix adapters here carry no other modules."""
    revision: str | None = None
    """PEFT metadata."""
    peft_version: str | None = None
    """PEFT metadata."""
    auto_mapping: dict | None = None
    """PEFT metadata."""

    def __post_init__(self):
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.num_transformer_submodules not in (None, 1):
            raise AdapterError("num_transformer_submodules must be 1 (decoder-only models)")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise AdapterError(f"task_type {self.task_type!r} is not served (only CAUSAL_LM)")
        if self.modules_to_save:
            raise AdapterError("modules_to_save is not supported for prefix adapters")


def fill_for(cfg: PrefixConfig, shape: BaseShape) -> PrefixConfig:
    """Complete the base-model fields (as PEFT does when it wraps a model)."""
    token_dim = shape.n_kv_heads * shape.head_dim
    cfg.token_dim = cfg.token_dim or token_dim
    cfg.num_attention_heads = cfg.num_attention_heads or shape.n_kv_heads
    cfg.num_layers = cfg.num_layers or shape.n_layers
    cfg.encoder_hidden_size = cfg.encoder_hidden_size or token_dim
    return cfg


def layer_kv(emb: torch.Tensor, shape: BaseShape) -> torch.Tensor:
    """(P, L*2*Hkv*hd) -> (L, 2, Hkv, P, hd): per layer, keys then values."""
    P = emb.shape[0]
    x = emb.view(P, shape.n_layers, 2, shape.n_kv_heads, shape.head_dim)
    return x.permute(1, 2, 3, 0, 4)


@register
class PrefixType(AdapterType):
    kind, peft_type = "prefix", "PREFIX_TUNING"

    def parse_config(self, d):
        return config_from_dict(PrefixConfig, d)

    def config_dict(self, cfg):
        return asdict(cfg)

    def check_config(self, cfg, shape):
        want = {"token_dim": shape.n_kv_heads * shape.head_dim, "num_attention_heads": shape.n_kv_heads,
                "num_layers": shape.n_layers}
        for k, v in want.items():
            got = getattr(cfg, k)
            if got is not None and got != v:
                raise AdapterError(f"prefix config {k}={got} does not fit the base model ({k}={v})")
        fill_for(cfg, shape)

    def expected_shapes(self, cfg, shape):
        return {KEY: (cfg.num_virtual_tokens, shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim)}

    def init(self, cfg, shape, generator=None):
        fill_for(cfg, shape)
        # PEFT initialises the prefix embedding like nn.Embedding: N(0, 1).
        return {KEY: torch.randn(self.expected_shapes(cfg, shape)[KEY], generator=generator)}

    def virtual_tokens(self, cfg):
        return cfg.num_virtual_tokens

    def prefix(self, ad, layer, batch):
        kv = layer_kv(ad.tensors[KEY], ad.shape)[layer]  # (2, Hkv, P, hd)
        return kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)

    def compiled(self, ad):
        return layer_kv(ad.tensors[KEY], ad.shape)

    def check_capacity(self, cfg, shape, cap: Capacity):
        if cfg.num_virtual_tokens > cap.max_virtual_tokens:
            raise AdapterError(f"num_virtual_tokens {cfg.num_virtual_tokens} exceeds this server's limit "
                               f"{cap.max_virtual_tokens} (prefix positions must leave room for the prompt)")

    def make_bank(self, shape, max_slots, device, dtype, cap: Capacity):
        return PrefixBank(shape, max_slots, device, dtype, cap.max_virtual_tokens)


class PrefixBank:
    """Slot bank for prefix adapters: kv (S, L, 2, Hkv, P_max, hd) and each slot's P.

    Prefixes do not act inside the forward: `kv(slot)` gives the (L, 2, Hkv, P, hd) keys and
    values that the engine writes at positions 0..P-1 of a request's KV-cache slot when it is
    admitted, and the request's tokens start at position P. Reference semantics: a row with
    prefix slot s attends to exactly what PEFT's past_key_values for that adapter hold.
    """

    def __init__(self, shape: BaseShape, max_slots: int, device, dtype, max_tokens: int = 128):
        self.shape, self.S, self.max_tokens = shape, max_slots, max_tokens
        L, Hkv, hd = shape.n_layers, shape.n_kv_heads, shape.head_dim
        self.kv_bank = torch.zeros(max_slots, L, 2, Hkv, max_tokens, hd, device=device, dtype=dtype)
        self.length = [0] * max_slots

    def load(self, slot: int, compiled: torch.Tensor) -> None:
        P = compiled.shape[3]
        if P > self.max_tokens:
            raise AdapterError(f"{P} virtual tokens exceed this server's prefix limit {self.max_tokens}")
        self.clear(slot)
        self.kv_bank[slot, :, :, :, :P].copy_(compiled)
        self.length[slot] = P

    def clear(self, slot: int) -> None:
        self.kv_bank[slot].zero_()
        self.length[slot] = 0

    def kv(self, slot: int) -> torch.Tensor:
        return self.kv_bank[slot, :, :, :, : self.length[slot]]
