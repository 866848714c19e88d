"""qaa-serve on a local Ray cluster (num_cpus=2): the ingress and 2 engine replicas of the
tiny model, over real HTTP through Serve's proxy. Started once for the module."""

import concurrent.futures as cf
import json
import os
import threading
import time

import httpx
import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before ray is imported: nothing leaves the machine
ray = pytest.importorskip("ray")  # the dev install has it (qaa-serve[ray]); this only guards odd setups
from ray import serve  # noqa: E402

from engine.engine import Engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from server.ray_app import REPLICA_HEADER, build  # noqa: E402
from tests.adapters.cases import CASES, make  # noqa: E402
from tests.server.harness import adapter_files, free_port, upload  # noqa: E402

REPLICAS = 2


@pytest.fixture(scope="module")
def fleet(tiny_dir, tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
    port = free_port()
    store = tmp_path_factory.mktemp("ray-store")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": str(tiny_dir), "adapter_dir": str(store), "replicas": REPLICAS, "max_running": 2,
                         "device": "cpu", "max_seq_len": 256, "engine_num_cpus": 0.5}), name="qaa", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(tiny_dir):
    return Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=256, max_adapters=1)


def alone(local, ad, prompt, n):
    local.load_adapter("x", ad)
    out = local.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True), adapters=["x"])[0].text
    local.adapters.unload("x")
    return out


def gen(url, adapter, prompt="ray serve", n=8):
    return httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": {
        "adapter_id": adapter, "max_new_tokens": n, "ignore_eos": True}}, timeout=120)


def burst(url, adapter, k, n):
    with cf.ThreadPoolExecutor(k) as pool:
        return list(pool.map(lambda i: gen(url, adapter, "burst", n), range(k)))


def engine_actors():
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Engine#" in a["name"]]


def test_same_adapter_lands_on_the_same_replica(fleet, local):
    ads = {f"aff-{c.name}": make(c, local.shape, seed=20 + i) for i, c in enumerate(CASES[:4])}
    for name, ad in ads.items():
        assert upload(fleet, name, adapter_files(ad)).status_code == 201
    for name, ad in ads.items():
        first = gen(fleet, name)
        time.sleep(0.3)  # replicas report the ids they hold every 0.1 s
        rs = [first] + [gen(fleet, name) for _ in range(4)]
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        assert len({r.headers[REPLICA_HEADER] for r in rs}) == 1, (name, [r.headers[REPLICA_HEADER] for r in rs])
        assert {r.json()["generated_text"] for r in rs} == {alone(local, ad, "ray serve", 8)}


def test_streaming_through_serve(fleet, local):
    """Chunks arrive as they are generated (the first long before the last), through Serve's
    proxy, the ingress and the engine's streaming handle."""
    ad = make(CASES[4], local.shape, seed=31)
    assert upload(fleet, "stream-qaa", adapter_files(ad)).status_code == 201
    body = {"inputs": "stream me", "parameters": {"adapter_id": "stream-qaa", "max_new_tokens": 200, "ignore_eos": True}}
    chunks, arrived = [], []
    with httpx.stream("POST", f"{fleet}/generate_stream", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[REPLICA_HEADER] in {a["name"].rsplit("#", 1)[1] for a in engine_actors()}
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                arrived.append(time.monotonic())
    assert len(chunks) == 200 and chunks[-1]["details"]["finish_reason"] == "length"  # TGI: the last token is the final
    assert arrived[-1] - arrived[0] > 0.05  # not one buffered body
    want = alone(local, ad, "stream me", 200)
    assert "".join(c["token"]["text"] for c in chunks) == chunks[-1]["generated_text"] == want


def test_upload_served_by_both_replicas_then_replacement(fleet, local):
    """Enough concurrent requests for one adapter that one replica (max_ongoing_requests = 2)
    cannot take them all: Serve sends the rest to the other, which reads the adapter from
    the shared store. A replacement through the ingress is then served at its new version
    by both, within the store's bound (1 s)."""
    v1, v2 = make(CASES[0], local.shape, seed=41), make(CASES[0], local.shape, seed=42)
    names = {a["name"].rsplit("#", 1)[1] for a in engine_actors()}
    assert upload(fleet, "both", adapter_files(v1)).status_code == 201
    rs = burst(fleet, "both", 12, 120)
    assert {r.headers[REPLICA_HEADER] for r in rs} == names
    assert {r.json()["generated_text"] for r in rs} == {alone(local, v1, "burst", 120)}
    r = upload(fleet, "both", adapter_files(v2))
    assert r.status_code == 200 and r.json()["version"] == 2
    time.sleep(1.0)
    rs = burst(fleet, "both", 12, 120)
    assert {r.headers[REPLICA_HEADER] for r in rs} == names
    assert {r.json()["generated_text"] for r in rs} == {alone(local, v2, "burst", 120)}


def test_killing_a_replica_mid_load_loses_no_adapter(fleet, local):
    """Requests and uploads are under way when one engine replica's actor is killed: every
    upload that was accepted is listed and served afterwards (by the survivor), and the
    survivor keeps serving throughout."""
    ads = {f"k{i}": make(CASES[i % 3], local.shape, seed=60 + i) for i in range(6)}
    assert upload(fleet, "k0", adapter_files(ads["k0"])).status_code == 201
    victim_name = gen(fleet, "k0").headers[REPLICA_HEADER]
    victim = next(a for a in engine_actors() if a["name"].endswith("#" + victim_name))
    stop, results = threading.Event(), []

    def load():
        while not stop.is_set():
            r = gen(fleet, "k0", n=30)
            results.append((time.monotonic(), r.status_code, r.headers.get(REPLICA_HEADER)))

    loaders = [threading.Thread(target=load) for _ in range(3)]
    for t in loaders:
        t.start()
    with cf.ThreadPoolExecutor(2) as pool:
        ups = {n: pool.submit(upload, fleet, n, adapter_files(ads[n])) for n in list(ads)[1:]}
        time.sleep(0.5)
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed = time.monotonic()
        accepted = {n for n, f in ups.items() if f.result().status_code in (200, 201)} | {"k0"}
    time.sleep(4)
    stop.set()
    for t in loaders:
        t.join(120)
    after = [(s, rep) for t, s, rep in results if t > killed + 2.0]  # what was on the victim has failed by then
    assert after and all(s == 200 for s, _ in after), after
    assert victim_name not in {rep for _, rep in after}
    assert any(s == 200 for t, s, _ in results if t > killed)
    listed = {a["id"] for a in httpx.get(f"{fleet}/v1/adapters").json()["data"]}
    assert accepted <= listed and len(accepted) == len(ads)
    for n in sorted(accepted):
        r = gen(fleet, n, "after the kill", 6)
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] != victim_name
        assert r.json()["generated_text"] == alone(local, ads[n], "after the kill", 6)


def test_constrained_decoding_is_refused_by_name_through_the_ingress(fleet):
    r = httpx.post(f"{fleet}/v1/completions", timeout=60, json={
        "model": "tgi", "prompt": "x", "max_tokens": 4, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "Ray" in r.json()["error"]["message"]
