"""The gateway's metrics contract: what the Inference Extension's endpoint picker and vLLM's
dashboards read from /metrics, parsed by prometheus_client, against a real server."""

import threading
import time

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from tests.adapters.cases import CASES, make
from tests.server.harness import ThreadServer, adapter_files, upload

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info")


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def lora_info(url: str) -> dict:
    got = samples(httpx.get(url + "/metrics").text)
    (s,) = got["vllm:lora_requests_info"]  # exactly one series, however often the set changed
    return s


def names(label: str) -> set[str]:
    return set(label.split(",")) - {""}


@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    with ThreadServer(tiny_dir, tmp_path_factory.mktemp("store"), max_running=2, max_waiting=16,
                      max_device_adapters=4) as s:
        yield s


def test_one_series_per_gateway_gauge_and_vllm_histograms(srv):
    r = httpx.post(srv.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3, "ignore_eos": True}},
                   timeout=60)
    assert r.status_code == 200
    got = samples(httpx.get(srv.url + "/metrics").text)
    for g in GAUGES:
        assert len(got[g]) == 1, (g, got.get(g))
    model = srv.state.model_name
    for g in GAUGES[:3]:
        assert got[g][0].labels == {"model_name": model}
    assert 0.0 <= got["vllm:kv_cache_usage_perc"][0].value <= 1.0
    info = got["vllm:lora_requests_info"][0]
    assert set(info.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert info.labels["max_lora"] == "4"
    assert abs(info.value - time.time()) < 600  # a Unix timestamp, what the picker sorts series by
    # The vLLM-named histograms count the same events as ours (ours are split by adapter type).
    for ours, theirs in [("qaa_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
                         ("qaa_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"),
                         ("qaa_inter_token_latency_seconds", "vllm:inter_token_latency_seconds")]:
        n_ours = sum(s.value for s in got[ours + "_count"])
        (n_theirs,) = got[theirs + "_count"]
        assert n_theirs.labels == {"model_name": model}
        assert n_ours == n_theirs.value > 0


def test_running_and_waiting_adapters_follow_the_scheduler_within_one_step(srv):
    """Two adapters (of different types) run, a third waits for a KV slot (max_running=2): the
    labels list exactly those names, read after at most one more scheduler step; when the
    requests end, both lists are empty within one step."""
    sched = srv.state.scheduler
    ids = {}
    for case, name in [(CASES[0], "lora-a"), (CASES[4], "qaa-b"), (CASES[3], "prefix-c")]:
        assert upload(srv.url, name, adapter_files(make(case, srv.state.engine.shape, seed=7))).status_code == 201
        ids[name] = case
    steps = [0]
    real_gauges, real_step = sched._gauges, sched._step

    def counted():
        real_gauges()
        steps[0] += 1

    def slow_step():  # keeps the requests running long enough to look at them
        time.sleep(0.01)
        return real_step()

    sched._gauges, sched._step = counted, slow_step
    try:
        def wait_one_step():
            s0 = steps[0]
            deadline = time.monotonic() + 10
            while steps[0] <= s0 and time.monotonic() < deadline:
                time.sleep(0.002)
            assert steps[0] > s0

        started = {n: threading.Event() for n in ids}
        clients = []

        def stream(name):
            body = {"inputs": "x", "parameters": {"adapter_id": name, "max_new_tokens": 200, "ignore_eos": True}}
            with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/generate_stream", json=body) as r:
                clients.append(r)
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        started[name].set()
                    if stop.is_set():
                        return

        stop = threading.Event()
        threads = [threading.Thread(target=stream, args=(n,)) for n in ("lora-a", "qaa-b")]
        for t in threads:
            t.start()
        assert started["lora-a"].wait(30) and started["qaa-b"].wait(30)
        waiter = threading.Thread(target=stream, args=("prefix-c",))
        waiter.start()
        deadline = time.monotonic() + 10
        while not any(r.entry and r.entry.adapter_id == "prefix-c" for r in list(sched.waiting)):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        wait_one_step()
        info = lora_info(srv.url)
        assert names(info.labels["running_lora_adapters"]) == {"lora-a", "qaa-b"}
        assert names(info.labels["waiting_lora_adapters"]) == {"prefix-c"}
        stop.set()  # the clients hang up: every request is cancelled
        for t in threads + [waiter]:
            t.join(30)
        deadline = time.monotonic() + 10
        while sched.running or sched.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        wait_one_step()
        info = lora_info(srv.url)
        assert info.labels["running_lora_adapters"] == "" and info.labels["waiting_lora_adapters"] == ""
    finally:
        sched._gauges, sched._step = real_gauges, real_step


@pytest.mark.parametrize("allowed, running, waiting", [
    ("all", "a1,b1", "b2"),
    ("none", "", ""),
    (frozenset({"tb"}), "b1", "b2"),
])
def test_adapter_names_option(allowed, running, waiting):
    m = Metrics("base", adapter_names=allowed, max_lora=3)
    m.set_lora_requests(3, [("ta", "a1"), ("tb", "b1"), ("ta", "a1")], [("tb", "b2")])
    got = samples(generate_latest(m.registry).decode())
    (s,) = got["vllm:lora_requests_info"]
    assert s.labels == {"max_lora": "3", "running_lora_adapters": running, "waiting_lora_adapters": waiting}


def test_probes_ready_and_live(srv):
    """Readiness follows draining; liveness fails when the scheduler makes no progress for
    --stall-seconds while a request waits, and recovers when it steps again."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server.probes import register_probes

    app = FastAPI()
    register_probes(app, srv.state)
    probe = TestClient(app)
    sched = srv.state.scheduler
    stall = sched.stall_seconds
    assert probe.get("/health/ready").status_code == 200
    sched.draining = True
    try:
        assert probe.get("/health/ready").status_code == 503
    finally:
        sched.draining = False
    gate, real_step = threading.Event(), sched._step

    def stuck_step():
        gate.wait(30)
        return real_step()

    sched._step, sched.stall_seconds = stuck_step, 0.3
    try:
        t = threading.Thread(target=httpx.post, args=(srv.url + "/generate",),
                             kwargs={"json": {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, "timeout": 60})
        t.start()
        deadline = time.monotonic() + 10
        while not (sched.waiting or sched.running):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert probe.get("/health/live").status_code == 200  # busy, but not for long yet
        time.sleep(0.4)
        r = probe.get("/health/live")
        assert r.status_code == 503 and r.json()["error_type"] == "stalled"
        assert probe.get("/health/ready").status_code == 200  # liveness restarts it; readiness is about draining
    finally:
        sched._step, sched.stall_seconds = real_step, stall
        gate.set()
    t.join(30)
    deadline = time.monotonic() + 10
    while probe.get("/health/live").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
