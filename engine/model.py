"""Llama-family transformer with per-row adapter seams (gpt-fast style).

Module names follow Hugging Face (`model.layers.N.self_attn.q_proj`, ...), so a checkpoint's
state dict and PEFT's adapter keys map onto it without renaming.

Seams, all optional (`seams=None` is the plain base model):
  seams.linear(layer, name, x, y) -> y'   around every projection (LoRA, SoRA)
  seams.residual(layer, where, h) -> h'   on the residual stream after "attn" / "mlp" (QAA)
  seams.prefix(layer, B) -> (k, v) | None extra keys/values in front of the sequence, used
                                          only without a KV cache (training); served prefixes
                                          live in the cache's first positions instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.layout import Layout, causal_mask, rectangle

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FrozenLinear(nn.Module):
    """Inference-only linear layer holding its weight transposed, (in, out) contiguous.

    MKL's GEMM at decode batch sizes (M = 1..64) runs this layout 1.5-3x faster than
    nn.Linear's (out, in). `weight` stays readable as the usual (out, in) view, so state dicts,
    PEFT keys and adapter shape checks see a normal Linear. `out_dtype` casts the output (the
    head's logits are fp32 whatever the model's dtype). `packed`: see pack_weight.
    """

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = out_dtype
        self.register_buffer("wt", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.packed = None

    @property
    def weight(self):
        return self.wt.t()

    def forward(self, x):
        y = frozen_matmul(x, self.wt, self.bias, self.packed)
        return y if self.out_dtype is None else y.to(self.out_dtype)


def pack_weight(wt: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's own blocked copy of a bf16 (in, out) weight on the CPU, or None (other dtypes and
    devices, or a torch without oneDNN bf16). Its linear runs 1.4-2x faster than `x @ wt` at
    every M measured (1..256; AMX here), with bit-identical results (a bias is added before
    the one rounding): torch.ops.mkldnn's packed linear, as inductor uses on the CPU. The plain weight is kept beside it (state dicts and
    the `weight` views read it), so bf16 weights take twice their size in memory."""
    if wt.device.type != "cpu" or wt.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        return torch.ops.mkldnn._reorder_linear_weight(wt.t().contiguous(), None)
    except (RuntimeError, AttributeError):  # an op this build lacks: the plain matmul serves
        return None


PACKED_M_STEP = 64
"""Above 16 rows, a packed linear's rows are padded to a multiple of this."""


def frozen_matmul(x, wt, bias, packed):
    """x (..., in) @ wt (in, out) + bias, through the packed weight when there is one (eager
    only: inductor cannot lower oneDNN's op on a weight it did not pack itself, so a compiled
    step (engine.graph) multiplies by the plain weight).

    oneDNN builds (JIT-compiles) a primitive for every new row count M, 1-5 ms per weight,
    and keeps a bounded cache of them: chunked prefill steps have a different M almost every
    step (decode rows + chunks), so above 16 rows M is padded up to a multiple of
    PACKED_M_STEP, which bounds the shapes and costs at most 63 rows of arithmetic."""
    if packed is not None and not torch.compiler.is_compiling():
        x2 = x.reshape(-1, x.shape[-1])
        M = x2.shape[0]
        Mb = M if M <= 16 else -(-M // PACKED_M_STEP) * PACKED_M_STEP
        if Mb != M:
            x2 = F.pad(x2, (0, 0, 0, Mb - M))
        y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
        return (y if Mb == M else y[:M]).reshape(*x.shape[:-1], y.shape[-1])
    y = x @ wt
    return y if bias is None else y + bias


def freeze_linears(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear for a FrozenLinear (serving: the base model never trains), then
    fuse q|k|v and gate|up so each runs as one GEMM. The head gives fp32 logits: the sampler,
    logprobs, penalties and grammar masks then work in fp32 (one cast of (B, V) per step) when
    the model runs in bf16 or fp16. bf16 on the CPU: the GEMMs that run (fused q|k|v, o,
    fused gate|up, down, head) get packed weights (pack_weight)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, FrozenLinear(child, torch.float32 if child is model.lm_head else None))
    for block in model.model.layers:
        block.self_attn.fuse()
        block.mlp.fuse()
        attn, mlp = block.self_attn, block.mlp
        attn.qkv_packed, mlp.gate_up_packed = pack_weight(attn.qkv_wt), pack_weight(mlp.gate_up_wt)
        for lin in (attn.o_proj, mlp.down_proj):
            lin.packed = pack_weight(lin.wt)
    model.lm_head.packed = pack_weight(model.lm_head.wt)
    return model


def fuse(owner: nn.Module, names: tuple[str, ...]):
    """One (in, sum out) weight for several FrozenLinears of `owner`, which become views of it.

    Returns (weight, bias or None); the per-projection modules keep working (and keep their
    state-dict names) but share the fused storage, so fusing costs no memory.
    """
    parts = [getattr(owner, n) for n in names]
    wt = torch.cat([p.wt for p in parts], 1)
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    o = 0
    for p in parts:
        p.wt = wt[:, o : o + p.out_features]
        if bias is not None:
            p.bias = bias[o : o + p.out_features]
        o += p.out_features
    return wt, bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # One call. For bf16/fp16 x it normalises and scales in fp32 and rounds once
        # (transformers rounds twice: after normalising, then after the weight).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


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
        q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
        # (projection, first column, width) of q, k and v in the fused output; a plain tuple:
        # read every layer of every step, where nn.Module's attribute lookups cost
        self.qkv_columns = (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv))
        self.register_buffer("qkv_wt", None, persistent=False)
        self.register_buffer("qkv_b", None, persistent=False)
        self.qkv_packed = None

    def fuse(self):
        self.qkv_wt, self.qkv_b = fuse(self, ("q_proj", "k_proj", "v_proj"))

    def _fused_qkv(self, x):
        # (B, T, d) -> (B, T, (H + 2 Hkv) hd): q|k|v in one GEMM
        return frozen_matmul(x, self.qkv_wt, self.qkv_b, self.qkv_packed)

    def adapt_fused(self, x, y, seams):
        """Seams around q, k and v on the fused output's columns. Slot banks add into their
        column ranges in place (`linear_columns`: no split, which in a decode step cost as much
        as the adapters' kernels); seams that return new tensors (training's differentiable
        forward) get the slices, which are concatenated again."""
        if hasattr(seams, "linear_columns"):
            seams.linear_columns(self.layer, self.qkv_columns, x, y)
            return y
        parts = [y[..., c : c + w] for _, c, w in self.qkv_columns]
        outs = [seams.linear(self.layer, n, x, p) for (n, _, _), p in zip(self.qkv_columns, parts)]
        return y if all(o is p for o, p in zip(outs, parts)) else torch.cat(outs, -1)

    def proj(self, name, x, seams):
        y = getattr(self, name)(x)
        return y if seams is None else seams.linear(self.layer, name, x, y)

    def qkv(self, x, cos, sin, seams):
        """(B, T, d) -> q (B, T, H, hd), k and v (B, T, Hkv, hd), RoPE applied to q and k."""
        B, T, _ = x.shape
        hd, H, Hkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd)
        if self.qkv_wt is not None:
            # RoPE on q and k in one pass over the fused projection's output
            y = self._fused_qkv(x)
            if seams is not None:
                y = self.adapt_fused(x, y, seams)
            qk = apply_rope(y[..., : (H + Hkv) * hd].view(B, T, H + Hkv, hd), cos, sin)
            return qk[:, :, :H], qk[:, :, H:], y[..., (H + Hkv) * hd :].view(B, T, Hkv, hd)
        q, k, v = (self.proj(n, x, seams) for n in ("q_proj", "k_proj", "v_proj"))
        q, k = apply_rope(q.view(B, T, H, hd), cos, sin), apply_rope(k.view(B, T, Hkv, hd), cos, sin)
        return q, k, v.view(B, T, Hkv, hd)

    def forward(self, x, cos, sin, mask, cache, layout, seams):
        # x (B, T, d); with a cache, `layout` places and groups the B*T tokens (engine.layout);
        # without one, mask (B, 1, T, T) over the rows' own tokens
        B, T, _ = x.shape
        H, Hkv, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q, k, v = self.qkv(x, cos, sin, seams)
        if cache is not None:
            y = attend(q.reshape(B * T, H, hd), k.reshape(B * T, Hkv, hd), v.reshape(B * T, Hkv, hd),
                       cache, self.layer, layout).view(B, T, H * hd)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
            prefix = seams.prefix(self.layer, B) if seams is not None else None
            if prefix is not None:  # (B, Hkv, P, hd) keys/values that every query sees
                pk, pv = prefix
                k, v = torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)
                mask = torch.cat([mask.new_ones(B, 1, T, pk.shape[2]), mask], -1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)  # (B, H, T, hd)
            y = y.transpose(1, 2).reshape(B, T, H * hd)
        return self.proj("o_proj", y, seams)


def attend(q, k, v, cache, layer: int, layout: Layout):
    """Write the step's keys/values into the cache, then attend span by span.

    q (N, H, hd), k and v (N, Hkv, hd) for the N tokens of the flat batch -> (N, H * hd).
    """
    cache.write(layer, layout.rows, layout.pos, k, v)
    H, hd = q.shape[1], q.shape[2]
    outs = []
    for sp in layout.spans:
        qs = q[sp.start : sp.start + sp.n]
        if sp.sel is not None:  # idle rows: zero queries, outputs dropped below
            qs = qs.new_zeros(sp.B, H, hd).index_copy_(0, sp.sel, qs)
        qs = qs.reshape(sp.B, sp.T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        ks, vs = cache.read(layer, sp.slots, sp.first, sp.length)  # (B, Hkv, length, hd)
        y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=sp.mask, enable_gqa=ks.shape[1] != H)
        y = y.transpose(1, 2).reshape(sp.B * sp.T, H * hd)
        outs.append(y if sp.sel is None else y.index_select(0, sp.sel))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)
        self.register_buffer("gate_up_wt", None, persistent=False)
        self.register_buffer("gate_up_b", None, persistent=False)
        self.gate_up_packed = None

    def fuse(self):
        self.gate_up_wt, self.gate_up_b = fuse(self, ("gate_proj", "up_proj"))

    def forward(self, x, seams):
        if self.gate_up_wt is None:
            g, u = self.gate_proj(x), self.up_proj(x)
        else:
            g, u = frozen_matmul(x, self.gate_up_wt, self.gate_up_b, self.gate_up_packed).chunk(2, -1)
        if seams is None:
            return self.down_proj(F.silu(g) * u)
        g = seams.linear(self.layer, "gate_proj", x, g)
        u = seams.linear(self.layer, "up_proj", x, u)
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

    def forward(self, h, cos, sin, mask, cache, layout, seams):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, layout, seams)
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

    def hidden(self, tokens, pos, cache=None, rows=None, seams=None, layout=None):
        """Final-norm hidden states (B, T, d) for tokens (B, T) at positions pos (B, T).

        With a cache, `layout` says which slot and position each token has and which tokens
        attend together (engine.layout); given `rows` instead, row b uses slot rows[b], and
        keys at cache index j are visible to a query at position p when j <= p, so rows of
        different lengths (and right-padding, whose garbage lies beyond every real query)
        share one forward. Without a cache, each row attends to its own tokens.
        """
        h = self.model.embed_tokens(tokens)
        cos, sin = self.rope(pos, h.dtype)
        mask = None
        if cache is None:
            mask = causal_mask(pos, None, self.cfg.sliding_window)
        elif layout is None:
            layout = rectangle(rows, pos, self.cfg.sliding_window)
        for block in self.model.layers:
            h = block(h, cos, sin, mask, cache, layout, seams)
        return self.model.norm(h)

    def forward(self, tokens, pos=None, cache=None, rows=None, seams=None, last=None, layout=None):
        """Logits (B, T, V), or (B, V) at index last[b] of each row when `last` is given."""
        if pos is None:  # a prefix adapter's virtual tokens take the first positions
            start = seams.offset if seams is not None else 0
            pos = (torch.arange(tokens.shape[1], device=tokens.device) + start).expand(tokens.shape[0], -1)
        h = self.hidden(tokens, pos, cache, rows, seams, layout)
        if last is not None:
            h = h[torch.arange(h.shape[0], device=h.device), last]  # (B, d)
        return self.lm_head(h)
