"""The one table of adapter cases that every generic adapter test runs through."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.base import Adapter
from adapters.lora import LoraConfig
from adapters.prefix import PrefixConfig
from adapters.qaa import QAAConfig
from adapters.registry import get_type
from adapters.sora import SoraConfig


@dataclass
class Case:
    name: str
    kind: str
    make_config: object
    identity_at_init: bool = True
    """False for prefix tuning: its virtual tokens are attended from the first step."""


CASES = [
    Case("lora", "lora", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    Case("lora-all-rslora", "lora", lambda: LoraConfig(
        r=3, lora_alpha=6, use_rslora=True, layers_to_transform=[1],
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 1.5})),
    Case("sora", "sora", lambda: SoraConfig(r=4, target_modules=["q_proj", "up_proj"])),
    Case("prefix", "prefix", lambda: PrefixConfig(num_virtual_tokens=5), identity_at_init=False),
    Case("qaa-rx", "qaa", lambda: QAAConfig(circuit_layers=2, rotation="RX")),
    Case("qaa-ry-mlp", "qaa", lambda: QAAConfig(circuit_layers=3, rotation="RY", placement=["mlp"], layers_to_transform=[1])),
]
IDS = [c.name for c in CASES]


def make(case: Case, shape, seed: int = 0, trained: bool = True) -> Adapter:
    """A fresh adapter of this case; `trained` replaces zero-initialised tensors by random
    ones (and zeroes some SoRA gates) so the adapter changes the model's output."""
    g = torch.Generator().manual_seed(seed)
    cfg = case.make_config()
    t = get_type(case.kind)
    t.check_config(cfg, shape)
    tensors = t.init(cfg, shape, g)
    if trained:
        for k, v in tensors.items():
            if k.endswith("lora_gate"):
                tensors[k] = torch.randn(v.shape, generator=g).masked_fill(torch.rand(v.shape, generator=g) < 0.4, 0)
            elif torch.count_nonzero(v) == 0:
                tensors[k] = torch.randn(v.shape, generator=g) * 0.3
    return Adapter(case.kind, cfg, tensors, shape)
