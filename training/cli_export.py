"""`qaa-export`: a trained QAA adapter's circuits for quantum tools and hardware.

--format qasm       OpenQASM 2.0 with the amplitude embedding decomposed into RX/RY/RZ/CNOT
--format pennylane  the PennyLane circuit, drawn
--format specs      gate counts and depth per module (hardware gates)

The embedding prepares one token's hidden vector, so the QASM is per input: --input names a
JSON list of d numbers; by default a seeded Gaussian vector stands in (dense, like a hidden
state, so its gate counts are what any token costs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FORMATS = ("qasm", "pennylane", "specs")


def parse_args(argv=None):
    from engine.cli_parser import Parser

    ap = Parser("qaa-export", description=__doc__)
    ap.add_argument("--adapter", required=True, metavar="DIR", help="QAA adapter directory")
    ap.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    ap.add_argument("--layer", type=int, default=None, help="transformer layer of the module (default: every module)")
    ap.add_argument("--where", default=None, choices=("attn", "mlp"), help="after attention or MLP (default: both)")
    ap.add_argument("--model", default=None, metavar="DIR", help="base model directory (default: the default model)")
    ap.add_argument("--input", default=None, metavar="FILE", help="JSON list of d numbers: the hidden vector to embed")
    ap.add_argument("--seed", type=int, default=0, help="seeds the stand-in input when --input is not given")
    ap.add_argument("--out", default=None, metavar="PATH", help="qasm: a file (one module) or a directory; default stdout")
    return ap.parse_args(argv)


def _input(args, d: int):
    import torch

    from engine.errors import InputError

    if args.input is None:
        return torch.randn(d, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    try:
        v = torch.tensor(json.loads(Path(args.input).read_text()), dtype=torch.float64)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"--input {args.input}: not a JSON list of numbers ({e})") from None
    if v.shape != (d,) or not torch.isfinite(v).all() or v.norm() == 0:
        raise InputError(f"--input {args.input}: expected {d} finite numbers, not all zero, got shape {tuple(v.shape)}")
    return v


def specs_table(rows: list[tuple[str, dict]]) -> str:
    head = ("| module | qubits | embedding gates | layer gates | total gates | CNOTs | depth |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n")
    return head + "".join(f"| {m} | {s['qubits']} | {s['embedding_gates']:,} | {s['layer_gates']} | {s['total_gates']:,} "
                          f"| {s['cnots']:,} | {s['depth']:,} |\n" for m, s in rows)


def run(args) -> str:
    from adapters.base import AdapterError
    from adapters.export import export_qnode, gate_specs, module_tensors, pennylane, to_qasm
    from adapters.files import load_dir
    from adapters.qaa import modules
    from engine.config import ModelConfig
    from engine.weights import resolve_model_dir

    pennylane()  # the one-line error naming the extra comes first
    shape = ModelConfig.from_dir(resolve_model_dir(args.model)).shape()
    ad = load_dir(args.adapter, shape)
    if ad.kind != "qaa":
        raise AdapterError(f"{args.adapter} is a {ad.kind} adapter; qaa-export takes QAA adapters")
    chosen = [(l, w) for l, w in modules(ad.config, shape)
              if (args.layer is None or l == args.layer) and (args.where is None or w == args.where)]
    if not chosen:
        raise AdapterError(f"the adapter has no QAA module at layer {args.layer} {args.where or ''}".rstrip())
    h = _input(args, shape.dim)
    if args.format == "specs":
        # every module of an adapter has the same structure (n, L, rotation), and gate counts
        # and depth depend on the structure only, so one decomposition serves all rows
        theta, _, _ = module_tensors(ad, *chosen[0])
        s = gate_specs(h, theta, ad.config.rotation)
        return specs_table([(f"layer {l} {w}", s) for l, w in chosen]) + (
            f"\ngate counts {s['gate_counts']}; the embedding prepares one {shape.dim}-d hidden vector "
            f"(Mottonen state preparation), the layers are {theta.shape[0]} x ({ad.config.rotation} on every wire + CNOT ring)\n")
    if args.format == "pennylane":
        qml = pennylane()
        parts = []
        for l, w in chosen:
            f, theta, _, _ = export_qnode(ad, l, w)
            parts.append(f"# layer {l} {w}\n{qml.draw(f, decimals=3, max_length=200)(h, theta.double())}\n")
        return "\n".join(parts)
    texts = {(l, w): to_qasm(h, module_tensors(ad, l, w)[0], ad.config.rotation) for l, w in chosen}
    if args.out is None:
        if len(texts) > 1:
            raise AdapterError("several modules: give --out DIR (or pick one with --layer and --where)")
        return next(iter(texts.values()))
    out = Path(args.out)
    if len(texts) == 1 and out.suffix == ".qasm":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(next(iter(texts.values())))
        return f"wrote {out}\n"
    out.mkdir(parents=True, exist_ok=True)
    for (l, w), t in texts.items():
        (out / f"layer{l}_{w}.qasm").write_text(t)
    return f"wrote {len(texts)} files to {out}\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from adapters.base import AdapterError
    from engine.errors import QaaError

    try:
        sys.stdout.write(run(args))
    except (QaaError, AdapterError) as e:
        print(f"qaa-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
