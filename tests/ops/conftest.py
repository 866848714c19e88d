"""One real `qaa-serve` process (tiny model, JSON logs, a short stats interval) that the
ops tests share: its whole log output and its /metrics after base and adapter requests."""

import json
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.server.harness import ProcServer, adapter_files, upload

SECRETS = ("zebra-quartz-secret-prompt", "ostrich-nebula-secret-chat")
"""Prompt text the tenants send: no log line may contain it."""


@dataclass
class Served:
    lines: list[str]
    """Everything the server wrote to stdout and stderr, one entry per line."""
    metrics: str
    """/metrics as scraped after the requests."""
    port: int
    adapter_id: str


def finished(output: str) -> int:
    return sum(json.loads(x).get("finished", 0) for x in output.splitlines() if '"msg": "stats"' in x)


@pytest.fixture(scope="package")
def served(tiny_dir, tmp_path_factory):
    from engine.engine import Engine
    from tests.adapters.cases import CASES, make

    tmp = tmp_path_factory.mktemp("ops")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"sk-acme": "acme", "sk-globex": "globex"}))
    shape = Engine(tiny_dir, device="cpu", max_batch=1, max_adapters=1).shape
    with ProcServer(tiny_dir, tmp / "store", api_keys=keys, log_format="json", stats_interval=0.3) as s:
        assert upload(s.url, "my-lora", adapter_files(make(CASES[0], shape, seed=1)), key="sk-acme").status_code == 201
        r = httpx.post(s.url + "/generate", timeout=60, json={"inputs": SECRETS[0], "parameters": {
            "max_new_tokens": 12, "ignore_eos": True}}, headers={"authorization": "Bearer sk-globex",
                                                                  "x-request-id": "trace-base-1"})
        assert r.status_code == 200, r.text
        r = httpx.post(s.url + "/v1/chat/completions", headers={"authorization": "Bearer sk-acme"}, timeout=60,
                       json={"model": "my-lora", "messages": [{"role": "user", "content": SECRETS[1]}],
                             "max_tokens": 9, "ignore_eos": True, "user": "end-user-7"})
        assert r.status_code == 200, r.text
        text = httpx.get(s.url + "/metrics").text
        deadline = time.monotonic() + 10  # until a stats line has counted both requests
        while finished(s.output()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.terminate() == 0
        return Served(s.output().splitlines(), text, s.port, "my-lora")
