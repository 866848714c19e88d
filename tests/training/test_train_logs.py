"""The trainer's schedule, clipping, held-out loss, TensorBoard and progress output, against
independent references (transformers' schedules, a fresh backward, TensorBoard's reader)."""

import json
import subprocess
import sys

import pytest
import torch

from engine.errors import InputError
from training.loop import TrainConfig, Trainer, lr_factor
from tests.training.test_train import cfg, data  # noqa: F401  (the module-scoped task fixture)


@pytest.mark.parametrize("schedule,maker", [
    ("linear", "get_linear_schedule_with_warmup"),
    ("cosine", "get_cosine_schedule_with_warmup"),
    ("constant", "get_constant_schedule_with_warmup"),
])
def test_lr_schedules_are_transformers(schedule, maker):
    import transformers

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kw = {} if schedule == "constant" else {"num_training_steps": 40}
    sched = getattr(transformers, maker)(opt, num_warmup_steps=7, **kw)
    for step in range(40):
        assert lr_factor(schedule, step, 7, 40) == pytest.approx(sched.lr_lambdas[0](step), abs=1e-12), step


def _log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_log_has_lr_grad_norm_and_eval_loss(tiny_dir, data, tmp_path):  # noqa: F811
    c = cfg(tiny_dir, data, tmp_path, "qaa", steps=6, lr=1e-2, lr_schedule="cosine", warmup_steps=2,
            max_grad_norm=0.05, eval_every=3, eval_examples=4)
    t = Trainer(c)
    # the first step's gradient norm, from a fresh backward on the same batch and parameters
    t.opt.zero_grad()
    t.loss(*t.batch_at(0)).backward()
    want = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in t.named.values())).item()
    t.opt.zero_grad()
    t.run()
    log = _log(tmp_path)
    assert [r["lr"] for r in log] == pytest.approx([1e-2 * lr_factor("cosine", s, 2, 6) for s in range(6)])
    assert log[0]["lr"] == 0.0  # warmup starts at 0: the first step leaves the parameters as they were
    assert log[0]["grad_norm"] == pytest.approx(want, rel=1e-4)
    assert [r["step"] for r in log if "eval_loss" in r] == [3, 6]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    # the held-out loss is the loss over the held-out examples, not a training batch
    from training.data import batch

    tokens, labels = batch(t.eval_set)
    with torch.no_grad():
        assert log[-1]["eval_loss"] == pytest.approx(t.loss(tokens, labels).item(), rel=1e-4)


def test_clipping_bounds_the_update(tiny_dir, data, tmp_path):  # noqa: F811
    """With SGD-like first steps compared: a clipped run moves the parameters less than an
    unclipped one from the same start (AdamW normalises, so compare the first moment)."""
    runs = {}
    for name, clip in (("free", None), ("clipped", 1e-3)):
        t = Trainer(cfg(tiny_dir, data, tmp_path / name, "lora", steps=1, max_grad_norm=clip))
        t.run()
        runs[name] = torch.sqrt(sum((t.opt.state[p]["exp_avg"] ** 2).sum() for p in t.named.values())).item()
    # exp_avg after one step = (1 - beta1) * gradient: its norm is 0.1 x the clipped norm
    assert runs["clipped"] == pytest.approx(0.1 * 1e-3, rel=1e-3)
    assert runs["free"] > 10 * runs["clipped"]


def test_report_to_tensorboard_writes_events(tiny_dir, data, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(cfg(tiny_dir, data, tmp_path, "lora", steps=4, eval_every=2, eval_examples=4, report_to="tensorboard")).run()
    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    log = _log(tmp_path)
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert {"train/lr", "train/grad_norm"} <= set(acc.Tags()["scalars"])


@pytest.mark.parametrize("field,value,match", [
    ("lr_schedule", "step", "lr schedule"),
    ("warmup_steps", -1, "warmup_steps"),
    ("max_grad_norm", 0.0, "max_grad_norm"),
    ("report_to", "wandb", "report-to"),
])
def test_bad_options_are_refused(tiny_dir, data, tmp_path, field, value, match):  # noqa: F811
    with pytest.raises(InputError, match=match):
        Trainer(TrainConfig(**{**cfg(tiny_dir, data, tmp_path, "lora").__dict__, field: value}))


def test_progress_in_a_log_file_is_plain_lines(tiny_dir, data, tmp_path):  # noqa: F811
    """stderr redirected to a file: periodic lines, no carriage-return frames; a bad
    --report-to is a one-line error."""
    args = [sys.executable, "-m", "training.cli", "--method", "lora", "--data", str(data), "--out", str(tmp_path),
            "--model", str(tiny_dir), "--steps", "4", "--batch-size", "4", "--max-len", "64", "--device", "cpu",
            "--lr-schedule", "cosine", "--warmup-steps", "1", "--max-grad-norm", "1.0", "--eval-every", "2"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4 and "grad_norm" in lines[0] and "eval_loss" in lines[1]
    r = subprocess.run(args[:-2] + ["--report-to", "mlflow"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("qaa-train: error: --report-to 'mlflow'")
