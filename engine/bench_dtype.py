"""bf16 vs fp32 on one model: greedy token agreement and logit error (a script, not a test).

    python -m engine.bench_dtype [--model PATH] [--data FILE] [--prompts 100] [--new-tokens 64]
                                 [--dtype bfloat16]

The first --prompts instructions of an Alpaca-format JSON file (default: the shared demo set,
instruction + input, chat-formatted) go through two engines on the same weights, fp32 and
--dtype, greedy, exactly --new-tokens tokens each (EOS ignored). Printed:
  free-running: share of prompts whose --new-tokens tokens are all identical, and the mean
      length of the common prefix (once two greedy runs part, the rest is not comparable);
  teacher-forced: top-1 agreement at every position when both models read the fp32 run's
      tokens (each step's choice alone, on the same context);
  first step: max and mean |logit - fp32 logit| over the vocabulary at the first generated
      position, and the largest as a share of the fp32 logits' range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from engine.engine import Engine
from engine.sampling import SamplingParams

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_demo.json"


def prompts_of(path: Path, n: int) -> list[str]:
    rows = json.loads(path.read_text())[:n]
    return [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in rows]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def compare(ref: Engine, other: Engine, prompts: list[str], n_new: int) -> dict:
    sp = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    ids = [ref.encode_prompt(p, chat=True) for p in prompts]
    t0 = time.perf_counter()
    want = [c.token_ids for c in ref.generate(ids, sp)]
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = [c.token_ids for c in other.generate(ids, sp)]
    t_other = time.perf_counter() - t0
    prefix = [common_prefix(w, g) for w, g in zip(want, got)]
    agree = total = 0
    first_max, first_mean, first_rel = [], [], []
    for p, w in zip(ids, want):
        tokens = torch.tensor([p + w[:-1]])
        a, b = ref.model(tokens)[0, len(p) - 1 :], other.model(tokens)[0, len(p) - 1 :]  # (n_new, V) fp32 each
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        err = (a[0] - b[0]).abs()
        first_max.append(err.max().item())
        first_mean.append(err.mean().item())
        first_rel.append(err.max().item() / (a[0].max() - a[0].min()).item())
    return {"prompts": len(ids), "identical": sum(x == n_new for x in prefix) / len(ids),
            "mean_prefix": statistics.mean(prefix) / n_new, "teacher_forced": agree / total,
            "first_max": max(first_max), "first_mean": statistics.mean(first_mean),
            "first_max_rel_range": max(first_rel), "tok_s_ref": len(ids) * n_new / t_ref,
            "tok_s_other": len(ids) * n_new / t_other}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca-format JSON (instruction, input, output)")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", help="compared with float32: bfloat16 | float16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    prompts = prompts_of(Path(args.data), args.prompts)
    kw = dict(device=args.device, max_batch=args.batch, max_seq_len=1024, max_adapters=1)
    ref = Engine(args.model, dtype="float32", **kw)
    other = Engine(args.model, dtype=args.dtype, **kw)
    r = compare(ref, other, prompts, args.new_tokens)
    print(f"model={ref.name} device={ref.device} {other.dtype} vs {ref.dtype} prompts={r['prompts']} "
          f"new_tokens={args.new_tokens} threads={torch.get_num_threads()}")
    print(f"free-running: identical_outputs={r['identical']:.1%} mean_common_prefix={r['mean_prefix']:.1%}")
    print(f"teacher-forced top-1 agreement={r['teacher_forced']:.2%}")
    print(f"first step logit error: max={r['first_max']:.4f} mean={r['first_mean']:.4f} "
          f"max/range={r['first_max_rel_range']:.2%}")
    print(f"(greedy tok/s in this run, batch {args.batch}: fp32={r['tok_s_ref']:.1f} other={r['tok_s_other']:.1f})")


if __name__ == "__main__":
    main()
