"""Trainable parameters per method, and their ratio to the base model (the survey's Table 1)."""

from __future__ import annotations

from adapters.base import BaseShape
from adapters.registry import get_type

# GPT-Neo-125M, the survey's base model: d=768, 12 layers, 12 heads, MLP 3072.
GPT_NEO_125M = BaseShape(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
                         intermediate_size=3072, n_params=125_198_592)


def count_trainable(method: str, shape: BaseShape, config=None) -> int:
    """Trainable parameters of `method` ('full' or an adapter type) on a base model shape."""
    if method == "full":
        return shape.n_params
    t = get_type(method)
    cfg = config if config is not None else t.parse_config({})
    t.check_config(cfg, shape)
    return sum(_numel(s) for s in t.expected_shapes(cfg, shape).values())


def ratio(method: str, shape: BaseShape, config=None) -> float:
    """Trainable parameters as a fraction of the base model's."""
    return count_trainable(method, shape, config) / shape.n_params


def _numel(s) -> int:
    n = 1
    for x in s:
        n *= x
    return n
