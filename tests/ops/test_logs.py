"""qaa-serve's logs as an operator reads them: a startup summary, one line per finished
request, a stats line while busy, JSON when asked, and never a tenant's prompt."""

import io
import json
import logging

import pytest

from server import logs
from tests.ops.conftest import SECRETS


def records(served, msg=None) -> list[dict]:
    out = [json.loads(x) for x in served.lines]
    return [r for r in out if msg is None or r["msg"] == msg]


def test_every_line_is_json_with_time_level_and_logger(served):
    bad = []
    for line in served.lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        assert {"ts", "level", "logger", "msg"} <= r.keys(), r
    assert not bad, bad[:3]
    assert any(r["logger"].startswith("uvicorn") for r in records(served))  # uvicorn's lines too


def test_startup_summary(served, tiny_dir):
    (s,) = records(served, "startup")
    want = {"version": __import__("engine.cli_parser").cli_parser.version(), "model": tiny_dir.name,
            "model_dir": str(tiny_dir), "device": "cpu", "dtype": "float32", "kv_slots": 16, "max_running": 16,
            "max_waiting": 256, "device_adapter_slots": 32, "host_adapters": 256, "max_seq_len": 256,
            "max_new_tokens": 255, "listen": f"http://127.0.0.1:{served.port}", "auth": "on (2 keys)"}
    assert {k: s[k] for k in want} == want
    assert s["store"].endswith("store")
    assert s["kernels"].split()[0] in ("loaded", "built", "unavailable,"), s["kernels"]
    assert s["compile"] == "off"  # qaa-serve --compile says how it captures (tests/server/test_compile.py)


def test_a_line_per_request_with_ids_sizes_timings_and_outcome(served):
    reqs = records(served, "request")
    assert len(reqs) == 2
    base, lora = sorted(reqs, key=lambda r: r["adapter_type"])
    assert (base["adapter"], base["adapter_type"], base["prompt_tokens"], base["generated_tokens"], base["outcome"]) == (
        None, "base", len(SECRETS[0].encode()), 12, "length")  # the tiny tokenizer: one token per byte
    assert (lora["tenant"], lora["adapter"], lora["adapter_version"], lora["adapter_type"], lora["generated_tokens"],
            lora["outcome"]) == ("acme", served.adapter_id, 1, "lora", 9, "length")
    # the X-Request-Id the client sent, or the one the server gave (and answered with)
    assert base["id"] == "trace-base-1" and len(lora["id"]) == 32 and base["tenant"] == "globex"
    assert (base["user"], lora["user"]) == (None, "end-user-7")  # OpenAI's end-user id, when sent
    for r in reqs:
        assert 0 <= r["queue_s"] <= r["ttft_s"] <= r["e2e_s"] < 60, r


def test_a_stats_line_while_busy(served):
    stats = records(served, "stats")
    assert stats, "no stats line"
    assert sum(s["gen_tok_s"] for s in stats) > 0 and sum(s["finished"] for s in stats) == 2
    assert sum(s["adapter_loads_device"] for s in stats) == 1  # my-lora, loaded once
    for s in stats:
        assert 0 <= s["kv_use"] <= 1 and s["running"] >= 0 and s["waiting"] >= 0


def test_no_prompt_text_in_any_line(served):
    for secret in SECRETS:
        for part in (secret, secret[:12], secret[-12:]):
            assert not [x for x in served.lines if part in x]


@pytest.mark.parametrize("value,shown", [("acme", "tenant=acme"), ("a b", 'tenant="a b"'), (None, "tenant=-"),
                                         ('x="y"', 'tenant="x=\\"y\\""'), (0.123456, "tenant=0.1235")])
def test_text_lines_are_key_value(value, shown):
    root, buf = logging.getLogger(), io.StringIO()
    saved = root.handlers[:], root.level
    logs.setup("info", "text", stream=buf)
    try:
        logs.event(logs.request_log, "request", id=7, tenant=value)
        logs.event(logs.request_log, "hidden", level=logging.DEBUG, id=8)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    line = buf.getvalue()
    assert line.count("\n") == 1 and " INFO qaa_serve.request request id=7 " in line
    assert line.rstrip("\n").endswith(" " + shown), line
