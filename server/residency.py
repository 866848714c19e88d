"""Where adapters live: device slot banks <- host memory (LRU) <- the on-disk store.

Used from the scheduler's thread only, except disk reads, which run on a loader thread so
that a request whose adapter is being read waits in the queue without holding up others.
Load before evict: an adapter leaves the device only to make room for one that is ready to
go in. An adapter that a running request uses is pinned and never evicted. Each stored
version is its own entry, so requests running on an old version finish on it after a
replacement while new requests get the new one. Entries are keyed by Entry.key, which holds
the version's upload id: after a delete through another replica a re-upload starts again at
v1, and this replica is never told, so the number alone would serve the deleted weights.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from adapters.base import Adapter
from engine.adapter_slots import Handle
from server.store import Entry, Store


def slot_name(key: tuple[str, str, int, str]) -> str:
    tenant, adapter_id, version, upload = key
    # the upload id too: loading a name that is there replaces it (engine.adapter_slots)
    return f"{tenant}/{adapter_id}@v{version}" + (f"#{upload}" if upload else "")


class Residency:
    def __init__(self, engine, store: Store, max_device: int, max_host: int, metrics=None):
        self.engine, self.store, self.metrics = engine, store, metrics
        self.max_device, self.max_host = max_device, max_host
        self.device: OrderedDict[tuple, Handle] = OrderedDict()  # LRU order, oldest first
        self.host: OrderedDict[tuple, Adapter] = OrderedDict()
        self.pins: Counter = Counter()
        self.loading: dict[tuple, Future] = {}
        self.failed: dict[tuple, Exception] = {}
        self.fresh: set[tuple] = set()  # read from disk, not yet loaded into the device
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
        self.wake = lambda: None  # the scheduler sets this: a finished read should be picked up
        self.faults = None
        """Tests only: fault(stage, entry) is called before a disk read ('read') and a device
        load ('load') and may raise to stand for a failure there."""

    def acquire(self, entry: Entry) -> Handle | None:
        """A pinned device handle for this stored version, or None while it is not ready
        (being read from disk, or every device slot of its type is pinned).

        Counted once per event, however often a waiting request asks: a device hit per
        handle served from the device; a device miss per load into the device, which is a
        host hit unless the adapter was just read from disk; a host miss per disk read.
        """
        key = entry.key
        h = self.device.get(key)
        if h is not None:
            self.device.move_to_end(key)
            # Host memory is LRU by use, like Serve's multiplexed LRU (server.ray_app): else an
            # adapter hot on the device ages out of host memory and its next device load is a disk read.
            if key in self.host:
                self.host.move_to_end(key)
            self._count("device", hit=True)
            self.pins[key] += 1
            return h
        ad = self.host.get(key)
        if ad is None and (ad := self._poll_read(entry)) is None:
            return None
        if not self._make_room(ad.kind):
            return None
        t0 = time.perf_counter()
        if self.faults is not None:
            self.faults("load", entry)
        h = self.engine.adapters.load(slot_name(key), ad)
        self._observe_load("device", time.perf_counter() - t0)
        self._count("device", hit=False)
        if key in self.fresh:
            self.fresh.discard(key)
        else:
            self._count("host", hit=True)
        self.host.move_to_end(key)
        self.device[key] = h
        self.pins[key] += 1
        return h

    def release(self, h: Handle, key: tuple) -> None:
        self.pins[key] -= 1
        if self.pins[key] <= 0:
            del self.pins[key]

    def put_host(self, key: tuple, ad: Adapter) -> None:
        """An adapter known to be valid (a fresh upload) goes straight into host memory."""
        self.host[key] = ad
        self.host.move_to_end(key)
        self._trim_host()

    def forget(self, tenant: str, adapter_id: str) -> None:
        """Drop every unpinned copy of an adapter (after delete or replace)."""
        for key in [k for k in self.device if k[:2] == (tenant, adapter_id) and not self.pins[k]]:
            self.engine.adapters.unload(slot_name(key))
            del self.device[key]
        for key in [k for k in self.host if k[:2] == (tenant, adapter_id)]:
            del self.host[key]
            self.fresh.discard(key)

    def tier(self, key: tuple) -> str:
        if key in self.device:
            return "device"
        if key in self.host:
            return "host"
        return "loading" if key in self.loading else "disk"

    def take_failure(self, key: tuple) -> Exception | None:
        return self.failed.pop(key, None)

    # --- internals ---------------------------------------------------------------------
    def _poll_read(self, entry: Entry) -> Adapter | None:
        """Start reading an adapter from disk (a host miss), or collect a finished read into
        host memory and return it; None while the read runs or when it failed."""
        key = entry.key
        fut = self.loading.get(key)
        if fut is None:
            self._count("host", hit=False)
            self.loading[key] = fut = self.pool.submit(self._read, entry)
            fut.add_done_callback(lambda _: self.wake())
            return None
        if not fut.done():
            return None
        del self.loading[key]
        try:
            ad, seconds = fut.result()
        except Exception as e:  # the stored file went bad under us
            self.failed[key] = e
            return None
        self._observe_load("host", seconds)
        self.put_host(key, ad)
        self.fresh.add(key)
        return ad

    def _read(self, entry: Entry):
        t0 = time.perf_counter()
        if self.faults is not None:
            self.faults("read", entry)
        ad = self.store.read(entry)
        return ad, time.perf_counter() - t0

    def _make_room(self, kind: str) -> bool:
        slots = self.engine.adapters
        full_kind = slots.full(kind)
        if len(self.device) < self.max_device and not full_kind:
            return True
        for key, h in self.device.items():  # least recently used first
            if self.pins[key]:
                continue
            if full_kind and h.bank != slots.bank_of(kind) and len(self.device) < self.max_device:
                continue
            slots.unload(slot_name(key))
            del self.device[key]
            return True
        return False

    def _trim_host(self) -> None:
        while len(self.host) > self.max_host:
            key = next(iter(self.host))
            self.host.pop(key)
            self.fresh.discard(key)

    def _count(self, tier: str, hit: bool) -> None:
        if self.metrics is not None:
            (self.metrics.adapter_hits if hit else self.metrics.adapter_misses).labels(tier=tier).inc()

    def _observe_load(self, tier: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.adapter_load_seconds.labels(tier=tier).observe(seconds)
