"""LoRA in Hugging Face PEFT's format, and the LoRA slot bank (shared with SoRA).

File keys: `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight` (r, in) and
`...lora_B.weight` (out, r). Delta for one module: y += (x @ A.T @ B.T) * scale, scale =
lora_alpha / r (or / sqrt(r) with use_rslora); rank_pattern / alpha_pattern override per module.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import regex
import torch

from adapters import cpu_kernels
from adapters.base import (
    PROJECTIONS, Adapter, AdapterError, BaseShape, Capacity, check_positive_int, config_from_dict, layers_of,
    module_path,
)
from adapters.registry import AdapterType, register

ANY = object()
# Module patterns are tenants' regexes run against the model's module names: bounded in size,
# and matched with the `regex` module's timeout (it releases the GIL while matching), so a
# catastrophically backtracking pattern is refused instead of stalling the server.
MAX_PATTERN_CHARS = 512
MAX_PATTERNS = 4096
PATTERN_SECONDS = 0.25
# PEFT LoraConfig fields we accept only at their defaults (a non-default asks for a feature we lack).
PEFT_LORA_DEFAULTS = {
    "exclude_modules": None, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
    "megatron_config": None, "megatron_core": ANY, "trainable_token_indices": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "lora_ga_config": None, "use_dora": False,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": ANY,
    "monteclora_config": None, "layer_replication": None, "lora_bias": False, "target_parameters": None,
    "use_bdlora": None, "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
}


@dataclass
class LoraConfig:
    r: int = 8
    """Rank of every adapted module unless rank_pattern says otherwise."""
    lora_alpha: float = 8
    """Scale numerator: delta is multiplied by lora_alpha / r."""
    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Projection names (suffix match) or one regex (full match) over module paths, as in PEFT."""
    layers_to_transform: list[int] | int | None = None
    """Only these layer indices (None = every layer)."""
    rank_pattern: dict = field(default_factory=dict)
    """Per-module rank overrides: {pattern: r}, PEFT's matching."""
    alpha_pattern: dict = field(default_factory=dict)
    """Per-module alpha overrides: {pattern: alpha}."""
    use_rslora: bool = False
    """Rank-stabilised scale lora_alpha / sqrt(r)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input while training; ignored when serving."""
    task_type: str | None = "CAUSAL_LM"
    """PEFT metadata; only causal LM is served."""
    base_model_name_or_path: str | None = None
    """PEFT metadata: which base model the adapter was trained on."""
    inference_mode: bool = True
    """PEFT metadata."""
    init_lora_weights: bool | str = True
    """PEFT metadata: how it was initialised."""
    layers_pattern: str | list | None = None
    """PEFT metadata for layers_to_transform; our layers are always `layers`."""
    revision: str | None = None
    """PEFT metadata."""
    peft_version: str | None = None
    """PEFT metadata."""
    auto_mapping: dict | None = None
    """PEFT metadata."""

    def __post_init__(self):
        check_positive_int("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not 0 < self.lora_alpha < math.inf:
            raise AdapterError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise AdapterError(f"task_type {self.task_type!r} is not served (only CAUSAL_LM)")
        tm = self.target_modules
        if isinstance(tm, (list, tuple, set)):
            _check_names("target_modules", tm)
            self.target_modules = sorted(tm)
        elif not (tm is None or isinstance(tm, str)):
            raise AdapterError(f"target_modules must be a list of module names or one regex, got {type(tm).__name__}")
        elif isinstance(tm, str):
            _check_names("target_modules", [tm])
        for name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(patterns, dict):
                raise AdapterError(f"{name} must be an object of pattern -> value")
            _check_names(name, patterns)
        for k, v in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{k!r}]", v)
        for k, v in self.alpha_pattern.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise AdapterError(f"alpha_pattern[{k!r}] must be a positive number, got {v!r}")


def _check_names(field_name: str, names) -> None:
    if len(names) > MAX_PATTERNS:
        raise AdapterError(f"{field_name} has {len(names)} entries; at most {MAX_PATTERNS} are accepted")
    for n in names:
        if not isinstance(n, str) or not n:
            raise AdapterError(f"{field_name} entries must be non-empty strings, got {n!r}")
        if len(n) > MAX_PATTERN_CHARS:
            raise AdapterError(f"{field_name} entry of {len(n)} characters is longer than {MAX_PATTERN_CHARS}")


def _fullmatch(pattern: str, key: str, deadline: float, field_name: str) -> bool:
    """regex.fullmatch within what is left of one config's matching budget."""
    left = deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        return regex.fullmatch(pattern, key, timeout=left) is not None
    except TimeoutError:
        raise AdapterError(f"{field_name} pattern {pattern[:80]!r} takes too long to match the model's module "
                           f"names (over {PATTERN_SECONDS} s)") from None
    except regex.error as e:
        raise AdapterError(f"{field_name} pattern {pattern[:80]!r} is not a valid regular expression: {e}") from None


def parse_lora_like(cls, d: dict):
    defaults = {k: v for k, v in PEFT_LORA_DEFAULTS.items() if v is not ANY}
    d = {k: v for k, v in d.items() if not (k in PEFT_LORA_DEFAULTS and PEFT_LORA_DEFAULTS[k] is ANY)}
    return config_from_dict(cls, d, ignore_if_default=defaults)


def _pattern(patterns: dict, key: str, deadline: float, field_name: str):
    for p in patterns:
        if _fullmatch(rf"(?:.*\.)?(?:{p})", key, deadline, field_name):
            return patterns[p]
    return None


def targets(cfg, shape: BaseShape) -> dict[tuple[int, str], tuple[int, float]]:
    """{(layer, proj): (rank, scale)} for every module the config adapts."""
    tm = cfg.target_modules
    if tm is None or tm == []:
        raise AdapterError("target_modules is empty: name projections such as q_proj, v_proj")
    if isinstance(tm, str):
        tm = [tm] if tm in PROJECTIONS else tm
    used = set()
    out = {}
    deadline = time.monotonic() + PATTERN_SECONDS
    for layer in layers_of(cfg.layers_to_transform, shape):
        for proj in PROJECTIONS:
            key = module_path(layer, proj).removeprefix("base_model.model.")
            if isinstance(tm, str):
                hit = _fullmatch(tm, key, deadline, "target_modules")
            else:  # PEFT: a list entry names a module exactly or by a dotted suffix
                hits = [t for t in tm if key == t or key.endswith("." + t)]
                used.update(hits)
                hit = bool(hits)
            if not hit:
                continue
            r = _pattern(cfg.rank_pattern, key, deadline, "rank_pattern") or cfg.r
            alpha = _pattern(cfg.alpha_pattern, key, deadline, "alpha_pattern") or cfg.lora_alpha
            out[(layer, proj)] = (r, alpha / math.sqrt(r) if cfg.use_rslora else alpha / r)
    unused = [t for t in tm if t not in used] if not isinstance(tm, str) else []
    if unused and cfg.layers_to_transform is None:
        raise AdapterError(f"target module {unused[0]!r} cannot be adapted (supported: {', '.join(PROJECTIONS)})")
    if not out:
        raise AdapterError(f"target_modules {cfg.target_modules!r} match no projection of the base model")
    return out


def scales_of(ad: Adapter) -> dict[tuple[int, str], float]:
    """{(layer, proj): scale} of a LoRA-family adapter, derived from its config once."""
    if "scales" not in ad.memo:
        if ad.shape is None:
            raise AdapterError("adapter has no base shape attached (load it through adapters.files)")
        ad.memo["scales"] = {k: sc for k, (r, sc) in targets(ad.config, ad.shape).items()}
    return ad.memo["scales"]


def lora_delta(x, A, B):
    # x (..., in), A (r, in), B (out, r) with the scale folded in -> (..., out)
    return (x @ A.t().to(x.dtype)) @ B.t().to(x.dtype)


@register
class LoraType(AdapterType):
    kind, peft_type = "lora", "LORA"

    def parse_config(self, d):
        return parse_lora_like(LoraConfig, d)

    def config_dict(self, cfg):
        return asdict(cfg)

    def expected_shapes(self, cfg, shape):
        out = {}
        for (layer, proj), (r, _) in targets(cfg, shape).items():
            i, o = shape.proj_io(proj)
            out[f"{module_path(layer, proj)}.lora_A.weight"] = (r, i)
            out[f"{module_path(layer, proj)}.lora_B.weight"] = (o, r)
        return out

    def init(self, cfg, shape, generator=None):
        # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so the adapter starts as identity.
        out = {}
        for k, s in self.expected_shapes(cfg, shape).items():
            if k.endswith("lora_A.weight"):
                bound = 1 / math.sqrt(s[1])
                out[k] = (torch.rand(s, generator=generator) * 2 - 1) * bound
            else:
                out[k] = torch.zeros(s)
        return out

    def factors(self, ad: Adapter, layer: int, proj: str):
        """(A (r, in), B (out, r)) with the scale folded into B, or None if not adapted;
        differentiable, so training and the bank share it (SoRA folds its gate in too)."""
        p = module_path(layer, proj)
        A = ad.tensors.get(f"{p}.lora_A.weight")
        if A is None:
            return None
        return A, ad.tensors[f"{p}.lora_B.weight"] * scales_of(ad)[(layer, proj)]

    def linear(self, ad, layer, name, x, y):
        f = self.factors(ad, layer, name)
        return y if f is None else y + lora_delta(x, *f)

    def compiled(self, ad: Adapter):
        """{(layer, proj): (A, B*scale)}: what a LoRA bank slot holds."""
        return {key: self.factors(ad, *key) for key in scales_of(ad)}

    def check_capacity(self, cfg, shape, cap: Capacity):
        r = max(r for r, _ in targets(cfg, shape).values())
        if r > cap.max_rank:
            raise AdapterError(f"rank {r} exceeds this server's max LoRA rank {cap.max_rank}")

    def make_bank(self, shape, max_slots, device, dtype, cap: Capacity):
        return LoraBank(shape, max_slots, device, dtype, cap.max_rank)


class LoraBank:
    """Slot bank for LoRA-family adapters (LoRA, and SoRA with its gates folded in).

    For each (layer, proj) that any loaded adapter targets: A (S, r_max, in) and
    Bt (S, r_max, out) = (B * scale).T; ranks below r_max are zero-padded, which is exact.
    Slot 0 is never written: all zeros, "no adapter".

    `linear(layer, proj, x, y, route)` has the semantics of this reference loop:
        for b in range(len(x)):
            y[b] += x[b] @ A[slots[b]].T @ B[slots[b]].T
    computed as two batched matmuls over just the rows whose adapter has this module, and
    just the first r columns, r = the largest rank among them (the rest is zero padding).
    The per-row weights gathered for a batch are kept (one composition per module) until a
    slot or the composition changes, because decode steps repeat the same batch composition.
    Up to cpu_kernels.MAX_TOKENS fp32 or bf16 tokens on the CPU go through the fused kernel
    instead: one call per module, reading the slots directly, adding into y in place (fp32
    arithmetic, y rounded once). The banks hold the model's dtype.

    `linear_static` is the same loop for a captured step (engine.graph): every row, every
    module the bank holds, the first `width` ranks; no host-side routing.
    """

    def __init__(self, shape: BaseShape, max_slots: int, device, dtype, max_rank: int = 64):
        self.shape, self.S, self.device, self.dtype, self.max_rank = shape, max_slots, device, dtype, max_rank
        self.mods: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.ranks: dict[tuple[int, str], list[int]] = {}  # module -> rank held by each slot (0 = none)
        self.rank_t: dict[tuple[int, str], torch.Tensor] = {}  # the same as (S,) int64 tensors, for the kernel
        self.gathered: dict = {}  # module -> (slots of the rows, (A, Bt) gathered for them)
        self.width = 0  # ranks linear_static reads: a power of two >= every rank loaded so far
        self.layout = 0  # bumped when the module set or width changes (a captured step's shapes)

    def _mod(self, key):
        if key not in self.mods:
            i, o = self.shape.proj_io(key[1])
            self.mods[key] = (torch.zeros(self.S, self.max_rank, i, device=self.device, dtype=self.dtype),
                              torch.zeros(self.S, self.max_rank, o, device=self.device, dtype=self.dtype))
            self.ranks[key] = [0] * self.S
            self.rank_t[key] = torch.zeros(self.S, dtype=torch.int64)
            self.layout += 1
        return self.mods[key]

    def load(self, slot: int, compiled: dict) -> None:
        """Copy one adapter's (A, B*scale) per module into `slot` (validated beforehand)."""
        assert 0 < slot < self.S
        for key, (A, _) in compiled.items():
            if A.shape[0] > self.max_rank:
                raise AdapterError(f"rank {A.shape[0]} exceeds this server's max LoRA rank {self.max_rank}")
        self.clear(slot)
        r_top = max((A.shape[0] for A, _ in compiled.values()), default=0)
        if r_top > self.width:  # only grows, so a server's captured shapes settle
            self.width = min(self.max_rank, 1 << (r_top - 1).bit_length())
            self.layout += 1
        for key, (A, B) in compiled.items():
            bA, bBt = self._mod(key)
            r = A.shape[0]
            bA[slot, :r].copy_(A)
            bBt[slot, :r].copy_(B.t())
            self.ranks[key][slot] = self.rank_t[key][slot] = r

    def clear(self, slot: int) -> None:
        self.gathered.clear()
        for key, ranks in self.ranks.items():
            if ranks[slot]:
                bA, bB = self.mods[key]
                bA[slot].zero_()
                bB[slot].zero_()
                ranks[slot] = self.rank_t[key][slot] = 0

    def route(self, slots: torch.Tensor) -> "_Route":
        return _Route(slots.tolist(), slots.device)

    def active(self, route) -> set:
        """The (layer, proj) modules that some row of this route adapts."""
        used = set(route.slots) - {0}
        return {key for key, ranks in self.ranks.items() if any(ranks[s] for s in used)}

    def linear(self, layer, name, x, y, route, col=None, width=None):
        """Adds this module's deltas into y in place and returns it; with `col`, y is a wider
        output whose columns col..col + width are this module's (a fused q|k|v)."""
        ranks = self.ranks.get((layer, name))
        if ranks is None:
            return y
        if route.listed is not None and x.shape[1] * len(route.listed[0]) <= cpu_kernels.MAX_TOKENS \
                and x.stride(-1) == 1 and y.stride(-1) == 1:
            plan = route.plans.get((layer, name), False)
            if plan is False:  # bound once per routing and module (see cpu_kernels.lora_plan)
                plan = route.plans[(layer, name)] = cpu_kernels.lora_plan(
                    *route.listed, self.rank_t[(layer, name)], *self.mods[(layer, name)], x.dtype)
            if plan is not None:
                return plan(y, x, col or 0)
        if col is not None:
            self.linear(layer, name, x, y[..., col : col + width], route)
            return y
        rows, sl, active = route.select(ranks)
        if not active:
            return y
        held = self.gathered.get((layer, name))
        if held is None or held[0] != active:  # only the latest composition is kept per module
            r = max(ranks[s] for s in active)
            A, Bt = self.mods[(layer, name)]
            held = self.gathered[(layer, name)] = (active, (A[sl, :r].transpose(1, 2), Bt[sl, :r]))
        g = held[1]
        xs = x if rows is None else x[rows]
        d = torch.bmm(torch.bmm(xs, g[0]), g[1])  # (B', T, r) -> (B', T, out)
        # in place: y is the base output (or its q/k/v slice), fresh each forward
        return y.add_(d) if rows is None else y.index_add_(0, rows, d)


    def linear_static(self, layer, name, x, y, slots):
        """Capture-safe `linear` (no host syncs, shapes fixed by the bank's layout): for every
        row b, y[b] + x[b] @ A[slots[b]].T @ B[slots[b]].T, as a gather of each row's slot
        and two batched matmuls. Slot 0 and ranks past a slot's own are zeros, so rows
        without this module get y exactly. x (B, T, in), y (B, T, out), slots (B,) int64."""
        mod = self.mods.get((layer, name))
        if mod is None:
            return y
        A, Bt = mod
        a = A[:, : self.width].index_select(0, slots)  # (B, w, in)
        b = Bt[:, : self.width].index_select(0, slots)  # (B, w, out)
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b)


class _Route:
    """One forward's rows -> slots, with the index tensors shared by modules of equal pattern."""

    def __init__(self, slots: list[int], device):
        self.slots, self.device, self.cache = slots, device, {}
        used = [b for b, s in enumerate(slots) if s]
        # every row with a slot and its slot, for the CPU kernel (which skips rank-0 modules)
        self.listed = (torch.tensor(used), torch.tensor([slots[b] for b in used])) if device.type == "cpu" else None
        self.plans: dict = {}  # module -> the CPU kernel bound to this routing (None: not usable)

    def select(self, ranks: list[int]):
        """(rows or None for all, their slots, the slots as a tuple) for the rows whose slot
        has the module; the tuple is () when none does."""
        active = tuple(s for s in self.slots if ranks[s])
        if active and active not in self.cache:
            idx = [b for b, s in enumerate(self.slots) if ranks[s]]
            rows = None if len(idx) == len(self.slots) else torch.tensor(idx, device=self.device)
            self.cache[active] = (rows, torch.tensor(active, device=self.device))
        return (*self.cache.get(active, (None, None)), active)
