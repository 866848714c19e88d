"""Evaluation metrics and the comparison report."""

import json
import os
import subprocess
import sys

import pytest

from training.evaluate import score


def test_metrics_against_their_definitions():
    refs = ["The cat sat on the mat.", "Paris is the capital of France."]
    same = score(refs, refs)
    assert same["bleu"] == pytest.approx(100) and same["rouge1"] == pytest.approx(100)
    assert same["rougeL"] == pytest.approx(100) and same["bertscore_f1"] == pytest.approx(100, abs=0.01)
    other = score(["A dog ran in the park.", "Bananas are yellow."], refs)
    for k in ("bleu", "bertscore_f1", "rouge1", "rouge2", "rougeL"):
        assert other[k] < same[k] - 5, k
    # ROUGE-1 F of a half-overlapping pair, by hand: P = R = 1/2 -> F = 50
    assert score(["the cat"], ["the dog"])["rouge1"] == pytest.approx(50)
    # an empty generation scores 0 and halves the mean of a perfect one
    half = score(["", refs[1]], refs)
    assert half["bertscore_f1"] == pytest.approx(50, abs=0.01)


def run(mod_main, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", f"import sys; from training.cli_eval import {mod_main}; sys.exit({mod_main}())",
                           *args], capture_output=True, timeout=900, env=env)


def test_compare_writes_the_report(tiny_dir, tmp_path):
    recs = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(40)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "cmp"
    r = run("compare_main", "--data", str(data), "--steps", "3", "--methods", "lora,qaa", "--out", str(out),
            "--model", str(tiny_dir), "--n", "4", "--max-new-tokens", "6", "--batch-size", "4", "--max-len", "48",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    report = (out / "report.md").read_text()
    for s in ("Table 1", "Table 3", "Fig. 3", "LoRA", "QAA", "78.74", "loss_curves.png"):
        assert s in report, s
    assert (out / "loss_curves.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"lora", "qaa"} and res["qaa"]["n"] == 4 and 0 <= res["lora"]["bertscore_f1"] <= 100
    assert res["lora"]["trainable"] > 0
    e = run("eval_main", "--adapter", str(out / "qaa" / "adapter"), "--data", str(data), "--n", "4",
            "--model", str(tiny_dir), "--max-new-tokens", "6", "--device", "cpu")
    assert e.returncode == 0, e.stderr.decode()[-2000:]
    assert json.loads((out / "qaa" / "adapter" / "eval.json").read_text())["n"] == 4
    bad = run("compare_main", "--data", str(data), "--methods", "lora,bitfit", "--out", str(out), "--model", str(tiny_dir))
    assert bad.returncode == 2 and b"bitfit" in bad.stderr and b"Traceback" not in bad.stderr
