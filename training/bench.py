"""One training step of QAA vs LoRA on the same model and batch (a script, not a test).

    python -m training.bench [--model PATH] [--batch-size 8] [--steps 6]

Each method runs in a fresh child process (so peak memory is its own): the base model is
loaded, one warm-up step runs, then --steps timed steps. Printed: median step time, peak
resident memory above the loaded model, and the QAA / LoRA ratios (goal: time <= 1.2x,
memory <= 1.5x). Defaults mirror the survey: LoRA r=4 on q,v; QAA RX, 2 layers, after
attention and MLP of every layer.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _run(method, model, batch_size, steps, data) -> dict:
    from training.loop import TrainConfig, Trainer

    t = Trainer(TrainConfig(method=method, data=data, out=tempfile.mkdtemp(), model=model, steps=steps + 1,
                            batch_size=batch_size, max_len=128, quiet=True, device="cpu"))
    base = _rss_mb()  # model and adapter loaded, nothing run yet
    t.train_step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        t.train_step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "step_s": statistics.median(times), "peak_mb": peak, "after_load_mb": base,
            "trainable": t.n_trainable()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_run(args.worker, args.model, args.batch_size, args.steps, args.data)))
        return
    # the same synthetic instruction data for both methods
    recs = [{"instruction": f"Write a sentence about the number {i}.", "input": "",
             "output": f"The number {i} is {'even' if i % 2 == 0 else 'odd'} and comes after {i - 1}."} for i in range(64)]
    data = tempfile.mktemp(suffix=".json")
    with open(data, "w") as f:
        json.dump(recs, f)
    res = {}
    for m in ("lora", "qaa"):
        cmd = [sys.executable, "-m", "training.bench", "--worker", m, "--data", data, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps)] + (["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res[m] = json.loads(out)
        r = res[m]
        print(f"{m:5s} trainable={r['trainable']:>8,d} step_s={r['step_s']:.3f} peak_rss_mb={r['peak_mb']:.0f} "
              f"(model loaded: {r['after_load_mb']:.0f})", flush=True)
    q, lo = res["qaa"], res["lora"]
    extra = lambda r: r["peak_mb"] - r["after_load_mb"]  # noqa: E731
    print(f"qaa_vs_lora step_time_ratio={q['step_s'] / lo['step_s']:.2f} "
          f"peak_rss_ratio={q['peak_mb'] / lo['peak_mb']:.2f} activation_mem_ratio={extra(q) / max(extra(lo), 1):.2f}")


if __name__ == "__main__":
    main()
