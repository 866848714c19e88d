"""Failure containment: a fault in one request's admission, adapter load, disk read, prefill or
decode fails that request alone; a stalled scheduler turns /health red; a full disk is a 507
that loses nothing; SIGTERM drains to its deadline and ends every open stream with a final
event."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import json
import threading
import time

import httpx
import pytest

from tests.adapters.cases import CASES, make
from tests.server.harness import ProcServer, ThreadServer, adapter_files, generate, metrics, upload

N = 24


@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    with ThreadServer(tiny_dir, tmp_path_factory.mktemp("store"), max_running=8, stall_seconds=1) as s:
        shape = s.state.engine.shape
        for i, case in enumerate(CASES):  # lora, lora, sora, prefix, qaa, qaa (the victim's own)
            assert upload(s.url, f"ad{i}", adapter_files(make(case, shape, seed=40 + i))).status_code == 201
        yield s


REQUESTS = [(f"bystander {i}", f"ad{i}" if i < 5 else None) for i in range(6)]


def _run_all(url, reqs):
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        return list(pool.map(lambda r: generate(url, r[0], adapter_id=r[1], max_new_tokens=N, ignore_eos=True), reqs))


def _forget(s, adapter_id):
    """Drop an adapter from device and host memory, so its next use reads it from disk."""
    done = threading.Event()
    s.state.scheduler.post(lambda: (s.state.residency.forget("default", adapter_id), done.set()))
    assert done.wait(10)


def _hold_scheduler(s, seconds):
    """Keep the scheduler busy for a moment, so requests sent meanwhile share its next step."""
    s.state.scheduler.post(lambda: time.sleep(seconds))


@pytest.mark.parametrize("stage", ["admit", "prefill", "decode", "load", "read"])
def test_a_fault_in_one_request_fails_that_request_only(srv, stage):
    s = srv
    idle = [r.json()["generated_text"] for r in _run_all(s.url, REQUESTS)]
    # the victim's QAA adapter is its own (a fault loading it fails every request for it);
    # its steps are shared with every bystander's
    victim = ("the victim", "ad5")

    def fault(where, what):
        if where != stage:
            return
        if where in ("load", "read"):
            if what.adapter_id == "ad5":
                raise RuntimeError("injected fault")
        elif any(r.prompt_ids == victim_ids for r in what):
            if where != "decode" or any(len(r.seq.out_ids) >= 3 for r in what if r.prompt_ids == victim_ids):
                raise RuntimeError("injected fault")

    victim_ids = s.state.engine.encode_prompt(victim[0])
    _forget(s, "ad5")  # the victim's adapter must be loaded (and, for 'read', read from disk)
    s.state.scheduler.faults = s.state.residency.faults = fault
    try:
        _hold_scheduler(s, 0.3)
        got = _run_all(s.url, REQUESTS + [victim])
    finally:
        s.state.scheduler.faults = s.state.residency.faults = None
    *bystanders, bad = got
    assert [r.status_code for r in bystanders] == [200] * len(REQUESTS)
    assert [r.json()["generated_text"] for r in bystanders] == idle
    assert bad.status_code == 500 and "injected fault" in bad.json()["error"], bad.text
    assert ("adapter load" if stage in ("load", "read") else "admission" if stage == "admit" else stage) \
        in bad.json()["error"]
    m = metrics(s.url)
    assert m["qaa_kv_cache_usage_ratio{}"] == 0 and m["qaa_adapter_pins{}"] == 0
    assert s.state.engine.cache.n_free == s.state.engine.cache.n_slots and not s.state.residency.pins
    # the fault was the request's, not the adapter's: without it the victim is served
    again = generate(s.url, victim[0], adapter_id=victim[1], max_new_tokens=N, ignore_eos=True)
    assert again.status_code == 200


def test_a_stalled_scheduler_makes_health_unhealthy(srv):
    s = srv

    def slow(where, what):
        if where == "decode":
            time.sleep(2.5)

    assert httpx.get(s.url + "/health").status_code == 200
    s.state.scheduler.faults = slow
    try:
        t = threading.Thread(target=generate, args=(s.url, "slow"), kwargs=dict(max_new_tokens=2, ignore_eos=True))
        t.start()
        deadline, seen = time.monotonic() + 10, None
        while time.monotonic() < deadline and seen != 503:
            seen = httpx.get(s.url + "/health").status_code
            time.sleep(0.1)
        s.state.scheduler.faults = None
        t.join(30)
    finally:
        s.state.scheduler.faults = None
    assert seen == 503
    r = httpx.get(s.url + "/health")
    assert r.status_code == 200, r.text


def test_a_full_disk_is_507_and_loses_nothing(srv, monkeypatch):
    import server.store

    s = srv
    before = generate(s.url, "still here", adapter_id="ad0", max_new_tokens=6, ignore_eos=True).json()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server.store, "stage_dir", full)
    r = upload(s.url, "ad0", adapter_files(make(CASES[0], s.state.engine.shape, seed=99)))
    assert r.status_code == 507 and r.json()["error_type"] == "insufficient_storage"
    monkeypatch.undo()
    listed = {a["id"]: a["version"] for a in httpx.get(s.url + "/v1/adapters").json()["data"]}
    assert listed["ad0"] == 1
    assert generate(s.url, "still here", adapter_id="ad0", max_new_tokens=6, ignore_eos=True).json() == before


def test_sigterm_ends_every_open_stream_by_the_drain_deadline(tmp_path):
    from tests.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "long", max_position_embeddings=4096)
    with ProcServer(model, tmp_path / "store", max_seq_len=4096, max_running=8, drain_seconds=3,
                    max_new_tokens=4000) as s:
        events: dict[int, list] = {}

        def stream(i):
            if i % 2:
                body = {"inputs": f"stream {i}", "parameters": {"max_new_tokens": 4000, "ignore_eos": True}}
                path = "/generate_stream"
            else:
                body = {"model": "long", "prompt": f"stream {i}", "max_tokens": 4000, "ignore_eos": True,
                        "stream": True}
                path = "/v1/completions"
            with httpx.stream("POST", s.url + path, json=body, timeout=60) as r:
                events[i] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while metrics(s.url).get("qaa_requests_running{}") != 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics(s.url)["qaa_requests_running{}"] == 8
        t0 = time.monotonic()
        code = s.terminate(timeout=30)
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
    assert code == 0 and took < 5, (code, took)
    assert len(events) == 8
    for i, ev in events.items():
        if i % 2:  # TGI: the last event is an error event saying why
            last = json.loads(ev[-1])
            assert last["error_type"] == "unavailable" and "shutting down" in last["error"], last
        else:  # OpenAI: an error event, then [DONE]
            assert ev[-1] == "[DONE]"
            last = json.loads(ev[-2])
            assert "shutting down" in last["error"]["message"], last
        assert len(ev) > 3  # tokens streamed before the drain ended it
