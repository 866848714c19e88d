"""Greedy decode throughput: this engine vs transformers' `generate`, same weights and prompts.

    python -m engine.bench [--model PATH] [--batches 1,8] [--new-tokens 64] [--device auto]
                           [--dtype float32,bfloat16]

Both sides generate exactly --new-tokens tokens per row (EOS ignored) from the same prompts.
Two readings per side, from the same runs:
  e2e    = generated tokens / wall time of the whole call (prefill included);
  decode = (N - 1) tokens per row / (t(N) - t(1)): the decode phase alone, prefill and the
           first token subtracted (a run of 1 new token is timed beside each run of N).
Runs alternate, and the best of --repeats is kept for each, so a noisy neighbour hurts both.
Several --dtype values give one engine each (alternating too), compared with the first; the
transformers side runs in the first one's dtype.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="the engine's dtype; several, comma-separated, run alternately "
                                                  "and are compared with the first (e.g. float32,bfloat16)")
    ap.add_argument("--no-hf", action="store_true", help="engine only (e.g. large batches on a GPU)")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    batches = [int(b) for b in args.batches.split(",")]
    engines = [Engine(args.model, device=args.device, dtype=d, max_batch=max(batches), max_seq_len=256)
               for d in (args.dtype.split(",") if args.dtype else [None])]
    engine = engines[0]
    print(f"model={engine.name} device={engine.device} dtype={','.join(str(e.dtype) for e in engines)} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} new_tokens={args.new_tokens}")
    ref = tok = None
    if not args.no_hf:
        ref = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=engine.dtype).to(engine.device).eval()
        tok = AutoTokenizer.from_pretrained(engine.model_dir, padding_side="left")
    for B in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
        sides = {str(e.dtype).removeprefix("torch."): (lambda n, e=e: time_engine(e, prompts, n)) for e in engines}
        hf_t = lambda n: time_hf(ref, tok, prompts, n, engine.device)  # noqa: E731
        for t in sides.values():
            t(8)  # warm-up
        if ref is not None:
            hf_t(8)
        ours, theirs = {k: [] for k in sides}, []
        for _ in range(args.repeats):  # alternate, so drift hits every side alike
            for k, t in sides.items():
                readings(t, B, args.new_tokens, ours[k])
            if ref is not None:
                readings(hf_t, B, args.new_tokens, theirs)
        first = next(iter(sides))
        for i, what in enumerate(("e2e", "decode")):
            for k in sides:
                o = max(r[i] for r in ours[k])
                line = f"batch={B:<3d} {what:6s} dtype={k:<8s} engine_tok_s={o:8.1f}"
                if k != first:
                    line += f"  vs_{first}={o / max(r[i] for r in ours[first]):.2f}"
                if theirs and k == first:
                    h = max(r[i] for r in theirs)
                    line += f"  transformers_tok_s={h:8.1f}  ratio={o / h:.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
