"""One adapter store shared by several replicas: two real `qaa-serve` processes (no Ray) on one
directory, and the store's own claim protocol under concurrent writers."""

import concurrent.futures as cf
import os
import threading
import time

import httpx
import pytest

from engine.engine import Engine
from engine.sampling import SamplingParams
from server.store import Store
from tests.adapters.cases import CASES, make
from tests.server.harness import ProcServer, adapter_files, generate, upload

N_EACH = 6


def expected_text(local, ad, prompt, n):
    local.load_adapter("x", ad)
    out = local.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True), adapters=["x"])[0].text
    local.adapters.unload("x")
    return out


def test_two_processes_concurrent_uploads_of_one_id(tiny_dir, tmp_path):
    """Uploads of the same id through both processes at once: every upload gets its own
    version (totally ordered, none lost), the newest is the one both serve, and readers on
    both never see a half-written version."""
    store = tmp_path / "shared"
    local = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=256, max_adapters=1)
    ads = [make(CASES[0], local.shape, seed=1000 + i) for i in range(2 * N_EACH)]
    with ProcServer(tiny_dir, store) as a, ProcServer(tiny_dir, store) as b:
        assert upload(a.url, "same", adapter_files(ads[0])).status_code == 201
        stop, seen, bad = threading.Event(), {a.url: [], b.url: []}, []

        def reader(url):  # keeps using the adapter while it is replaced
            while not stop.is_set():
                r = generate(url, "ab", adapter_id="same", max_new_tokens=2, ignore_eos=True)
                if r.status_code != 200:
                    bad.append(r.text)
                seen[url].append(httpx.get(f"{url}/v1/adapters/same").json()["version"])

        readers = [threading.Thread(target=reader, args=(u,)) for u in (a.url, b.url)]
        for t in readers:
            t.start()
        with cf.ThreadPoolExecutor(4) as pool:
            futs = {pool.submit(upload, (a.url, b.url)[i % 2], "same", adapter_files(ads[i])): i
                    for i in range(1, 2 * N_EACH)}
            got = {futs[f]: f.result() for f in cf.as_completed(futs)}
        stop.set()
        for t in readers:
            t.join(60)
        assert all(r.status_code == 200 for r in got.values()), [r.text for r in got.values()]
        version_of = {i: r.json()["version"] for i, r in got.items()} | {0: 1}
        assert sorted(version_of.values()) == list(range(1, 2 * N_EACH + 1))  # each its own N, no gaps
        assert not bad, bad[:3]
        for url in seen:  # each replica's view only moves forward
            assert seen[url] == sorted(seen[url]) and seen[url]
        newest = max(version_of, key=version_of.get)
        want = expected_text(local, ads[newest], "shared store", 12)
        time.sleep(1.05)  # the staleness bound: Store.refresh_seconds, 1 s by default
        for s in (a, b):
            assert httpx.get(f"{s.url}/v1/adapters/same").json()["version"] == 2 * N_EACH
            r = generate(s.url, "shared store", adapter_id="same", max_new_tokens=12, ignore_eos=True)
            assert r.json()["generated_text"] == want
    adir = store / "default" / "same"
    names = sorted(os.listdir(adir))
    assert [n for n in names if n.startswith("v")] == [f"v{2 * N_EACH - 1}", f"v{2 * N_EACH}"]
    assert not [n for n in names if n.startswith(".upload-")]


def test_delete_and_replace_seen_by_another_replica_within_the_bound(tiny_dir, tmp_path):
    shape = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=64, max_adapters=1).shape
    one, two = Store(tmp_path, shape, refresh_seconds=0.2), Store(tmp_path, shape, refresh_seconds=0.2)
    files = adapter_files(make(CASES[2], shape, seed=3))
    cfg, w = files.values()
    e1, _ = one.put("t", "a", cfg, w)
    assert two.get("t", "a").version == e1.version == 1  # never seen before: read from disk at once
    e2, _ = one.put("t", "a", cfg, w)
    time.sleep(0.25)
    assert two.get("t", "a").version == e2.version == 2
    assert [e.adapter_id for e in two.list("t")] == ["a"]
    one.delete("t", "a")
    time.sleep(0.25)
    with pytest.raises(KeyError):
        two.get("t", "a")
    assert two.list() == []
    # a reader holding an entry of a version that was removed meanwhile gets the newest one
    e3, _ = one.put("t", "a", cfg, w)
    one.put("t", "a", cfg, w)
    one.put("t", "a", cfg, w)
    assert not (tmp_path / "t" / "a" / f"v{e3.version}").exists()
    assert two.read(e3).kind == "sora"


def test_many_writers_one_id_threads(tiny_dir, tmp_path):
    """Eight threads with a Store each (as eight hosts would have) write one id at once."""
    shape = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=64, max_adapters=1).shape
    cfg, w = adapter_files(make(CASES[0], shape, seed=4)).values()
    stores = [Store(tmp_path, shape) for _ in range(8)]
    barrier = threading.Barrier(8)

    def write(s):
        barrier.wait()
        return [s.put("t", "x", cfg, w)[0].version for _ in range(3)]

    with cf.ThreadPoolExecutor(8) as pool:
        versions = [v for vs in pool.map(write, stores) for v in vs]
    assert sorted(versions) == list(range(1, 25))
    assert Store(tmp_path, shape).get("t", "x").version == 24
