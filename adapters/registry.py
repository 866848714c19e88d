"""One registry of adapter types, keyed by type string, and the contract each type fulfils.

Like PEFT's one-config-one-model-per-type mapping: a type module defines a subclass of
`AdapterType` and registers an instance with `@register`. Everything generic (files,
validation, seams, tests) goes through the registry, so a new type is one new file.
"""

from __future__ import annotations

import torch

from adapters.base import Adapter, AdapterError, BaseShape, Capacity

REGISTRY: dict[str, "AdapterType"] = {}


class AdapterType:
    """The contract of one adapter type."""

    kind: str = ""
    """Registry key ('lora')."""
    peft_type: str = ""
    """Value of "peft_type" in adapter_config.json ('LORA')."""
    bank: str = ""
    """Which type's slot bank serves it when it is not its own (SoRA: 'lora'), so that one
    batched kernel covers both types' rows."""

    @property
    def bank_kind(self) -> str:
        return self.bank or self.kind

    # --- config and tensors --------------------------------------------------------------
    def parse_config(self, d: dict):
        """adapter_config.json (parsed) -> validated config dataclass."""
        raise NotImplementedError

    def config_dict(self, cfg) -> dict:
        """Config dataclass -> the JSON written to adapter_config.json."""
        raise NotImplementedError

    def expected_shapes(self, cfg, shape: BaseShape) -> dict[str, tuple[int, ...]]:
        """Every tensor the file must hold, with its shape, for this base model."""
        raise NotImplementedError

    def init(self, cfg, shape: BaseShape, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Fresh trainable tensors; an adapter starts as the identity (the base model)."""
        raise NotImplementedError

    def check_config(self, cfg, shape: BaseShape) -> None:
        """Raise AdapterError when the config cannot apply to this base model."""
        self.expected_shapes(cfg, shape)

    # --- one adapter, whole batch (training and reference) --------------------------------
    def linear(self, ad: Adapter, layer: int, name: str, x, y):
        return y

    def residual(self, ad: Adapter, layer: int, where: str, h):
        return h

    def prefix(self, ad: Adapter, layer: int, batch: int):
        return None

    def check_capacity(self, cfg, shape: BaseShape, cap: Capacity) -> None:
        """Raise AdapterError when the adapter demands more than `cap` allows (checked before
        its tensors are read, so a resource bomb costs nothing to refuse)."""

    def virtual_tokens(self, cfg) -> int:
        """Cache positions the adapter occupies before the prompt (prefix tuning)."""
        return 0

    # --- serving ------------------------------------------------------------------------
    def make_bank(self, shape: BaseShape, max_slots: int, device, dtype, cap: Capacity):
        """A slot bank for this type, sized by `cap`: see the Bank classes' docstrings."""
        raise NotImplementedError


def register(cls):
    inst = cls()
    REGISTRY[inst.kind] = inst
    return cls


def get_type(kind: str) -> AdapterType:
    _load_all()
    try:
        return REGISTRY[kind]
    except KeyError:
        raise AdapterError(f"unknown adapter type {kind!r} (known: {', '.join(sorted(REGISTRY))})") from None


def kinds() -> list[str]:
    """Every registered adapter type string, sorted."""
    _load_all()
    return sorted(REGISTRY)


def type_for_peft(peft_type) -> AdapterType:
    _load_all()
    for t in REGISTRY.values():
        if t.peft_type == peft_type:
            return t
    known = ", ".join(sorted(t.peft_type for t in REGISTRY.values()))
    raise AdapterError(f"unknown adapter type: peft_type {peft_type!r} (supported: {known})")


def _load_all():
    # Importing the type modules registers them; done lazily to keep imports one-way.
    if len(REGISTRY) < 4:
        from adapters import lora, prefix, qaa, sora  # noqa: F401
