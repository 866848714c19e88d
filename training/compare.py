"""The method comparison: train and evaluate every method on the same data and seed, and write
this model's versions of the survey's Table 1 (trainable parameters), Table 3 (BLEU,
BERTScore F1, ROUGE) and Fig. 3 (training loss curves), with the survey's figures beside them.

Survey: "How Can Quantum Deep Learning Improve Large Language Models?" (GPT-Neo-125M on Alpaca,
100 generations).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from training.evaluate import METRICS, evaluate, table
from training.loop import TrainConfig, Trainer
from training.plot import plot_losses

# (trainable %, BLEU, BERTScore F1, ROUGE-1, ROUGE-2, ROUGE-L)
SURVEY = {
    "full": (100.0, 12.19, 84.69, 20.39, 12.64, 20.25),
    "lora": (0.12, 3.45, 78.33, 13.60, 6.66, 10.57),
    "sora": (0.10, 0.67, 77.67, 7.43, 1.43, 5.41),
    "prefix": (0.44, 0.38, 58.29, 7.18, 1.82, 6.77),
    "qaa": (0.09, 2.96, 78.74, 15.01, 3.89, 13.55),
}
NAMES = {"full": "Full", "lora": "LoRA", "sora": "SoRA", "prefix": "Prefix", "qaa": "QAA"}


def compare(base: TrainConfig, methods: list[str], out: str | Path, n_eval: int = 100, max_new_tokens: int = 128,
            log=print) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, curves, params, timing = {}, {}, {}, {}
    t_all = time.perf_counter()
    for m in methods:
        t0 = time.perf_counter()
        trainer = Trainer(replace(base, method=m, out=str(out / m)))
        params[m] = (trainer.n_trainable(), trainer.shape.n_params)
        log(f"{m}: {params[m][0]:,} trainable ({100 * params[m][0] / params[m][1]:.4f}%)")
        result_dir = trainer.run()
        curves[NAMES[m]] = [r["loss"] for r in trainer.log]
        del trainer
        ev = evaluate(result_dir, base.data, n=n_eval, model=base.model, max_new_tokens=max_new_tokens, device=base.device)
        (out / m / "eval.json").write_text(json.dumps(ev, indent=2))
        rows[m] = ev
        timing[m] = time.perf_counter() - t0
        log(f"{m}: " + ", ".join(f"{k} {ev[k]:.2f}" for k in METRICS) + f" ({timing[m]:.0f} s)")
    plot_losses(curves, out / "loss_curves.png", title="training loss (Fig. 3, this model)")
    report = _report(base, methods, rows, params, timing, n_eval, time.perf_counter() - t_all)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps({m: {k: rows[m][k] for k in ("n", *METRICS)} | {
        "trainable": params[m][0], "base_params": params[m][1], "seconds": timing[m]} for m in methods}, indent=2))
    return out / "report.md"


def _report(base, methods, rows, params, timing, n_eval, wall) -> str:
    t1 = "| method | trainable parameters | % of base | survey (GPT-Neo-125M) % |\n| --- | --- | --- | --- |\n"
    for m in methods:
        n, total = params[m]
        t1 += f"| {NAMES[m]} | {n:,} | {100 * n / total:.4f}% | {SURVEY[m][0]}% |\n"
    ours = table({NAMES[m]: rows[m] for m in methods})
    survey = table({NAMES[m]: dict(zip(METRICS, SURVEY[m][1:])) for m in methods})
    return f"""# Method comparison

Base model `{base.model or 'SmolLM2-135M-Instruct'}`, data `{base.data}`, {base.steps} steps per method,
batch {base.batch_size}, max_len {base.max_len}, seed {base.seed}, learning rates per method
(`training.loop.LR_DEFAULTS` unless --lr); evaluation: greedy generations for {n_eval} held-out
examples (or as many as are held out), scored with BLEU (sacrebleu), BERTScore F1 (all-MiniLM-L6-v2,
layer 6) and ROUGE-1/2/L F-measure (rouge-score), on a 0-100 scale. Wall time {wall:.0f} s
({', '.join(f'{NAMES[m]} {timing[m]:.0f} s' for m in methods)}).

## Table 1: trainable parameters

{t1}
## Table 3: generation quality

This run:

{ours}
The survey (GPT-Neo-125M on Alpaca, 100 generations), for reference:

{survey}
## Fig. 3: training loss

![training loss](loss_curves.png)
"""
