"""One adapter store shared by several replicas: two real `qaa-serve` processes (no Ray) on one
directory, and the store's own claim protocol under concurrent writers."""

import concurrent.futures as cf
import json
import os
import threading
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest
import torch
from safetensors.torch import load as st_load

import server.store
from adapters.base import AdapterError
from adapters.files import CONFIG_NAME, WEIGHTS_NAME
from engine.engine import Engine
from engine.sampling import SamplingParams
from server.store import NotFound, Store
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


# --- a reader racing another replica's writer, made deterministic ---------------------------
# Each case stops a reader at one point of Store.read/Store.get and lets another replica (a
# second Store on the same directory) replace or delete the adapter there, the way its put and
# delete really do it. The reader must end with a complete, validated version (the one it
# resolved or a newer one) or NotFound for a delete, never a validation error for a valid adapter.

@pytest.fixture(scope="module")
def shape(tiny_dir):
    return Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=64, max_adapters=1).shape


@pytest.fixture(scope="module")
def uploads(shape):
    """Three different adapters, so a test can tell which version a read returned."""
    return [tuple(adapter_files(make(CASES[0], shape, seed=50 + i)).values()) for i in range(3)]


def is_upload(ad, files):
    return all(torch.equal(ad.tensors[k], t) for k, t in st_load(files[1]).items())


def replace_twice(other, uploads):
    """Two newer versions; publishing v3 removes v1 (versions below N-1 go)."""
    other.put("t", "a", *uploads[1])
    other.put("t", "a", *uploads[2])


def replace_twice_cut_halfway(left):
    """As replace_twice, with v1's removal seen halfway: rmtree has unlinked one of its files
    and `left` is still there (another host's rmtree in progress, or one cut short)."""
    def act(other, uploads):
        gone = WEIGHTS_NAME if left == CONFIG_NAME else CONFIG_NAME
        with mock.patch.object(server.store.shutil, "rmtree", lambda p, **kw: (Path(p) / gone).unlink()):
            replace_twice(other, uploads)
    return act


def delete(other, uploads):
    other.delete("t", "a")


def run_once_before(monkeypatch, owner, name, act, when=lambda *a: True):
    """Wrap owner.name so that act() runs once, just before the first call that `when` accepts."""
    real, fired = getattr(owner, name), []

    def hooked(*a, **kw):
        if not fired and when(*a):
            fired.append(a)
            act()
        return real(*a, **kw)
    monkeypatch.setattr(owner, name, hooked)


def before_load(monkeypatch, act):
    """After read resolved its version, before load_dir looks at it."""
    run_once_before(monkeypatch, server.store, "load_dir", act)


def before_weights_read(monkeypatch, act):
    """After load_dir checked that both files exist, before it reads the weights."""
    run_once_before(monkeypatch, Path, "read_bytes", act, when=lambda path: path.name == WEIGHTS_NAME)


READ_RACES = [  # (what the other replica does, when, which upload the reader gets or the error)
    ("replaced", replace_twice, before_load, 2),
    ("replaced, v1 half removed (config left)", replace_twice_cut_halfway(CONFIG_NAME), before_load, 2),
    ("replaced, v1 half removed (weights left)", replace_twice_cut_halfway(WEIGHTS_NAME), before_load, 2),
    ("replaced while load_dir reads", replace_twice, before_weights_read, 2),
    ("deleted", delete, before_load, NotFound),
    ("deleted while load_dir reads", delete, before_weights_read, NotFound),
]


@pytest.mark.parametrize("act,when,want", [c[1:] for c in READ_RACES], ids=[c[0] for c in READ_RACES])
def test_read_racing_another_replicas_writer(shape, uploads, tmp_path, monkeypatch, act, when, want):
    reader, other = Store(tmp_path, shape), Store(tmp_path, shape)
    e1, _ = reader.put("t", "a", *uploads[0])
    when(monkeypatch, lambda: act(other, uploads))
    if want is NotFound:
        with pytest.raises(NotFound, match="deleted"):
            reader.read(e1)
    else:
        assert is_upload(reader.read(e1), uploads[want])


@pytest.mark.parametrize("left", [CONFIG_NAME, WEIGHTS_NAME])
def test_get_never_takes_a_half_removed_version(shape, uploads, tmp_path, monkeypatch, left):
    """get() parses the newest version it listed; if that one is being removed meanwhile, its
    size (summed from the files still there) is wrong: it must take the newer version instead."""
    reader, other = Store(tmp_path, shape), Store(tmp_path, shape)
    other.put("t", "a", *uploads[0])
    # v1's config has been read; its files are listed next
    run_once_before(monkeypatch, server.store, "parse_config", lambda: replace_twice_cut_halfway(left)(other, uploads))
    e = reader.get("t", "a")
    assert (e.version, e.size_bytes) == (3, sum(map(len, uploads[2])))


@pytest.mark.parametrize("damage,error", [
    (lambda d: (d / WEIGHTS_NAME).unlink(), f"has no {WEIGHTS_NAME}"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\0" * 16), "not a readable safetensors"),
], ids=["weights missing", "weights garbage"])
def test_read_of_an_invalid_current_version_is_its_error(shape, uploads, tmp_path, damage, error):
    """Nothing is replacing it: the newest version is there and invalid, so read reports that
    at once rather than retrying as if it were going away."""
    store = Store(tmp_path, shape)
    e, _ = store.put("t", "a", *uploads[0])
    damage(tmp_path / "t" / "a" / "v1")
    with pytest.raises(AdapterError, match=error):
        store.read(e)


def test_read_outpaced_by_uploads_gives_up_naming_the_adapter(shape, uploads, tmp_path, monkeypatch):
    """Every version read is removed before it is loaded: a bounded number of tries, then an
    error that names the adapter."""
    reader, other = Store(tmp_path, shape), Store(tmp_path, shape)
    e, _ = reader.put("t", "a", *uploads[0])
    real, calls = server.store.load_dir, []

    def hooked(path, *a, **kw):
        calls.append(path)
        replace_twice(other, uploads)
        return real(path, *a, **kw)
    monkeypatch.setattr(server.store, "load_dir", hooked)
    with pytest.raises(AdapterError, match="'a' is being replaced faster than it can be read"):
        reader.read(e)
    assert len(calls) == server.store.READ_TRIES


def test_upload_racing_a_delete_is_refused_cleanly(shape, uploads, tmp_path, monkeypatch):
    """A delete through another replica renames the adapter's directory away after the upload
    made it and before it staged its files there: a clear refusal, not a 500, and no leftovers."""
    writer, other = Store(tmp_path, shape), Store(tmp_path, shape)
    writer.put("t", "a", *uploads[0])
    run_once_before(monkeypatch, server.store, "stage_dir", lambda: other.delete("t", "a"))
    with pytest.raises(AdapterError, match="'a' was deleted while this upload was written"):
        writer.put("t", "a", *uploads[1])
    assert os.listdir(tmp_path / "t") == []


# --- a delete takes the claims along, so a re-upload of the id starts again at v1 ----------

@pytest.fixture(scope="module")
def a_then_b(shape):
    """Two adapters of different types and sizes, uploaded one after the other as one id."""
    return [tuple(adapter_files(make(CASES[i], shape, seed=70 + i)).values()) for i in (0, 2)]


def test_reupload_after_a_delete_is_never_taken_for_the_deleted_upload(shape, a_then_b, tmp_path):
    """Store two parsed A's v1; A is deleted and B uploaded as the same id (v1 again) through
    store one. Past the staleness bound (0 here) store two serves B: its kind, size and weights."""
    a, b = a_then_b
    one, two = Store(tmp_path, shape, refresh_seconds=0), Store(tmp_path, shape, refresh_seconds=0)
    one.put("t", "x", *a)
    old = two.get("t", "x")
    assert [e.kind for e in two.list("t")] == [old.kind]
    one.delete("t", "x")
    new, _ = one.put("t", "x", *b)
    assert new.version == old.version == 1 and new.kind != old.kind
    e = two.get("t", "x")
    assert (e.kind, e.size_bytes, e.key) == (new.kind, sum(map(len, b)), new.key) != (old.kind, old.size_bytes, old.key)
    assert [x.kind for x in two.list("t")] == [new.kind]
    assert is_upload(two.read(e), b)
    assert is_upload(two.read(old), b)  # A's entry, held from before: A is gone, B is the newest


def test_versions_written_without_an_upload_id_still_load(shape, a_then_b, tmp_path):
    """A store written before upload ids existed: its versions load, and are still told apart
    from a re-upload after a delete."""
    a, b = a_then_b
    vdir = tmp_path / "t" / "x" / "v1"
    vdir.mkdir(parents=True)
    (vdir / CONFIG_NAME).write_bytes(a[0])
    (vdir / WEIGHTS_NAME).write_bytes(a[1])
    (tmp_path / "t" / "x" / ".claim-v1").touch()
    reader = Store(tmp_path, shape, refresh_seconds=0)
    old = reader.get("t", "x")
    assert (old.version, old.size_bytes) == (1, sum(map(len, a))) and is_upload(reader.read(old), a)
    reader.delete("t", "x")
    new, _ = Store(tmp_path, shape).put("t", "x", *b)
    e = reader.get("t", "x")
    assert (e.kind, e.key) == (new.kind, new.key) and is_upload(reader.read(e), b)


# --- one adapter whose current config does not parse (a newer server's type, corruption) -----

def retype(peft_type):
    def damage(cfg: bytes) -> bytes:
        return json.dumps({**json.loads(cfg), "peft_type": peft_type}).encode()
    return damage


BAD_CONFIGS = [  # (what is wrong, how the config is damaged, the error get gives)
    ("a newer server's type", retype("FROM_THE_FUTURE"), "FROM_THE_FUTURE"),
    ("truncated", lambda cfg: cfg[: len(cfg) // 2], "not valid JSON"),
    ("not an object", lambda cfg: b"[]", "must be a JSON object"),
]


def break_config(root: Path, adapter_id: str, version: int, damage) -> None:
    path = root / "t" / adapter_id / f"v{version}" / CONFIG_NAME
    path.write_bytes(damage(path.read_bytes()))


@pytest.mark.parametrize("damage,error", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_listing_leaves_out_an_adapter_with_an_invalid_config(shape, uploads, tmp_path, caplog, damage, error):
    writer, reader = Store(tmp_path, shape), Store(tmp_path, shape, refresh_seconds=0)
    writer.put("t", "good", *uploads[0])
    held, _ = writer.put("t", "bad", *uploads[1])
    break_config(tmp_path, "bad", 1, damage)
    for _ in range(3):
        assert [e.adapter_id for e in reader.list("t")] == ["good"]
        assert [e.adapter_id for e in reader.list()] == ["good"]
    with pytest.raises(AdapterError, match=error):
        reader.get("t", "bad")
    with pytest.raises(AdapterError, match=error):
        reader.read(held)
    warned = [r for r in caplog.records if "t/bad" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"  # once for this version, not per call
    writer.put("t", "bad", *uploads[2])  # fixed by a new upload: listed again
    assert [e.adapter_id for e in reader.list("t")] == ["bad", "good"]
    writer.put("t", "bad", *uploads[0])
    break_config(tmp_path, "bad", 3, damage)  # a new broken version is a new warning
    assert [e.adapter_id for e in reader.list("t")] == ["good"]
    assert len([r for r in caplog.records if "t/bad" in r.getMessage()]) == 2


@pytest.mark.parametrize("damage", [c[1] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_an_adapter_with_an_invalid_config_can_be_deleted(shape, uploads, tmp_path, damage):
    writer, other = Store(tmp_path, shape), Store(tmp_path, shape, refresh_seconds=0)
    writer.put("t", "bad", *uploads[0])
    break_config(tmp_path, "bad", 1, damage)
    other.delete("t", "bad")
    assert os.listdir(tmp_path / "t") == []
    with pytest.raises(NotFound):
        other.get("t", "bad")
    with pytest.raises(NotFound):
        other.delete("t", "bad")
