"""A QAA module as PennyLane objects, for researchers: a QNode on any installed device (finite
shots, a differentiation method, depolarizing noise on mixed-state devices), a torch module of
the whole residual h + W_up z + b, and the circuit decomposed into hardware gates (OpenQASM,
gate counts, depth).

PennyLane is the optional extra `qaa-serve[quantum]`; serving never imports this file.
"""

from __future__ import annotations

from collections import Counter

import torch

from adapters.base import AdapterError
from adapters.emulation import parse_noise

HARDWARE_GATES = {"RX", "RY", "RZ", "CNOT"}
"""The gate set the amplitude embedding and the layers are decomposed into."""


def pennylane():
    """The pennylane module, or a one-line error naming the extra that installs it."""
    try:
        import pennylane as qml
    except ImportError:
        raise AdapterError("PennyLane export needs the quantum extra: pip install 'qaa-serve[quantum]'") from None
    return qml


def _noise_p(noise) -> float:
    return float(noise) if isinstance(noise, (int, float)) else parse_noise(noise)


def layer_ops(qml, theta, n: int, rotation: str, noise: float = 0.0) -> list:
    """The L circuit layers (rotation on every wire, the CNOT ring, then optional depolarizing
    noise on every wire) as PennyLane operations; theta (L, n)."""
    gate = {"RX": qml.RX, "RY": qml.RY}[rotation]
    ops = []
    for l in range(theta.shape[0]):
        ops += [gate(theta[l, q], wires=q) for q in range(n)]
        if n > 1:
            ops += [qml.CNOT(wires=[q, (q + 1) % n]) for q in range(n)]
        if noise:
            ops += [qml.DepolarizingChannel(noise, wires=q) for q in range(n)]
    return ops


def qnode(n: int, n_layers: int, rotation: str = "RX", device: str = "default.qubit", shots: int | None = None,
          diff_method: str = "best", noise=None):
    """QAA's circuit as a QNode `f(inputs (d,) or (B, d), weights (L, n))` -> n values <Z_q>
    (torch interface). `device` is any installed PennyLane device name; `noise`
    ("depolarizing:p" or p) puts qml.DepolarizingChannel(p) on every wire after each layer and
    needs a mixed-state device such as default.mixed."""
    qml = pennylane()
    p = _noise_p(noise)
    if rotation not in ("RX", "RY"):
        raise AdapterError(f"rotation {rotation!r} is not one of RX, RY")
    try:
        dev = qml.device(device, wires=n)
    except Exception as e:  # PennyLane raises its own DeviceError for unknown names
        raise AdapterError(f"PennyLane device {device!r} cannot be made: {e}") from None

    def circuit(inputs, weights):
        qml.AmplitudeEmbedding(inputs, wires=range(n), pad_with=0.0, normalize=True)
        layer_ops(qml, weights, n, rotation, p)  # made inside the QNode, so queued there
        return [qml.expval(qml.PauliZ(q)) for q in range(n)]

    f = qml.QNode(circuit, dev, interface="torch", diff_method=diff_method)
    return qml.set_shots(f, shots) if shots else f


def module_tensors(ad, layer: int, where: str):
    """(angles (L, n), W_up (d, n), b (d,)) of one QAA module, detached."""
    from adapters.qaa import key, modules

    if ad.kind != "qaa":
        raise AdapterError(f"export takes QAA adapters, this one is {ad.kind}")
    if (layer, where) not in modules(ad.config, ad.shape):
        raise AdapterError(f"the adapter has no QAA module at layer {layer} {where!r} "
                           f"(it has {', '.join(f'{l}/{w}' for l, w in modules(ad.config, ad.shape))})")
    theta = ad.tensors[key(layer, where, "angles")].detach()
    up = ad.tensors[key(layer, where, "up.weight")].detach()
    b = ad.tensors[key(layer, where, "up.bias")].detach() if ad.config.bias else torch.zeros(up.shape[0])
    return theta, up, b


def export_qnode(ad, layer: int, where: str, device: str = "default.qubit", shots: int | None = None,
                 diff_method: str = "best", noise=None):
    """(qnode, angles, W_up, b) of one module: h + W_up @ qnode(h, angles) + b is its output."""
    theta, up, b = module_tensors(ad, layer, where)
    f = qnode(theta.shape[1], theta.shape[0], ad.config.rotation, device, shots, diff_method, noise)
    return f, theta, up, b


class PennyLaneModule(torch.nn.Module):
    """h -> h + W_up z(h) + b with z from PennyLane (a qml.qnn.TorchLayer holding the angles
    as its trainable `weights`): run it, draw it, differentiate it, swap the device."""

    def __init__(self, f, theta, up, b):
        super().__init__()
        qml = pennylane()
        self.circuit = qml.qnn.TorchLayer(f, {"weights": tuple(theta.shape)})
        with torch.no_grad():
            self.circuit.weights.copy_(theta.double())
        self.up = torch.nn.Linear(up.shape[1], up.shape[0], dtype=torch.float64)
        with torch.no_grad():
            self.up.weight.copy_(up.double())
            self.up.bias.copy_(b.double())

    def forward(self, h):  # (..., d)
        flat = h.reshape(-1, h.shape[-1]).double()
        z = self.circuit(flat).reshape(flat.shape[0], -1)  # (B, n)
        return h + self.up(z).reshape(h.shape).to(h.dtype)


def export_torchlayer(ad, layer: int, where: str, **options) -> PennyLaneModule:
    """One module's whole residual as a torch nn.Module computed through PennyLane
    (options as for export_qnode)."""
    return PennyLaneModule(*export_qnode(ad, layer, where, **options))


def hardware_tape(h, theta, rotation: str):
    """The circuit for input h (d,), with the amplitude embedding as Mottonen state
    preparation, decomposed into RX, RY, RZ and CNOT: a PennyLane QuantumScript."""
    qml = pennylane()
    L, n = theta.shape
    state = torch.nn.functional.pad(h.detach().double().flatten(), (0, 2**n - h.numel()))
    state = state / state.norm()
    ops = [qml.MottonenStatePreparation(state.numpy(), wires=range(n))]
    ops += layer_ops(qml, theta.detach().double().numpy(), n, rotation)
    tape = qml.tape.QuantumScript(ops, [qml.expval(qml.PauliZ(q)) for q in range(n)])
    [out], _ = qml.transforms.decompose(tape, gate_set=HARDWARE_GATES)
    return out


def to_qasm(h, theta, rotation: str) -> str:
    """OpenQASM 2.0 of the hardware-gate circuit for input h (measuring every wire)."""
    return pennylane().to_openqasm(hardware_tape(h, theta, rotation))


def gate_specs(h, theta, rotation: str) -> dict:
    """Gate counts (embedding, layers, total) and depth of the hardware-gate circuit."""
    tape = hardware_tape(h, theta, rotation)
    n_layer_gates = theta.shape[0] * theta.shape[1] * (2 if theta.shape[1] > 1 else 1)
    ops = tape.operations
    counts = Counter(op.name for op in ops)
    return {"qubits": theta.shape[1], "embedding_gates": len(ops) - n_layer_gates, "layer_gates": n_layer_gates,
            "total_gates": len(ops), "cnots": counts.get("CNOT", 0), "gate_counts": dict(sorted(counts.items())),
            "depth": tape.graph.get_depth()}
