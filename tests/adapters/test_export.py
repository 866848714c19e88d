"""Every export form of a trained QAA module against our compiled circuit: QNodes on
default.qubit / lightning.qubit / default.mixed, the TorchLayer module, OpenQASM read back
through PennyLane, and the qaa-export CLI."""

import re
import sys

import numpy as np
import pytest
import torch

from adapters.base import AdapterError
from adapters.export import export_qnode, export_torchlayer, gate_specs, hardware_tape, to_qasm
from adapters.files import save_dir
from adapters.qaa import QAAConfig, QAAType, key
from engine.config import ModelConfig
from tests.adapters.cases import Case, make

qml = pytest.importorskip("pennylane")


@pytest.fixture(scope="module")
def shape(tiny_dir):
    return ModelConfig.from_dir(tiny_dir).shape()


def trained(shape, rotation):
    return make(Case("q", "qaa", lambda: QAAConfig(circuit_layers=2, rotation=rotation)), shape, seed=11)


def _ours(ad, layer, where, h):
    return QAAType().residual(ad, layer, where, h.float()).double()


FORMS = [  # (device, diff_method)
    ("default.qubit", "backprop"),
    ("default.qubit", "parameter-shift"),
    ("lightning.qubit", "adjoint"),
    ("default.mixed", "backprop"),
]


@pytest.mark.parametrize("rotation", ["RX", "RY"])
@pytest.mark.parametrize("device,diff_method", FORMS)
def test_qnode_forms_match_the_compiled_module(shape, rotation, device, diff_method):
    ad = trained(shape, rotation)
    h = torch.randn(3, shape.dim, dtype=torch.float64)
    f, theta, up, b = export_qnode(ad, 1, "mlp", device=device, diff_method=diff_method)
    z = torch.stack([torch.stack([torch.as_tensor(v).double() for v in f(h[i], theta.double())]) for i in range(3)])
    out = h + z @ up.double().t() + b.double()
    assert (out - _ours(ad, 1, "mlp", h)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("rotation", ["RX", "RY"])
def test_torchlayer_module_matches_and_differentiates(shape, rotation):
    """The nn.Module of the whole residual: same output (a (B, T, d) batch), and the angle
    gradients PennyLane computes are our autograd's."""
    ad = trained(shape, rotation)
    m = export_torchlayer(ad, 0, "attn")
    assert isinstance(m, torch.nn.Module)
    h = torch.randn(2, 3, shape.dim, dtype=torch.float64)
    out = m(h)
    assert out.shape == h.shape
    assert (out - _ours(ad, 0, "attn", h)).abs().max().item() <= 1e-6

    w = torch.randn(shape.dim, dtype=torch.float64)
    (m(h) @ w).sum().backward()
    theta = ad.tensors[key(0, "attn", "angles")].detach().clone().requires_grad_()
    ours = dict(ad.tensors)
    ours[key(0, "attn", "angles")] = theta
    (QAAType().residual(type(ad)(ad.kind, ad.config, ours, ad.shape), 0, "attn", h.float()).double() @ w).sum().backward()
    assert (m.circuit.weights.grad - theta.grad.double()).abs().max().item() <= 1e-4


def _z_of_state(state, n):
    probs = np.abs(np.asarray(state)) ** 2
    signs = 1 - 2 * ((np.arange(2**n)[:, None] >> (n - 1 - np.arange(n))) & 1)
    return torch.as_tensor(probs @ signs)


@pytest.mark.parametrize("rotation", ["RX", "RY"])
def test_openqasm_reads_back_to_the_same_state(shape, rotation):
    """The QASM (hardware gates only) parsed by qml.from_qasm (pennylane-qiskit) prepares the
    state of the embedded circuit (up to a global phase) and gives our <Z>."""
    pytest.importorskip("pennylane_qiskit")
    ad = trained(shape, rotation)
    theta, up, b = (ad.tensors[key(1, "attn", k)].double() for k in ("angles", "up.weight", "up.bias"))
    n = theta.shape[1]
    h = torch.randn(shape.dim, dtype=torch.float64)
    text = to_qasm(h, theta, rotation)
    assert set(re.findall(r"^([a-z]+)[ (]", text, re.M)) <= {"ry", "rz", "rx", "cx", "measure", "include", "qreg", "creg"}
    dev = qml.device("default.qubit", wires=n)
    back = qml.QNode(lambda: (qml.from_qasm(text, measurements=[])(), qml.state())[1], dev)()
    f, *_ = export_qnode(ad, 1, "attn")

    @qml.qnode(dev)
    def ref():
        qml.AmplitudeEmbedding(h.numpy(), wires=range(n), pad_with=0.0, normalize=True)
        from adapters.export import layer_ops

        layer_ops(qml, theta.numpy(), n, rotation)
        return qml.state()

    assert abs(abs(np.vdot(back, ref())) - 1) <= 1e-6
    z = _z_of_state(back, n)
    assert (h + z @ up.t() + b - _ours(ad, 1, "attn", h[None])[0]).abs().max().item() <= 1e-6


def test_gate_specs_count_the_decomposed_circuit(shape):
    ad = trained(shape, "RX")
    theta = ad.tensors[key(0, "mlp", "angles")]
    h = torch.randn(shape.dim, dtype=torch.float64)
    s = gate_specs(h, theta, "RX")
    L, n = theta.shape
    text = to_qasm(h, theta, "RX")
    assert s["cnots"] == len(re.findall(r"^cx ", text, re.M))
    assert s["total_gates"] == len(re.findall(r"^(rx|ry|rz|cx)[ (]", text, re.M)) == sum(s["gate_counts"].values())
    assert s["layer_gates"] == 2 * L * n and s["gate_counts"]["RX"] == L * n
    level = [0] * n  # depth by layering the QASM's gates greedily over their wires
    for line in text.splitlines():
        if re.match(r"(rx|ry|rz|cx)[ (]", line):
            wires = [int(w) for w in re.findall(r"q\[(\d+)\]", line)]
            top = max(level[w] for w in wires) + 1
            for w in wires:
                level[w] = top
    assert s["depth"] == max(level)
    assert len(hardware_tape(h, theta, "RX").operations) == s["total_gates"]


def test_export_without_pennylane_names_the_extra(shape, monkeypatch):
    monkeypatch.setitem(sys.modules, "pennylane", None)
    with pytest.raises(AdapterError, match=r"qaa-serve\[quantum\]"):
        export_qnode(trained(shape, "RX"), 0, "attn")


def test_export_of_a_missing_module_is_refused(shape):
    ad = make(Case("q", "qaa", lambda: QAAConfig(placement=["mlp"], layers_to_transform=[1])), shape)
    with pytest.raises(AdapterError, match="no QAA module at layer 0 'attn'"):
        export_qnode(ad, 0, "attn")


def test_qaa_export_cli(shape, tiny_dir, tmp_path, capsys):
    from training.cli_export import main

    ad = trained(shape, "RY")
    d = save_dir(ad, tmp_path / "ad")
    assert main(["--adapter", str(d), "--model", str(tiny_dir), "--format", "specs"]) == 0
    table = capsys.readouterr().out
    assert len(re.findall(r"^\| layer \d \w+ \| 6 \|", table, re.M)) == 4 and "CNOTs" in table
    assert main(["--adapter", str(d), "--model", str(tiny_dir), "--format", "qasm", "--out", str(tmp_path / "q")]) == 0
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert files == ["layer0_attn.qasm", "layer0_mlp.qasm", "layer1_attn.qasm", "layer1_mlp.qasm"]
    assert (tmp_path / "q" / "layer1_mlp.qasm").read_text().startswith("OPENQASM 2.0;")
    capsys.readouterr()
    assert main(["--adapter", str(d), "--model", str(tiny_dir), "--format", "pennylane", "--layer", "1",
                 "--where", "mlp"]) == 0
    assert "RY" in capsys.readouterr().out
    assert main(["--adapter", str(d), "--model", str(tiny_dir), "--format", "qasm", "--layer", "7"]) == 2
    assert "no QAA module at layer 7" in capsys.readouterr().err
    bad = tmp_path / "in.json"
    bad.write_text("[1, 2]")
    assert main(["--adapter", str(d), "--model", str(tiny_dir), "--format", "qasm", "--layer", "0", "--where", "mlp",
                 "--input", str(bad)]) == 2
    assert f"expected {shape.dim} finite numbers" in capsys.readouterr().err
