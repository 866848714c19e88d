"""`qaa-eval` (score one adapter) and `qaa-compare` (train and score every method, write the report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _errors():
    from adapters.base import AdapterError
    from engine.errors import QaaError

    return (QaaError, AdapterError)


def eval_main(argv=None) -> int:
    from engine.cli_parser import Parser, number

    ap = Parser("qaa-eval", description="Score an adapter's greedy generations on held-out data.")
    ap.add_argument("--adapter", default=None, metavar="DIR",
                    help="adapter dir (or a full fine-tune's model dir); omit for the base model")
    ap.add_argument("--data", required=True, help="Alpaca JSON/JSONL; its held-out split is scored")
    ap.add_argument("--n", type=number(int, 1), default=100, help="held-out examples to generate for and score")
    ap.add_argument("--model", default=None, metavar="DIR", help="local HF Llama-family checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-new-tokens", type=number(int, 1), default=128, metavar="N", help="tokens generated per example at most")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--out", default=None, metavar="FILE", help="write the JSON here (default: ADAPTER/eval.json, or stdout)")
    ap.add_argument("--shots", default=None, metavar="N[,N...]",
                    help="QAA: also score with <Z> estimated from N shots (beside the exact circuit and the base model)")
    ap.add_argument("--noise", default=None, metavar="depolarizing:p[,...]",
                    help="QAA: also score with depolarizing noise p on every wire after each circuit layer")
    ap.add_argument("--seed", type=int, default=0, help="seeds the shot sampler")
    ap.add_argument("--plot", default=None, metavar="FILE", help="with --shots/--noise: the plot's path (default: next to the JSON)")
    args = ap.parse_args(argv)
    if args.shots or args.noise:
        return _quantum_eval(args)
    try:
        from training.evaluate import METRICS, evaluate, table

        res = evaluate(args.adapter, args.data, n=args.n, model=args.model, max_new_tokens=args.max_new_tokens,
                       device=args.device)
    except _errors() as e:
        print(f"qaa-eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(args.adapter) / "eval.json" if args.adapter else None)
    if out:
        out.write_text(json.dumps(res, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    print(table({args.adapter or "base": {k: res[k] for k in METRICS}}))
    return 0


def _quantum_eval(args) -> int:
    try:
        from engine.errors import InputError
        from training.evaluate import table
        from training.quantum_eval import parse_noises, parse_shots, plot_sweep, quantum_sweep

        if not args.adapter:
            raise InputError("--shots / --noise need --adapter (a QAA adapter)")
        res = quantum_sweep(args.adapter, args.data, parse_shots(args.shots), parse_noises(args.noise), n=args.n,
                            model=args.model, max_new_tokens=args.max_new_tokens, device=args.device, seed=args.seed,
                            log=lambda s: print(s, file=sys.stderr, flush=True))
    except _errors() as e:
        print(f"qaa-eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.adapter) / "eval_quantum.json"
    out.write_text(json.dumps(res, indent=2))
    plot = plot_sweep(res, args.plot or out.with_suffix(".png"))
    print(f"wrote {out} and {plot}", file=sys.stderr)
    print(table(res))
    return 0


def compare_main(argv=None) -> int:
    from engine.cli_parser import Parser, number, one_of
    from training.loop import METHODS

    ap = Parser("qaa-compare", description="Train and evaluate every method; write report.md.")
    ap.add_argument("--data", required=True, help="Alpaca JSON/JSONL: the training data and its held-out split")
    ap.add_argument("--steps", type=number(int), default=100, metavar="N", help="training steps per method")
    ap.add_argument("--methods", type=one_of("method", METHODS, many=True), default=",".join(METHODS), metavar="LIST",
                    help="comma-separated, of " + ", ".join(METHODS))
    ap.add_argument("--out", required=True, metavar="DIR", help="output directory (report.md, results.json, one run per method)")
    ap.add_argument("--model", default=None, metavar="DIR", help="local HF Llama-family checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--batch-size", type=number(int), default=8, metavar="N", help="examples per training step")
    ap.add_argument("--max-len", type=number(int), default=256, metavar="N", help="tokens per training example")
    ap.add_argument("--seed", type=int, default=0, help="the seed every method trains with")
    ap.add_argument("--n", type=number(int, 1), default=100, help="held-out generations to score")
    ap.add_argument("--max-new-tokens", type=number(int, 1), default=128, metavar="N", help="tokens generated per example at most")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = ap.parse_args(argv)
    try:
        from training.compare import compare
        from training.loop import TrainConfig

        methods = args.methods
        base = TrainConfig(method=methods[0], data=args.data, out=args.out, model=args.model, steps=args.steps,
                           batch_size=args.batch_size, max_len=args.max_len, seed=args.seed, device=args.device, quiet=True)
        report = compare(base, methods, args.out, n_eval=args.n, max_new_tokens=args.max_new_tokens,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    except _errors() as e:
        print(f"qaa-compare: error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0
