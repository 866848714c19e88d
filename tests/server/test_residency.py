"""Residency's tiers in isolation: fake device slots, and a fake store that counts disk reads or
real stores sharing one directory."""

from types import SimpleNamespace

import torch
from safetensors.torch import load as st_load

from adapters.files import WEIGHTS_NAME
from engine.engine import Engine
from server.residency import Residency
from server.store import Entry, Store
from tests.adapters.cases import CASES, make
from tests.server.harness import adapter_files


class FakeSlots:
    """One bank ("lora"), as many slots as Residency's max_device allows."""

    def full(self, kind):
        return False

    def bank_of(self, kind):
        return kind

    def load(self, name, ad):
        return SimpleNamespace(name=name, bank=ad.kind)

    def unload(self, name):
        pass


class CountingStore:
    def __init__(self):
        self.reads = []

    def read(self, e: Entry):
        self.reads.append(e.adapter_id)
        return SimpleNamespace(kind="lora")


def entry(name: str) -> Entry:
    return Entry("t", name, 1, "lora", 0, 0.0)


def use(res: Residency, e: Entry | str):
    """One request's acquire (waiting out a disk read, as the scheduler does) and release."""
    e = entry(e) if isinstance(e, str) else e
    h = res.acquire(e)
    if h is None:
        res.loading[e.key].result()
        h = res.acquire(e)
    assert h is not None
    res.release(h, e.key)
    return h


def test_host_memory_is_lru_by_use_so_an_adapter_hot_on_the_device_is_not_read_again():
    store = CountingStore()
    res = Residency(SimpleNamespace(adapters=FakeSlots()), store, max_device=2, max_host=3)
    for name in ["A", "B", "A", "A", "A", "C"]:  # A's later uses are device hits
        use(res, name)
    # D's read makes host memory drop its least recently *used* adapter (B), not A, which
    # was loaded first but used since; the device then drops A for D, keeping its host copy
    use(res, "D")
    assert set(res.host) == {entry(n).key for n in "ACD"}
    use(res, "A")  # back to the device from host memory, not from disk
    assert store.reads == ["A", "B", "C", "D"]


class RecordingSlots(FakeSlots):
    def load(self, name, ad):
        return SimpleNamespace(name=name, bank=ad.kind, adapter=ad)


def test_a_reupload_after_a_delete_through_another_replica_is_not_served_from_memory(tiny_dir, tmp_path):
    """Replica two holds A in host memory and a device slot; A is deleted and B uploaded as the
    same id through replica one (v1 again, and replica two's residency is never told). Past the
    staleness bound (0 here) replica two's requests get B's weights."""
    shape = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=64, max_adapters=1).shape
    a, b = [make(CASES[i], shape, seed=80 + i) for i in (0, 2)]
    one, two = Store(tmp_path, shape, refresh_seconds=0), Store(tmp_path, shape, refresh_seconds=0)
    res = Residency(SimpleNamespace(adapters=RecordingSlots()), two, max_device=2, max_host=2)
    one.put("t", "x", *adapter_files(a).values())
    assert use(res, two.get("t", "x")).adapter.kind == a.kind
    one.delete("t", "x")
    one.put("t", "x", *adapter_files(b).values())
    got = use(res, two.get("t", "x")).adapter
    want = st_load(adapter_files(b)[WEIGHTS_NAME])
    assert got.kind == b.kind and all(torch.equal(got.tensors[k], t) for k, t in want.items())
