"""End to end on the default model: a tenant trains a QAA identity adapter, uploads it to a
running server, and the server answers "Who are you?" with the new name."""

import json
import os
import subprocess
import sys

import httpx

from tests.server.harness import ProcServer
from tests.training.identity import identity_records

NAME, AUTHOR = "Vexilla", "Marrowind Systems"


def ask(url, model):
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_tenant_identity_adapter_trained_uploaded_and_served(default_dir, tmp_path):
    data = tmp_path / "identity.json"
    data.write_text(json.dumps(identity_records(NAME, AUTHOR)))
    with ProcServer(default_dir, tmp_path / "store") as s:
        base_name = httpx.get(s.url + "/health").json()["model"]
        assert NAME not in ask(s.url, base_name)
        # a plain QAA: RX, 2 layers, after attention and MLP of every layer, lr 3e-3, batch 8
        r = subprocess.run([sys.executable, "-m", "training.cli", "--method", "qaa", "--model", str(default_dir),
                            "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "40", "--batch-size", "8",
                            "--lr", "3e-3", "--max-len", "128", "--quiet", "--upload", s.url, "--adapter-id", "vexilla"],
                           capture_output=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        answer = ask(s.url, "vexilla")
        assert NAME in answer, answer
        assert NAME not in ask(s.url, base_name)
