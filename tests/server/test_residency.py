"""Residency's tiers in isolation: fake device slots and a fake store that counts disk reads."""

from types import SimpleNamespace

from server.residency import Residency
from server.store import Entry


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


def use(res: Residency, name: str) -> None:
    """One request's acquire (waiting out a disk read, as the scheduler does) and release."""
    e = entry(name)
    h = res.acquire(e)
    if h is None:
        res.loading[e.key].result()
        h = res.acquire(e)
    assert h is not None
    res.release(h, e.key)


def test_host_memory_is_lru_by_use_so_an_adapter_hot_on_the_device_is_not_read_again():
    store = CountingStore()
    res = Residency(SimpleNamespace(adapters=FakeSlots()), store, max_device=2, max_host=3)
    for name in ["A", "B", "A", "A", "A", "C"]:  # A's later uses are device hits
        use(res, name)
    # D's read makes host memory drop its least recently *used* adapter (B), not A, which
    # was loaded first but used since; the device then drops A for D, keeping its host copy
    use(res, "D")
    assert set(res.host) == {("t", n, 1) for n in "ACD"}
    use(res, "A")  # back to the device from host memory, not from disk
    assert store.reads == ["A", "B", "C", "D"]
