"""Greedy decode throughput: this engine vs transformers' `generate`, same weights and prompts.

    python -m engine.bench [--model PATH] [--batches 1,8] [--new-tokens 64] [--device auto]

Both sides generate exactly --new-tokens tokens per row (EOS ignored) from the same prompts.
Two readings per side, from the same runs:
  e2e    = generated tokens / wall time of the whole call (prefill included);
  decode = (N - 1) tokens per row / (t(N) - t(1)): the decode phase alone, prefill and the
           first token subtracted (a run of 1 new token is timed beside each run of N).
Runs alternate, and the best of --repeats is kept for each, so a noisy neighbour hurts both.
With --compile, a second engine decodes through the captured step (engine.graph; its
compile and warm-up happen before timing) and is timed in the same rotation: its ratio is
compiled / eager. --compile-backend and --static (one graph per bucket instead of automatic
dynamic shapes) pass to engine.graph.GraphConfig. Several --dtype values give one eager
engine each (alternating too; `engine` is the first, the others `engine_<dtype>` with their
ratio to it); transformers and the compiled side run in the first one's dtype.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.engine import Engine
from engine.sampling import SamplingParams

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France and why is it famous?",
    "Write a short poem about the sea.",
    "Explain how a transformer language model works in simple terms.",
    "List five fruits.",
    "Translate 'good morning' into Spanish, French and German.",
    "Why is the sky blue?",
    "Describe the water cycle step by step for a ten year old student.",
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(engine: Engine, prompts, n_new) -> float:
    sp = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    sync(engine.device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp)
    sync(engine.device)
    assert all(len(o.token_ids) == n_new for o in outs)
    return time.perf_counter() - t0


def time_hf(ref, tok, prompts, n_new, device) -> float:
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = ref.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    sync(device)
    assert out.shape[1] - enc.input_ids.shape[1] == n_new
    return time.perf_counter() - t0


def readings(timer, B, n_new, repeats_out: list) -> None:
    """Append (e2e tok/s, decode tok/s) of one run of n_new and one of 1 new token."""
    t1 = timer(1)
    tn = timer(n_new)
    repeats_out.append((B * n_new / tn, B * (n_new - 1) / max(tn - t1, 1e-9)))


def step_ms(graph, B: int, lengths: list[int], repeats: int, n: int = 20) -> list[tuple[int, float]]:
    """Best-of-repeats milliseconds of one captured step at batch bucket B and each length
    bucket in `lengths` (each must be one of graph.lengths), the lengths alternating."""
    B = next(b for b in graph.batches if b >= B)
    graph._fill([], B)
    best = {S: float("inf") for S in lengths}
    with torch.inference_mode():
        for _ in range(repeats):
            for S in lengths:
                graph._run(B, S)
                sync(graph.device)
                t0 = time.perf_counter()
                for _ in range(n):
                    graph._run(B, S)
                sync(graph.device)
                best[S] = min(best[S], (time.perf_counter() - t0) / n * 1e3)
    return list(best.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="the engine's dtype; several, comma-separated, run alternately "
                                                  "and are compared with the first (e.g. float32,bfloat16)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true", help="engine only (e.g. large batches on a GPU)")
    ap.add_argument("--compile", action="store_true", help="also time the captured decode step (engine.graph)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend; 'none': CUDA graphs only")
    ap.add_argument("--static", action="store_true", help="compile one graph per bucket (GraphConfig.dynamic=False)")
    ap.add_argument("--step-lengths", default=None, help="with --compile: time one step at these cache lengths")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtype.split(",") if args.dtype else [None]
    make = lambda compile=False, dtype=dtypes[0]: Engine(  # noqa: E731
        args.model, device=args.device, dtype=dtype, max_batch=max(batches), max_seq_len=args.max_seq_len,
        compile=compile)
    engine = make()
    sides = {"engine": engine, **{f"engine_{d}": make(dtype=d) for d in dtypes[1:]}}
    print(f"model={engine.name} device={engine.device} dtype={','.join(str(e.dtype) for e in sides.values())} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} new_tokens={args.new_tokens}")
    if args.compile:
        from engine.graph import GraphConfig

        t0 = time.perf_counter()
        backend = None if args.compile_backend == "none" else args.compile_backend
        lengths = sorted(int(n) for n in args.step_lengths.split(",")) if args.step_lengths else []
        cfg = GraphConfig(backend=backend, dynamic=False if args.static else None, min_length=min(lengths, default=128))
        sides["compiled"] = make(cfg)
        from torch._dynamo.utils import counters

        print(f"compiled: {sides['compiled'].graph.describe()}; {counters['stats']['unique_graphs']} graphs compiled and "
              f"every bucket run in {time.perf_counter() - t0:.1f} s")
    ref = tok = None
    if not args.no_hf:
        ref = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).to(engine.device).eval()
        tok = AutoTokenizer.from_pretrained(engine.model_dir, padding_side="left")
    for B in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
        timers = {name: (lambda n, e=e: time_engine(e, prompts, n)) for name, e in sides.items()}
        if ref is not None:
            timers["transformers"] = lambda n: time_hf(ref, tok, prompts, n, engine.device)
        got = {name: [] for name in timers}
        for t in timers.values():
            t(8)  # warm-up
        for _ in range(args.repeats):
            for name, t in timers.items():
                readings(t, B, args.new_tokens, got[name])
        for i, what in enumerate(("e2e", "decode")):
            best = {name: max(r[i] for r in rs) for name, rs in got.items()}
            line = f"batch={B:<3d} {what:6s} " + "  ".join(f"{n}_tok_s={v:8.1f}" for n, v in best.items())
            for name in best:
                if name.startswith("engine_") or name == "compiled":
                    line += f"  {name}/engine={best[name] / best['engine']:.2f}"
            if "transformers" in best:
                line += f"  engine/transformers={best['engine'] / best['transformers']:.2f}"
            print(line, flush=True)
        if "compiled" in sides:
            print(f"batch={B:<3d} compiled fallbacks={sides['compiled'].graph.fallbacks}", flush=True)
            if lengths:
                print(f"batch={B:<3d} step_ms " + "  ".join(
                    f"length={S}:{ms:.2f}" for S, ms in step_ms(sides["compiled"].graph, B, lengths, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
