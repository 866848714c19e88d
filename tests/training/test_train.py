"""The trainer on the tiny model and a synthetic task the test makes."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from adapters.seams import SingleSeams
from engine.engine import Engine
from engine.sampling import SamplingParams
from training.loop import TrainConfig, Trainer

METHODS = ["lora", "sora", "prefix", "qaa", "full"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A learnable task: answer with the reversed word."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(48)]
    recs = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in words]
    p = tmp_path_factory.mktemp("data") / "task.json"
    p.write_text(json.dumps(recs))
    return p


def cfg(tiny_dir, data, out, method, **kw):
    base = dict(method=method, data=str(data), out=str(out), model=str(tiny_dir), steps=25, batch_size=8,
                max_len=64, device="cpu", quiet=True, lr={"full": 3e-3, "prefix": 3e-2, "qaa": 3e-2}.get(method, 1e-2))
    base.update(kw)
    return TrainConfig(**base)


def eval_loss(t: Trainer) -> float:
    with torch.no_grad():
        return float(t.loss(*t.batch_at(10_000)))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lowers_the_loss(method, tiny_dir, data, tmp_path):
    t = Trainer(cfg(tiny_dir, data, tmp_path, method))
    before = eval_loss(t)
    out = t.run()
    after = eval_loss(t)
    assert after < 0.8 * before, (before, after)
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 25 and (tmp_path / "loss.png").stat().st_size > 1000
    assert out.is_dir()


@pytest.mark.parametrize("method", ["lora", "qaa"])
def test_resume_continues_the_same_run(method, tiny_dir, data, tmp_path):
    straight = Trainer(cfg(tiny_dir, data, tmp_path / "a", method, steps=8))
    straight.run()
    first = Trainer(cfg(tiny_dir, data, tmp_path / "b", method, steps=4))
    first.run()
    resumed = Trainer(cfg(tiny_dir, data, tmp_path / "b", method, steps=8, resume=True))
    assert resumed.step == 4
    resumed.run()
    for k, p in straight.named.items():
        assert torch.allclose(p, resumed.named[k], atol=1e-6), k
    lines = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))


@pytest.mark.parametrize("method", ["lora", "sora", "prefix", "qaa"])
def test_served_logits_equal_training_logits(method, tiny_dir, data, tmp_path):
    t = Trainer(cfg(tiny_dir, data, tmp_path, method, steps=6))
    adapter_dir = t.run()
    tokens, _ = t.batch_at(0)
    row = tokens[0][tokens[0] != 0][:20][None]
    with torch.no_grad():
        trained = t.model(row, seams=SingleSeams(t.adapter))[0]  # (T, V)
    engine = Engine(tiny_dir, device="cpu", max_batch=2, max_seq_len=128, max_adapters=1)
    engine.load_adapter("x", adapter_dir)
    seq = engine.new_sequence(row[0].tolist(), SamplingParams(max_new_tokens=1), "x")
    engine.admit(seq)
    T = row.shape[1]
    pos = (torch.arange(T) + seq.start)[None]
    with torch.no_grad():
        served = engine.model(row, pos, engine.cache, torch.tensor([seq.slot]), engine.seams_for([seq]))[0]
    assert (served - trained).abs().max().item() <= 1e-4


def test_parameter_shift_steps_match_autograd(tiny_dir, data, tmp_path):
    runs = {}
    for grad in ("autograd", "parameter-shift"):
        t = Trainer(cfg(tiny_dir, data, tmp_path / grad, "qaa", steps=3, qaa_gradient=grad,
                        qaa_placement=["mlp"]))
        t.run()
        runs[grad] = t
    for k, p in runs["autograd"].named.items():
        assert torch.allclose(p, runs["parameter-shift"].named[k], atol=1e-5), k


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, timeout=600, env=env)


def test_bad_input_is_a_clear_error(tiny_dir, data, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    nofields = tmp_path / "nofields.json"
    nofields.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    cases = [
        (["--data", str(tmp_path / "missing.json")], "does not exist"),
        (["--data", str(empty)], "empty"),
        (["--data", str(bad_json)], "neither JSON nor JSONL"),
        (["--data", str(nofields)], "instruction"),
        (["--data", str(data), "--method", "bitfit"], "unknown method"),
        (["--data", str(data), "--steps", "0"], "steps must be > 0"),
    ]
    for extra, words in cases:
        args = ["--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--method", "lora", "--quiet", *extra]
        r = run_cli(*args)
        err = r.stderr.decode()
        assert r.returncode == 2 and words in err and "Traceback" not in err, (extra, err)


def test_failed_upload_keeps_the_adapter(tiny_dir, data, tmp_path):
    from tests.server.harness import free_port

    out = tmp_path / "o"
    r = run_cli("--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--method", "qaa", "--steps", "2",
                "--quiet", "--upload", f"http://127.0.0.1:{free_port()}", "--adapter-id", "me")
    err = r.stderr.decode()
    assert r.returncode == 2 and "upload" in err and "Traceback" not in err, err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    engine = Engine(tiny_dir, device="cpu", max_batch=1, max_adapters=1)
    engine.load_adapter("me", out / "adapter")  # a complete, valid adapter


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_peft_finds_the_base_model_of_a_trained_adapter(method, tiny_dir, data, tmp_path):
    """base_model_name_or_path names the base so that PEFT's AutoPeftModelForCausalLM loads the
    adapter directory alone (offline, the base being a local checkpoint), with our outputs."""
    from peft import AutoPeftModelForCausalLM

    out = Trainer(cfg(tiny_dir, data, tmp_path, method, steps=3)).run()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir.resolve())
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    engine = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=64)
    engine.load_adapter("t", out)
    ours = engine.generate(["abcde"], SamplingParams(max_new_tokens=6, ignore_eos=True), adapters=["t"])[0].token_ids
    ids = torch.tensor([engine.encode_prompt("abcde")])
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                     do_sample=False, min_new_tokens=6)[0, ids.shape[1]:].tolist()
    if method == "lora":  # prefix: loaded above; its logits against PEFT are in tests/adapters/test_peft.py
        assert ours == theirs
