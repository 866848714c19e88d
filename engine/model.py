"""Llama-family transformer with per-row adapter seams (gpt-fast style).

Module names follow Hugging Face (`model.layers.N.self_attn.q_proj`, ...), so a checkpoint's
state dict and PEFT's adapter keys map onto it without renaming.

Seams, all optional (`seams=None` is the plain base model):
  seams.linear(layer, name, x, y) -> y'   around every projection (LoRA, SoRA)
  seams.residual(layer, where, h) -> h'   on the residual stream after "attn" / "mlp" (QAA)
  seams.prefix(layer) -> (k, v) | None    extra keys/values in front of the sequence, used
                                          only without a KV cache (training); served prefixes
                                          live in the cache's first positions instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 like the reference implementation, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x (B, H, T, D); cos/sin (B, 1, T, D)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)

    def proj(self, name, x, seams):
        y = getattr(self, name)(x)
        return y if seams is None else seams.linear(self.layer, name, x, y)

    def forward(self, x, cos, sin, pos, cache, rows, seams):
        # x (B, T, d); pos (B, T) absolute positions = cache indices
        B, T, _ = x.shape
        hd, H, Hkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        q = self.proj("q_proj", x, seams).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.proj("k_proj", x, seams).view(B, T, Hkv, hd).transpose(1, 2)
        v = self.proj("v_proj", x, seams).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.write(self.layer, rows, pos, k, v)
            S = int(pos.max()) + 1
            k, v = cache.read(self.layer, rows, S)  # (B, Hkv, S, hd)
            key_pos = torch.arange(S, device=x.device)
            mask = key_pos[None, None, :] <= pos[:, :, None]  # (B, T, S)
            if self.cfg.sliding_window:
                mask &= key_pos[None, None, :] > pos[:, :, None] - self.cfg.sliding_window
            mask = mask[:, None]
        else:
            prefix = seams.prefix(self.layer) if seams is not None else None
            key_pos = pos
            if prefix is not None:  # (B, Hkv, P, hd) keys/values that every query sees
                pk, pv = prefix
                k, v = torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)
            P = k.shape[2] - T
            causal = key_pos[:, None, :] <= pos[:, :, None]  # (B, T, T)
            if self.cfg.sliding_window:
                causal &= key_pos[:, None, :] > pos[:, :, None] - self.cfg.sliding_window
            mask = torch.cat([causal.new_ones(B, T, P), causal], -1)[:, None]
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)
        return self.proj("o_proj", y, seams)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x, seams):
        if seams is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        g = seams.linear(self.layer, "gate_proj", x, self.gate_proj(x))
        u = seams.linear(self.layer, "up_proj", x, self.up_proj(x))
        h = F.silu(g) * u
        return seams.linear(self.layer, "down_proj", h, self.down_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, h, cos, sin, pos, cache, rows, seams):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, pos, cache, rows, seams)
        if seams is not None:
            h = seams.residual(self.layer, "attn", h)
        h = h + self.mlp(self.post_attention_layernorm(h), seams)
        if seams is not None:
            h = seams.residual(self.layer, "mlp", h)
        return h


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)

    def rope(self, pos, dtype):
        # pos (B, T) -> cos, sin (B, 1, T, hd), computed in fp32 like the reference.
        freqs = pos[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def hidden(self, tokens, pos, cache=None, rows=None, seams=None):
        """Final-norm hidden states (B, T, d) for tokens (B, T) at positions pos (B, T).

        With a cache, row b reads and writes the cache slot rows[b]; keys at cache index j are
        visible to a query at position p when j <= p, so rows of different lengths (and
        right-padding, whose garbage lies beyond every real query) share one forward.
        """
        h = self.model.embed_tokens(tokens)
        cos, sin = self.rope(pos, h.dtype)
        for block in self.model.layers:
            h = block(h, cos, sin, pos, cache, rows, seams)
        return self.model.norm(h)

    def forward(self, tokens, pos=None, cache=None, rows=None, seams=None, last=None):
        """Logits (B, T, V), or (B, V) at index last[b] of each row when `last` is given."""
        if pos is None:
            pos = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        h = self.hidden(tokens, pos, cache, rows, seams)
        if last is not None:
            h = h[torch.arange(h.shape[0], device=h.device), last]  # (B, d)
        return self.lm_head(h)
