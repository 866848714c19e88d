"""Containment: every hostile case gets its 4xx within 2 s from a real `qaa-serve` process while
another tenant's well-formed request generates, that request's greedy text stays what it is
on an idle server, and nothing is left held afterwards."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.adapters.cases import CASES, make
from tests.server.harness import ProcServer, adapter_files, generate, metrics, upload
from tests.server.hostile_cases import cases

UPLOAD_MB = 32
KEYS = {"sk-good": "good", "sk-evil": "evil", "sk-admin": {"tenant": "ops", "admin": True}}


def _shape(model_dir):
    from engine.config import ModelConfig

    return ModelConfig.from_dir(model_dir).shape()


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "keys.json").write_text(json.dumps(KEYS))
    with ProcServer(tiny_dir, d / "store", api_keys=d / "keys.json", max_running=4, max_upload_mb=UPLOAD_MB) as s:
        yield s


GOOD = dict(adapter_id="good-lora", max_new_tokens=60, ignore_eos=True)


def test_hostile_inputs_get_4xx_fast_and_hurt_no_other_tenant(server, tiny_dir):
    shape = _shape(tiny_dir)
    table = cases(shape, UPLOAD_MB * 2**20)
    assert len(table) >= 120, len(table)
    assert upload(server.url, "good-lora", adapter_files(make(CASES[0], shape, seed=11)), key="sk-good").status_code == 201
    idle = generate(server.url, "the good tenant's prompt", key="sk-good", **GOOD)
    assert idle.status_code == 200, idle.text
    expected = idle.json()["generated_text"]

    texts, stop = [], threading.Event()

    def good_tenant():  # generates, again and again, for as long as the hostile cases run
        while not stop.is_set():
            r = generate(server.url, "the good tenant's prompt", key="sk-good", **GOOD)
            texts.append((r.status_code, r.json().get("generated_text")))

    t = threading.Thread(target=good_tenant)
    t.start()
    failures = []
    try:
        for case in table:
            t0 = time.monotonic()
            try:
                r = case.send(server.url, "sk-evil")
            except httpx.HTTPError as e:
                failures.append(f"{case.name}: {type(e).__name__} {e}")
                continue
            took = time.monotonic() - t0
            try:
                body = r.json()
            except ValueError:
                body = None
            # TGI's shape {"error": str} or OpenAI's {"error": {"message": str}}, each naming the problem
            err = body.get("error") if isinstance(body, dict) else None
            message = err.get("message") if isinstance(err, dict) else err
            if r.status_code not in case.statuses or took > 2.0 or not isinstance(message, str) or not message:
                failures.append(f"{case.name}: {r.status_code} in {took:.2f}s {r.text[:200]!r}")
    finally:
        stop.set()
        t.join(timeout=120)
    assert not failures, "\n".join(failures)
    assert len(texts) >= 3, "the good tenant's request did not run during the suite"
    assert all(code == 200 and text == expected for code, text in texts), texts[:3]

    # nothing a hostile request did is still held, and the server serves everyone
    m = metrics(server.url)
    assert m["qaa_kv_cache_usage_ratio{}"] == 0 and m["qaa_requests_running{}"] == 0
    assert m["qaa_adapter_pins{}"] == 0 and m["qaa_requests_waiting{}"] == 0
    assert httpx.get(server.url + "/health").status_code == 200
    listed = httpx.get(server.url + "/v1/adapters", headers={"authorization": "Bearer sk-evil"}).json()["data"]
    assert listed == [], "a refused upload was stored"
    again = generate(server.url, "the good tenant's prompt", key="sk-good", **GOOD)
    assert again.json()["generated_text"] == expected


def _raw(url: str, head: bytes, body_chunks=()) -> tuple[int, dict]:
    """One request on a raw socket: the status and JSON body of the answer, read even when the
    server answers before the body is sent (as it should for a body over the limit)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        for c in body_chunks:
            s.sendall(c)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"null")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_oversized_bodies_are_refused_before_they_are_read(server):
    """A declared length over the limit is refused from the headers alone: the client never has
    to send (and the server never holds) the body."""
    big = UPLOAD_MB * 2**20 * 4
    head = (f"PUT /v1/adapters/evil HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-evil\r\n"
            f"content-type: multipart/form-data; boundary=b\r\ncontent-length: {big}\r\n\r\n").encode()
    t0 = time.monotonic()
    status, body = _raw(server.url, head)
    assert status == 413 and "limit" in body["error"] and time.monotonic() - t0 < 2
    head = (b"POST /generate HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-evil\r\n"
            b"content-type: application/json\r\ncontent-length: 8000000\r\n\r\n")
    status, body = _raw(server.url, head)
    assert status == 413 and body["error_type"] == "too_large"


def test_admin_uploads_to_a_tenant_through_an_encoded_slash(server, tiny_dir):
    ad = adapter_files(make(CASES[4], _shape(tiny_dir), seed=5))
    r = upload(server.url, "evil%2Fgift", ad, key="sk-admin")
    assert r.status_code == 201, r.text
    assert (r.json()["tenant"], r.json()["id"]) == ("evil", "gift")
    r = generate(server.url, "hi", key="sk-evil", adapter_id="gift", max_new_tokens=3)
    assert r.status_code == 200
    assert httpx.delete(server.url + "/v1/adapters/evil%2Fgift", headers={"authorization": "Bearer sk-admin"}).status_code == 200
