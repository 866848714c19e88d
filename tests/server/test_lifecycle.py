"""Tenants, back-pressure, restarts and shutdown, against real servers on loopback."""

import concurrent.futures as cf
import json
import threading

import httpx

from tests.adapters.cases import CASES, make
from tests.server.harness import ProcServer, ThreadServer, adapter_files, generate, metrics, upload


def test_tenant_isolation(tiny_dir, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-acme": "acme", "sk-globex": "globex", "sk-ops": {"tenant": "ops", "admin": True}}))
    with ThreadServer(tiny_dir, tmp_path / "store", api_keys=keys) as s:
        shape = s.state.engine.shape
        a, g = make(CASES[0], shape, seed=1), make(CASES[4], shape, seed=2)
        assert upload(s.url, "shared-name", adapter_files(a), key="sk-acme").status_code == 201
        # no key / a wrong key
        assert upload(s.url, "x", adapter_files(a)).status_code == 401
        assert generate(s.url, "hi", key="sk-wrong").status_code == 401
        assert httpx.get(s.url + "/v1/adapters").status_code == 401
        # globex sees nothing of acme's and cannot use, read or delete it
        hdr = {"authorization": "Bearer sk-globex"}
        assert httpx.get(s.url + "/v1/adapters", headers=hdr).json()["data"] == []
        assert generate(s.url, "hi", key="sk-globex", adapter_id="shared-name").status_code == 404
        assert httpx.get(s.url + "/v1/adapters/shared-name", headers=hdr).status_code == 404
        assert httpx.delete(s.url + "/v1/adapters/shared-name", headers=hdr).status_code == 404
        assert "shared-name" not in [m["id"] for m in httpx.get(s.url + "/v1/models", headers=hdr).json()["data"]]
        # globex's own adapter of the same name is a different adapter
        assert upload(s.url, "shared-name", adapter_files(g), key="sk-globex").status_code == 201
        ra = generate(s.url, "hi", key="sk-acme", adapter_id="shared-name", max_new_tokens=8, ignore_eos=True).json()
        rg = generate(s.url, "hi", key="sk-globex", adapter_id="shared-name", max_new_tokens=8, ignore_eos=True).json()
        assert ra["generated_text"] != rg["generated_text"]
        assert [x["type"] for x in httpx.get(s.url + "/v1/adapters", headers=hdr).json()["data"]] == ["qaa"]
        # the admin reaches both through tenant/adapter_id
        adm = {"authorization": "Bearer sk-ops"}
        assert {(x["tenant"], x["id"]) for x in httpx.get(s.url + "/v1/adapters", headers=adm).json()["data"]} == {
            ("acme", "shared-name"), ("globex", "shared-name")}
        r = generate(s.url, "hi", key="sk-ops", adapter_id="acme/shared-name", max_new_tokens=8, ignore_eos=True).json()
        assert r["generated_text"] == ra["generated_text"]


def test_queue_full_gives_429_with_retry_after(tiny_dir, tmp_path):
    with ThreadServer(tiny_dir, tmp_path / "store", max_running=1, max_waiting=2) as s:
        with cf.ThreadPoolExecutor(12) as pool:
            rs = list(pool.map(lambda i: generate(s.url, f"flood {i}", max_new_tokens=40, ignore_eos=True), range(12)))
        codes = [r.status_code for r in rs]
        assert codes.count(200) >= 3 and 429 in codes and set(codes) <= {200, 429}
        busy = next(r for r in rs if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error_type"] == "overloaded"
        # every refusal is counted as an outcome
        assert metrics(s.url)['qaa_requests_total{"adapter_type": "base", "outcome": "rejected"}'] == codes.count(429)
        assert generate(s.url, "after the flood", max_new_tokens=2).status_code == 200


def _cache_counts(url) -> tuple:
    m = metrics(url)
    return tuple(int(m[f'qaa_adapter_cache_{kind}_total{{"tier": "{tier}"}}'])
                 for tier in ("device", "host") for kind in ("hits", "misses"))


def test_restart_keeps_adapters(tiny_dir, tmp_path):
    store = tmp_path / "store"
    with ProcServer(tiny_dir, store) as s:
        shape_ad = make(CASES[3], _shape(tiny_dir), seed=7)
        assert upload(s.url, "persist", adapter_files(shape_ad)).status_code == 201
        before = generate(s.url, "again", adapter_id="persist", max_new_tokens=10, ignore_eos=True).json()
        # (device hits, device misses, host hits, host misses): an upload lands in host memory
        assert _cache_counts(s.url) == (0, 1, 1, 0)
        assert s.terminate() == 0
    with ProcServer(tiny_dir, store) as s:
        listed = httpx.get(s.url + "/v1/adapters").json()["data"]
        assert [(a["id"], a["type"], a["version"], a["residency"]) for a in listed] == [("persist", "prefix", 1, "disk")]
        after = generate(s.url, "again", adapter_id="persist", max_new_tokens=10, ignore_eos=True).json()
        assert after == before
        # one read from disk, counted once however many steps the request waited on it
        assert _cache_counts(s.url) == (0, 1, 0, 1)
        generate(s.url, "again", adapter_id="persist", max_new_tokens=2)
        assert _cache_counts(s.url) == (1, 1, 0, 1)


def test_sigterm_drains_running_requests_and_exits_0(tiny_dir, tmp_path):
    with ProcServer(tiny_dir, tmp_path / "store") as s:
        result = {}

        def long():
            result["r"] = generate(s.url, "drain me", max_new_tokens=150, ignore_eos=True)

        t = threading.Thread(target=long)
        t.start()
        for _ in range(200):
            m = httpx.get(s.url + "/metrics").text
            if "qaa_requests_running 1.0" in m:
                break
        code = s.terminate()
        t.join(timeout=60)
        assert code == 0
        assert result["r"].status_code == 200 and result["r"].json()["details"]["generated_tokens"] == 150


def _shape(model_dir):
    from engine.config import ModelConfig

    return ModelConfig.from_dir(model_dir).shape()


def test_refuses_public_bind_without_keys(tiny_dir, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "server.cli", "--model", str(tiny_dir), "--host", "0.0.0.0",
                        "--adapter-dir", str(tmp_path)], capture_output=True, timeout=120)
    assert r.returncode != 0 and b"loopback" in r.stderr and b"Traceback" not in r.stderr
