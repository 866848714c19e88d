"""`qaa-generate` as a user runs it: completion on stdout, one-line errors, no tracebacks."""

import json
import os
import subprocess
import sys

import pytest

from engine.engine import Engine
from engine.errors import ModelError
from engine.sampling import SamplingParams


def run_cli(*args, stdin: bytes = b""):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], input=stdin, capture_output=True, env=env, timeout=300)


def assert_one_line_error(r, *words):
    err = r.stderr.decode()
    assert r.returncode != 0 and r.stdout == b""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_prints_the_greedy_completion_only(tiny_dir):
    r = run_cli("--model", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr.decode()
    expected = Engine(tiny_dir, device="cpu", max_batch=1).generate(["hello"], SamplingParams(max_new_tokens=12))[0].text
    assert r.stdout.decode() == expected + "\n"


def test_reads_prompt_from_stdin(tiny_dir):
    a = run_cli("--model", str(tiny_dir), "--prompt", "-", "--max-new-tokens", "5", stdin="héllo".encode())
    b = run_cli("--model", str(tiny_dir), "--prompt", "héllo", "--max-new-tokens", "5")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("case", ["empty", "argv-bytes", "stdin-bytes", "too-long"])
def test_bad_prompts(tiny_dir, case):
    args = {"empty": ["--prompt", ""], "argv-bytes": ["--prompt", os.fsdecode(b"ab\xffcd")],
            "stdin-bytes": ["--prompt", "-"], "too-long": ["--prompt", "x" * 300]}[case]
    words = {"empty": ["empty"], "argv-bytes": ["UTF-8"], "stdin-bytes": ["UTF-8"], "too-long": ["300 tokens", "context"]}[case]
    r = run_cli("--model", str(tiny_dir), *args, stdin=b"\xff\xfe")
    assert_one_line_error(r, *words)


def test_missing_model_dir(tmp_path):
    assert_one_line_error(run_cli("--model", str(tmp_path / "nope"), "--prompt", "hi"), "does not exist")


def test_non_llama_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    assert_one_line_error(run_cli("--model", str(tmp_path), "--prompt", "hi"), "gpt2", "llama")


def test_dir_without_config(tmp_path):
    assert_one_line_error(run_cli("--model", str(tmp_path), "--prompt", "hi"), "config.json")


def test_pickle_only_checkpoint_is_refused(tiny_dir, tmp_path):
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_bytes((tiny_dir / f).read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelError, match="safetensors"):
        Engine(tmp_path, device="cpu")


def test_checkpoint_with_wrong_shapes_is_refused(tiny_dir, tmp_path):
    for f in tiny_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="shape"):
        Engine(tmp_path, device="cpu")


def test_adapter_option(tiny_dir, tmp_path):
    from adapters.files import save_dir
    from tests.adapters.cases import CASES, make

    eng = Engine(tiny_dir, device="cpu", max_batch=1)
    for case in CASES:
        d = save_dir(make(case, eng.shape, seed=4), tmp_path / case.name)
        r = run_cli("--model", str(tiny_dir), "--prompt", "hello", "--max-new-tokens", "8", "--adapter", str(d))
        assert r.returncode == 0, r.stderr.decode()
        eng.load_adapter("x", d)
        want = eng.generate(["hello"], SamplingParams(max_new_tokens=8), adapters=["x"])[0].text
        eng.adapters.unload("x")
        assert r.stdout.decode() == want + "\n", case.name
    assert_one_line_error(run_cli("--model", str(tiny_dir), "--prompt", "hi", "--adapter", str(tmp_path)), "adapter_config.json")
