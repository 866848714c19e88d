"""What every adapter type shares: the base model's shape, the error type, the type contract.

An adapter in memory is `Adapter(kind, config, tensors)`: its config dataclass and its
tensors keyed exactly as in `adapter_model.safetensors` (PEFT's keys). Training turns the
tensors into parameters; serving compiles them into a slot bank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import torch

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN_PROJ + MLP_PROJ
PEFT_PREFIX = "base_model.model.model.layers"
CACHE_ENV = "QAA_CACHE_DIR"


def cache_root() -> Path:
    """Where qaa-serve keeps what it derives once per machine (converted checkpoints, compiled
    kernels): $QAA_CACHE_DIR, else ~/.cache/qaa-serve."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "qaa-serve"


@lru_cache(maxsize=1)
def cpuinfo() -> str:
    """/proc/cpuinfo's text, or "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(text: str) -> str:
    """The first `flags` line of a /proc/cpuinfo text ("" if it has none): what the CPU can do
    (the kernels' build key, the default dtype)."""
    return next((ln for ln in text.splitlines() if ln.startswith("flags")), "")


class AdapterError(ValueError):
    """An adapter file, config or tensor is unusable; the message names the problem."""


@dataclass(frozen=True)
class BaseShape:
    """The shape facts of a base model that adapters need (no dependency on the engine)."""

    dim: int
    """Hidden size d."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads."""
    head_dim: int
    """Per-head width."""
    intermediate_size: int
    """MLP width."""
    n_params: int
    """Parameter count of the whole base model (for ratios)."""

    def proj_io(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        d, hd, f = self.dim, self.head_dim, self.intermediate_size
        return {
            "q_proj": (d, self.n_heads * hd), "k_proj": (d, self.n_kv_heads * hd),
            "v_proj": (d, self.n_kv_heads * hd), "o_proj": (self.n_heads * hd, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
        }[proj]


def module_path(layer: int, proj: str) -> str:
    """PEFT's module path of a projection: base_model.model.model.layers.3.self_attn.q_proj."""
    block = "self_attn" if proj in ATTN_PROJ else "mlp"
    return f"{PEFT_PREFIX}.{layer}.{block}.{proj}"


@dataclass
class Adapter:
    kind: str
    """Registry key: 'qaa', 'lora', 'sora' or 'prefix'."""
    config: object
    """The type's validated config dataclass."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weights keyed as in adapter_model.safetensors."""
    shape: BaseShape | None = None
    """The base model it was validated against."""
    memo: dict = field(default_factory=dict, repr=False, compare=False)
    """Values derived from the config once (scales, targets); never saved."""

    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


@dataclass(frozen=True)
class Capacity:
    """What one adapter may demand of a server. Every adapter is checked against it where it
    enters (an upload, a read from the store) and the slot banks are sized by it, so no
    adapter can make loading or serving it cost more than the operator allowed."""

    max_rank: int = 64
    """Largest LoRA/SoRA rank of any module (the LoRA bank's width)."""
    max_circuit_layers: int = 64
    """Deepest QAA circuit (L); compiling a circuit costs L * 2^n per module."""
    max_virtual_tokens: int = 128
    """Most prefix-tuning virtual tokens (the prefix bank's width; must leave room in the context)."""

    def within(self, max_seq_len: int) -> "Capacity":
        """This capacity for a context of max_seq_len: a prefix must leave room for at least
        one prompt token and one generated token."""
        from dataclasses import replace

        return replace(self, max_virtual_tokens=max(1, min(self.max_virtual_tokens, max_seq_len - 2)))


def config_from_dict(cls, d: dict, ignore_if_default: dict | None = None):
    """Build a config dataclass from JSON: unknown fields and wrong types are errors.

    `ignore_if_default` lists foreign fields (PEFT's) that are accepted only at the given
    default value, because a non-default value would ask for something not implemented.
    """
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k in known:
            kwargs[k] = v
        elif ignore_if_default is not None and k in ignore_if_default:
            if v != ignore_if_default[k] and not (v in (None, False, [], {}) and ignore_if_default[k] in (None, False, [], {})):
                raise AdapterError(f"config field {k}={v!r} is not supported (only {ignore_if_default[k]!r})")
        else:
            raise AdapterError(f"unknown config field {k!r} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise AdapterError(f"bad config for {cls.__name__}: {e}") from None


def check_positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise AdapterError(f"{name} must be a positive integer, got {v!r}")


def layers_of(layers, shape: BaseShape) -> list[int]:
    """Resolve a layers field (None = all, an int, or a list) against the base model."""
    if layers is None:
        return list(range(shape.n_layers))
    out = [layers] if isinstance(layers, int) else list(layers)
    for i in out:
        if not isinstance(i, int) or not 0 <= i < shape.n_layers:
            raise AdapterError(f"layer {i!r} does not exist in a base model of {shape.n_layers} layers")
    return sorted(set(out))


def n_qubits(dim: int) -> int:
    """ceil(log2 d): the qubits that hold a d-dimensional amplitude embedding."""
    return max(1, math.ceil(math.log2(dim)))
