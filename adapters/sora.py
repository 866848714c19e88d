"""SoRA, sparse low-rank adaptation (Ding et al., EMNLP 2023).

A gate vector g (r,) sits between LoRA's down and up projections:
    y += B @ (g * (A @ x)) * scale
Training adds nothing to the loss for g; after each optimizer step the gates take a proximal
step for lambda * |g|_1 (soft-thresholding), with lambda following a schedule. Ranks whose
gate reached exactly zero contribute nothing: `prune` drops them and `to_lora` exports a
plain PEFT LoRA with per-module ranks (rank_pattern) and identical outputs.

File: LoRA's keys plus `{module}.lora_gate` (r,), config `"peft_type": "SORA"`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from adapters.base import Adapter, AdapterError, module_path
from adapters.lora import LoraConfig, LoraType, parse_lora_like, scales_of, targets
from adapters.registry import register

SCHEDULES = ("constant", "linear", "step")


@dataclass
class SoraConfig(LoraConfig):
    sparse_lambda: float = 1e-3
    """L1 strength lambda on the gates (at the start of the schedule)."""
    lambda_schedule: str = "linear"
    """constant | linear (ramp to max_lambda over training) | step (lambda_steps equal increments)."""
    max_lambda: float | None = 1e-2
    """Lambda at the end of training for linear/step schedules."""
    lambda_steps: int = 10
    """Number of increments of the step schedule."""

    def __post_init__(self):
        super().__post_init__()
        if self.lambda_schedule not in SCHEDULES:
            raise AdapterError(f"lambda_schedule {self.lambda_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.sparse_lambda < 0 or (self.max_lambda is not None and self.max_lambda < 0):
            raise AdapterError("sparse_lambda and max_lambda must be >= 0")


def lambda_at(cfg: SoraConfig, step: int, total: int) -> float:
    """The schedule: lambda at optimizer step `step` of `total`."""
    lo = cfg.sparse_lambda
    hi = lo if cfg.max_lambda is None else cfg.max_lambda
    frac = min(1.0, step / max(1, total))
    if cfg.lambda_schedule == "constant":
        return lo
    if cfg.lambda_schedule == "step":
        frac = int(frac * cfg.lambda_steps) / cfg.lambda_steps
    return lo + (hi - lo) * frac


@torch.no_grad()
def proximal_step(gates: list[torch.Tensor], lr: float, lam: float) -> None:
    """Soft-threshold every gate in place: g <- sign(g) * max(|g| - lr * lam, 0)."""
    for g in gates:
        g.copy_(torch.sign(g) * torch.clamp(g.abs() - lr * lam, min=0))


def gate_keys(ad: Adapter) -> list[str]:
    return [k for k in ad.tensors if k.endswith(".lora_gate")]


def prune(ad: Adapter) -> Adapter:
    """Drop every rank whose gate is exactly zero (modules left with none are dropped)."""
    cfg = ad.config
    rank_pattern, tensors, kept = {}, {}, []
    for (layer, proj), (r, _) in targets(cfg, ad.shape).items():
        p = module_path(layer, proj)
        g = ad.tensors[f"{p}.lora_gate"]
        keep = (g != 0).nonzero().flatten()
        if len(keep) == 0:
            continue
        key = re.escape(p.removeprefix("base_model.model."))
        rank_pattern[key] = len(keep)
        kept.append(p.removeprefix("base_model.model."))
        tensors[f"{p}.lora_A.weight"] = ad.tensors[f"{p}.lora_A.weight"][keep]
        tensors[f"{p}.lora_B.weight"] = ad.tensors[f"{p}.lora_B.weight"][:, keep]
        tensors[f"{p}.lora_gate"] = g[keep]
    if not kept:
        raise AdapterError("every SoRA gate is zero: the pruned adapter is empty")
    # Per-module ranks change the default scale alpha / r, so pin each module's alpha too.
    scales = scales_of(ad)
    alpha_pattern = {}
    for (layer, proj), s in scales.items():
        key = re.escape(module_path(layer, proj).removeprefix("base_model.model."))
        if key in rank_pattern:
            alpha_pattern[key] = s * rank_pattern[key] if not cfg.use_rslora else s * rank_pattern[key] ** 0.5
    new = SoraConfig(**{**asdict(cfg), "target_modules": kept, "layers_to_transform": None,
                        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern})
    return Adapter("sora", new, tensors, ad.shape)


def to_lora(ad: Adapter) -> Adapter:
    """A plain LoRA with the same outputs: pruned ranks, gates and scale folded into B."""
    pruned = prune(ad)
    scales = scales_of(pruned)
    tensors, ranks = {}, {}
    for (layer, proj), s in scales.items():
        p = module_path(layer, proj)
        g = pruned.tensors[f"{p}.lora_gate"]
        tensors[f"{p}.lora_A.weight"] = pruned.tensors[f"{p}.lora_A.weight"]
        tensors[f"{p}.lora_B.weight"] = pruned.tensors[f"{p}.lora_B.weight"] * (g * s)
        ranks[re.escape(p.removeprefix("base_model.model."))] = len(g)
    r = max(ranks.values())
    fields = {k: v for k, v in asdict(pruned.config).items() if k in LoraConfig.__dataclass_fields__}
    # scale 1 everywhere: alpha equals each module's rank
    cfg = LoraConfig(**{**fields, "r": r, "lora_alpha": r, "use_rslora": False,
                        "rank_pattern": ranks, "alpha_pattern": dict(ranks)})
    return Adapter("lora", cfg, tensors, ad.shape)


@register
class SoraType(LoraType):
    kind, peft_type, bank = "sora", "SORA", "lora"  # served pruned and gate-folded, as a LoRA

    def parse_config(self, d):
        return parse_lora_like(SoraConfig, d)

    def expected_shapes(self, cfg, shape):
        out = super().expected_shapes(cfg, shape)
        for (layer, proj), (r, _) in targets(cfg, shape).items():
            out[f"{module_path(layer, proj)}.lora_gate"] = (r,)
        return out

    def init(self, cfg, shape, generator=None):
        out = super().init(cfg, shape, generator)
        for k, s in self.expected_shapes(cfg, shape).items():
            if k.endswith("lora_gate"):
                out[k] = torch.ones(s)
        return out

    def factors(self, ad, layer, proj):
        """LoRA's factors with the gate between them folded into B: B diag(g) * scale."""
        f = super().factors(ad, layer, proj)
        if f is None:
            return None
        return f[0], f[1] * ad.tensors[f"{module_path(layer, proj)}.lora_gate"]
