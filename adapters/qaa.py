"""QAA: quantum-amplitude embedded adaptation on the residual stream.

For a module at (layer, where), where in {"attn", "mlp"}: h is the residual stream right
after that sub-block (attention or MLP, residual added). Then
    z  = <Z> of the circuit on the amplitude embedding of h     (n = ceil(log2 d) qubits)
    h <- h + W_up z + b                                          (W_up (d, n), zero-initialised)
File keys: `base_model.model.model.layers.{i}.qaa_{where}.angles` (L, n), `.up.weight` (d, n),
`.up.bias` (d,) when bias is on; config `"peft_type": "QAA"`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from adapters import cpu_kernels
from adapters.base import PEFT_PREFIX, AdapterError, BaseShape, Capacity, check_positive_int, config_from_dict, layers_of, n_qubits
from adapters.circuit import ROTATIONS, circuit_z, circuit_z_shift, compile_circuit, expectations, prepare
from adapters.emulation import Emulation, make_emulation, noisy_observables, noisy_z, shot_z
from adapters.registry import AdapterType, register

PLACES = ("attn", "mlp")
GRADIENTS = ("autograd", "parameter-shift")


@dataclass
class QAAConfig:
    circuit_layers: int = 2
    """L: rotation + CNOT-ring layers of the circuit."""
    rotation: str = "RX"
    """RX or RY on every qubit."""
    placement: list[str] = field(default_factory=lambda: list(PLACES))
    """After which sub-blocks: "attn", "mlp" or both."""
    layers_to_transform: list[int] | int | None = None
    """Which transformer layers (None = all)."""
    bias: bool = True
    """Learn a bias b with the up-projection."""
    gradient: str = "autograd"
    """How training differentiates the angles: autograd or parameter-shift."""
    hidden_size: int | None = None
    """d of the base model (filled in; checked on load)."""
    n_qubits: int | None = None
    """ceil(log2 d) (filled in; checked on load)."""
    task_type: str | None = "CAUSAL_LM"
    """Only causal LM is served."""
    base_model_name_or_path: str | None = None
    """Which base model it was trained on (metadata)."""
    qaa_shots: int | None = None
    """Serving and evaluation: estimate <Z> from this many shots per circuit execution
    (adapters.emulation); None = exact. Training is always exact."""
    qaa_noise: str | None = None
    """Serving and evaluation: "depolarizing:p" on every wire after each circuit layer; None = none."""
    qaa_seed: int = 0
    """Seeds this adapter's shot sampler (each load starts the same stream)."""

    def __post_init__(self):
        check_positive_int("circuit_layers", self.circuit_layers)
        if self.rotation not in ROTATIONS:
            raise AdapterError(f"rotation {self.rotation!r} is not one of {', '.join(ROTATIONS)}")
        if isinstance(self.placement, str):
            self.placement = [self.placement]
        if not self.placement or any(p not in PLACES for p in self.placement):
            raise AdapterError(f"placement {self.placement!r} must be a non-empty list of {', '.join(PLACES)}")
        self.placement = [p for p in PLACES if p in self.placement]
        if self.gradient not in GRADIENTS:
            raise AdapterError(f"gradient {self.gradient!r} is not one of {', '.join(GRADIENTS)}")
        make_emulation(self.qaa_shots, self.qaa_noise, self.qaa_seed)  # validates

    def emulation(self) -> Emulation | None:
        """How serving runs this adapter's circuit (None: exactly)."""
        return make_emulation(self.qaa_shots, self.qaa_noise, self.qaa_seed)


def key(layer: int, where: str, name: str) -> str:
    return f"{PEFT_PREFIX}.{layer}.qaa_{where}.{name}"


def modules(cfg: QAAConfig, shape: BaseShape) -> list[tuple[int, str]]:
    return [(layer, w) for layer in layers_of(cfg.layers_to_transform, shape) for w in cfg.placement]


@register
class QAAType(AdapterType):
    kind, peft_type = "qaa", "QAA"

    def parse_config(self, d):
        return config_from_dict(QAAConfig, d)

    def config_dict(self, cfg):
        return asdict(cfg)

    def check_config(self, cfg, shape):
        n = n_qubits(shape.dim)
        if n < 2:
            raise AdapterError(f"QAA needs a hidden size of at least 3, the base model has {shape.dim}")
        for k, want in (("hidden_size", shape.dim), ("n_qubits", n)):
            got = getattr(cfg, k)
            if got is not None and got != want:
                raise AdapterError(f"QAA config {k}={got} does not fit the base model ({k}={want})")
        cfg.hidden_size, cfg.n_qubits = shape.dim, n
        modules(cfg, shape)

    def expected_shapes(self, cfg, shape):
        n, d = n_qubits(shape.dim), shape.dim
        out = {}
        for layer, w in modules(cfg, shape):
            out[key(layer, w, "angles")] = (cfg.circuit_layers, n)
            out[key(layer, w, "up.weight")] = (d, n)
            if cfg.bias:
                out[key(layer, w, "up.bias")] = (d,)
        return out

    def init(self, cfg, shape, generator=None):
        self.check_config(cfg, shape)
        out = {}
        for k, s in self.expected_shapes(cfg, shape).items():
            # angles as PennyLane's TorchLayer draws them; the up-projection at zero = identity
            out[k] = torch.rand(s, generator=generator) * 2 * math.pi if k.endswith("angles") else torch.zeros(s)
        return out

    def residual(self, ad, layer, where, h):
        theta = ad.tensors.get(key(layer, where, "angles"))
        if theta is None:
            return h
        cfg = ad.config
        if cfg.gradient == "parameter-shift":
            z = circuit_z_shift(h, theta, cfg.rotation)
        elif cfg.rotation == "RX" and cpu_kernels.usable(h, dtypes=(torch.float32,)):  # training on the CPU: the fused kernel pair
            z = cpu_kernels.rx_z(h, compile_circuit(theta, "RX"), theta.shape[1], theta.shape[0])
        else:
            z = circuit_z(h, theta, cfg.rotation)
        delta = z @ ad.tensors[key(layer, where, "up.weight")].t().float()
        if cfg.bias:
            delta = delta + ad.tensors[key(layer, where, "up.bias")].float()
        return h + delta if h.dtype == torch.float32 else (h.float() + delta).to(h.dtype)  # rounded once

    def compiled(self, ad):
        """({(layer, where): (*circuit, W_up, b)}, variant, emulated) with the circuit compiled
        once, at load time (RX: one (2, 2^n) phase tensor; RY: two Kronecker-factor stacks).
        emulated is None (exact), or (Emulation, {(layer, where): noisy observables (n, d, d)})."""
        cfg, out = ad.config, {}
        emu = cfg.emulation()
        noisy = {}
        if emu is not None and emu.depolarizing > 0:
            noisy = {(layer, w): noisy_observables(ad.tensors[key(layer, w, "angles")], cfg.rotation, emu.depolarizing,
                                                   ad.shape.dim).float() for layer, w in modules(cfg, ad.shape)}
        for layer, w in modules(cfg, ad.shape):
            circuit = compile_circuit(ad.tensors[key(layer, w, "angles")], cfg.rotation)
            circuit = (circuit,) if cfg.rotation == "RX" else circuit
            up = ad.tensors[key(layer, w, "up.weight")]
            b = ad.tensors[key(layer, w, "up.bias")] if cfg.bias else torch.zeros(up.shape[0])
            out[(layer, w)] = (*circuit, up, b)
        return out, (cfg.rotation, cfg.circuit_layers), (None if emu is None else (emu, noisy))

    def check_capacity(self, cfg, shape, cap: Capacity):
        if cfg.circuit_layers > cap.max_circuit_layers:
            raise AdapterError(f"circuit_layers {cfg.circuit_layers} exceeds this server's limit {cap.max_circuit_layers}")

    def make_bank(self, shape, max_slots, device, dtype, cap: Capacity):
        # [W_up | b] is a weight: bf16 in a bf16 model (the kernel reads it into fp32); fp32 otherwise
        return QAABank(shape, max_slots, device, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)


def export_qnode(ad, layer: int, where: str, **options):
    """One module of a QAA adapter as a PennyLane QNode (adapters.export.export_qnode: device,
    shots, diff_method, noise)."""
    from adapters.export import export_qnode as export

    return export(ad, layer, where, **options)


class QAABank:
    """Slot bank for QAA adapters, grouped by circuit variant (rotation, L).

    Per module (layer, where) and variant: the compiled circuit (RX: (S, 2, 2^n) cos/sin of
    the total phase; RY: Kronecker factors (S, L, 2^a, 2^a), (S, L, 2^b, 2^b)) and [W_up | b]
    stacked as (S, n + 1, d). The circuit is fp32 whatever the model's dtype; [W_up | b] is a
    weight, held in bf16 in a bf16 model (like LoRA's factors: half the bytes of the step's
    coldest reads) and fp32 otherwise. <Z> and the up-projection are computed in fp32, and a
    bf16/fp16 h gets h + delta rounded once.
    Slot 0 stays empty.

    `residual(layer, where, h, route)` has the semantics of this reference loop:
        for b in range(len(h)):
            s = slots[b]
            if s and (layer, where) in adapter(s):
                h[b] = h[b] + W_up[s] @ Z(h[b]; circuit[s]) + b[s]
    computed for all rows of one variant at once (per-row compiled tensors gathered by slot):
    [Z, 1] @ [W_up | b]^T added to h in one batched matmul. RX modules on fp32 or bf16 CPU
    states go through the fused kernel instead (one call per module, reading the bank's slots directly;
    same semantics).

    A slot loaded with an emulation (config qaa_shots / qaa_noise) replaces Z(h[b]; circuit[s])
    by its shot estimate (drawn from the slot's own seeded stream) or its noisy
    expectation; its rows form their own group per module, so exact rows never pay for it.
    Shots on RX modules of CPU states run in the fused kernel (sampling included), its stream
    keyed by (qaa_seed, the slot's count of kernel calls since its load, the vector); elsewhere
    the torch reference (emulation.shot_z) draws from the slot's torch generator.

    `residual_static` is the exact loop for a captured step (engine.graph): every row through
    every module and variant the bank holds; emulated slots are not served by it.
    """

    def __init__(self, shape: BaseShape, max_slots: int, device, upb_dtype=torch.float32):
        self.shape, self.S, self.device = shape, max_slots, device
        self.upb_dtype = upb_dtype
        self.n = n_qubits(shape.dim)
        self.mods: dict[tuple, list[torch.Tensor]] = {}  # (layer, where, variant) -> [c0, (c1,) upb]
        self.owned: dict[int, tuple] = {}  # slot -> (variant, modules)
        self.gathered: dict = {}  # (layer, where, variant) -> (slots of the rows, per-row tensors)
        self.emulated: dict[int, tuple] = {}  # slot -> (Emulation, generator, {(layer, where): noisy obs})
        self.calls: dict[int, int] = {}  # emulated slot -> fused-kernel calls since its load (its stream's counter)
        self.layout = 0  # bumped when a (module, variant) is added (a captured step's shapes)

    def load(self, slot: int, compiled) -> None:
        per_module, variant, emulated = compiled
        assert 0 < slot < self.S
        self.clear(slot)
        for (layer, w), (*circuit, up, b) in per_module.items():
            tensors = (*circuit, torch.cat([up.t(), b[None]]))  # upb: (n + 1, d)
            k = (layer, w, variant)
            if k not in self.mods:
                self.mods[k] = [torch.zeros(self.S, *t.shape, device=self.device) for t in tensors[:-1]]  # the circuit: fp32
                self.mods[k].append(torch.zeros(self.S, *tensors[-1].shape, device=self.device, dtype=self.upb_dtype))
                self.layout += 1
                prepare(self.n, self.shape.dim, *variant, self.device)
            for bank_t, t in zip(self.mods[k], tensors):
                bank_t[slot].copy_(t)
        self.owned[slot] = (variant, frozenset(per_module))
        if emulated is not None:
            emu, noisy = emulated
            self.emulated[slot] = (emu, emu.generator(self.device), noisy)
            self.calls[slot] = 0

    def clear(self, slot: int) -> None:
        self.gathered.clear()
        variant, mods = self.owned.pop(slot, (None, ()))
        self.emulated.pop(slot, None)
        self.calls.pop(slot, None)
        for layer, w in mods:
            for t in self.mods[(layer, w, variant)]:
                t[slot].zero_()

    def route(self, slots: torch.Tensor):
        """Per forward: {(layer, where): [(variant, rows, slot_ids, listed, emulated, plans)]}
        for the rows that use QAA; rows is None when every row does; listed = (rows, slots) as
        CPU int64 tensors for the fused kernel; emulated is the one emulated slot of the entry,
        or 0; plans holds the fused kernel bound to the entry per module (see _plan). Modules
        used by the same slots share one entry."""
        by_slot: dict[int, list[int]] = {}
        for b, s in enumerate(slots.tolist()):
            if s:
                by_slot.setdefault(s, []).append(b)
        users: dict = {}  # (module, variant) -> slots that have it
        for s in by_slot:
            variant, mods = self.owned.get(s, (None, ()))
            for m in mods:
                users.setdefault((m, variant, s if s in self.emulated else 0), []).append(s)
        made: dict = {}
        route: dict = {}
        for (m, variant, emulated), ss in users.items():
            key = (variant, emulated, tuple(ss))
            if key not in made:
                rows = [b for s in ss for b in by_slot[s]]
                sl = tuple(s for s in ss for _ in by_slot[s])
                rows_t = None if rows == list(range(len(slots))) else torch.tensor(rows, device=slots.device)
                listed = (torch.tensor(rows), torch.tensor(sl)) if slots.device.type == "cpu" else None
                made[key] = (variant, rows_t, sl, listed, emulated, {})
            route.setdefault(m, []).append(made[key])
        return route

    def active(self, route) -> set:
        """The (layer, where) modules that some row of this route adapts."""
        return set(route)

    def residual(self, layer, where, h, route):
        for variant, rows, sl, listed, emulated, plans in route.get((layer, where), ()):
            rotation, L = variant
            if emulated:
                h = self._emulated(layer, where, h, variant, rows, sl, listed, plans, emulated)
                continue
            plan = self._plan(layer, where, variant, listed, plans, h)
            if plan is not None:
                h = plan(h)
                continue
            *circuit, upb = self._gather((layer, where, variant), sl)
            x = h if rows is None else h[rows]  # (B', T, d)
            compiled = circuit[0] if rotation == "RX" else circuit
            z1 = expectations(x, compiled, rotation, self.n, L, with_one=True)  # (B', T, n + 1): [Z, 1], fp32
            new = torch.baddbmm(x.float(), z1, upb.float()).to(h.dtype)  # x + Z W_up^T + b in fp32, one op, rounded once
            h = new if rows is None else h.index_copy_(0, rows, new)
        return h

    def residual_static(self, layer, where, h, slots):
        """Capture-safe `residual` (no host syncs, shapes fixed by the bank's layout): for
        every row b and every variant holding (layer, where),
            h[b] = h[b] + W_up[slots[b]] @ Z(h[b]; circuit[slots[b]]) + b[slots[b]]
        with each row's slot tensors gathered. A slot without the module has zero circuit
        and [W_up | b] tensors, so its Z and delta are exactly 0: rows without it get h.
        Emulated slots (shots, noise) are computed exactly here: callers keep them out.
        h (B, T, d), slots (B,) int64."""
        for (m_layer, m_where, variant), tensors in self.mods.items():
            if (m_layer, m_where) != (layer, where):
                continue
            rotation, L = variant
            *circuit, upb = (t.index_select(0, slots) for t in tensors)  # (B, ...) per row
            compiled = circuit[0][:, None] if rotation == "RX" else tuple(c[:, None] for c in circuit)
            z1 = expectations(h, compiled, rotation, self.n, L, with_one=True)  # (B, T, n + 1): [Z, 1]
            h = torch.baddbmm(h.float(), z1, upb.float()).to(h.dtype)  # h + Z W_up^T + b in fp32, rounded once
        return h

    def _emulated(self, layer, where, h, variant, rows, sl, listed, plans, slot):
        rotation, L = variant
        emu, gen, noisy = self.emulated[slot]
        *circuit, upb = self.mods[(layer, where, variant)]
        plan = self._plan(layer, where, variant, listed, plans, h) if emu.shots else None
        if plan is not None:
            counter = self.calls[slot]
            self.calls[slot] = counter + 1
            return plan(h, emu.shots, emu.seed, counter)
        x = h if rows is None else h[rows]  # (B', T, d), every row in this slot
        if emu.shots:
            compiled = circuit[0][slot] if rotation == "RX" else tuple(c[slot] for c in circuit)
            z = shot_z(x, compiled, rotation, self.n, L, emu.shots, gen)
        else:
            z = noisy_z(x.float(), noisy[(layer, where)])
        new = (x.float() + z @ upb[slot, : self.n].float() + upb[slot, self.n].float()).to(h.dtype)  # (B', T, d)
        return new if rows is None else h.index_copy_(0, rows, new)

    def _plan(self, layer, where, variant, listed, plans: dict, h):
        """The fused kernel bound to this module and routing entry (see cpu_kernels.qaa_rx_plan)
        for h, made on the entry's first use and kept in it, so it lives as long as the routing;
        None when it cannot serve: an RY circuit, a routing off the CPU, a non-contiguous h, a
        dtype it does not take."""
        if variant[0] != "RX" or listed is None or not h.is_contiguous():
            return None
        dtype = h.dtype
        if (layer, where, dtype) not in plans:
            phase, upb = self.mods[(layer, where, variant)]
            plans[(layer, where, dtype)] = cpu_kernels.qaa_rx_plan(*listed, phase, upb, self.n, variant[1], dtype)
        return plans[(layer, where, dtype)]

    def _gather(self, key, sl: tuple):
        # decode steps repeat the same batch composition: gather per-row tensors once, and
        # keep only the latest composition per module (memory stays one batch's worth)
        held = self.gathered.get(key)
        if held is None or held[0] != sl:
            *circuit, upb = self.mods[key]
            idx = torch.tensor(sl, device=upb.device)
            held = self.gathered[key] = (sl, (*(c[idx][:, None] for c in circuit), upb[idx]))
        return held[1]
