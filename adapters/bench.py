"""Adapter benchmarks (scripts, not tests).

    python -m adapters.bench [--tokens 512] [--dim 576] [--layers 2]

The compiled QAA forward vs PennyLane's qml.qnn.TorchLayer on the same circuit and inputs
(the module's <Z> readout), same process: prints the outputs' max abs diff and, last,
`speedup_vs_pennylane=<x>`. (The mixed-adapter decode step through the engine is
`python -m engine.bench_adapters`: adapters/ does not import the engine.)
"""

from __future__ import annotations

import argparse
import time

import torch


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_circuit(tokens: int, dim: int, layers: int, rotation: str, repeats: int):
    import pennylane as qml

    from adapters.base import n_qubits
    from adapters.circuit import circuit_z
    from adapters.export import qnode as to_qnode

    n = n_qubits(dim)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, dim, generator=g)
    layer = qml.qnn.TorchLayer(to_qnode(n, layers, rotation), {"weights": (layers, n)})
    theta = layer.weights.detach().clone()
    with torch.no_grad():
        t_pl, z_pl = _best(lambda: layer(h.double()), max(1, repeats // 3))
        circuit_z(h, theta, rotation)  # warm-up
        t_ours, z_ours = _best(lambda: circuit_z(h, theta, rotation), repeats)
    diff = (z_ours.double() - torch.as_tensor(z_pl).double()).abs().max().item()
    print(f"circuit: tokens={tokens} d={dim} qubits={n} L={layers} rotation={rotation}")
    print(f"pennylane_torchlayer_s={t_pl:.4f} compiled_s={t_ours:.5f} max_abs_diff={diff:.2e}")
    return t_pl / t_ours


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rotation", default="RX")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    speedup = bench_circuit(args.tokens, args.dim, args.layers, args.rotation, args.repeats)
    print(f"speedup_vs_pennylane={speedup:.1f}")


if __name__ == "__main__":
    main()
