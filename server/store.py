"""The adapter store: a directory that survives restarts and crashes.

Layout: ROOT/<tenant>/<adapter_id>/v<N>/{adapter_config.json, adapter_model.safetensors}.
The current version of an adapter is its highest complete v<N>. A new version is written to
a dot-prefixed temp directory, fsynced, and renamed into place in one step, so a crash or a
kill leaves either the old version or the new one visible, never half of one; leftover temp
directories are ignored and removed at start. Uploads are validated in full before any byte
is written.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adapters.base import Adapter, AdapterError, BaseShape, Capacity
from adapters.files import CONFIG_NAME, WEIGHTS_NAME, fsync_dir, load_bytes, load_dir, parse_config, stage_dir
from adapters.registry import get_type
from adapters.threads import serial

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class NotFound(KeyError):
    pass


def check_id(kind: str, value: str) -> str:
    """Adapter ids and tenant names: 1-64 of [A-Za-z0-9._-], starting alphanumeric."""
    if not isinstance(value, str) or not ID_RE.match(value) or ".." in value:
        raise AdapterError(f"{kind} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


@dataclass(frozen=True)
class Entry:
    tenant: str
    adapter_id: str
    version: int
    kind: str
    size_bytes: int
    created: float
    virtual_tokens: int = 0
    """Cache positions a prefix adapter takes before the prompt."""

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.tenant, self.adapter_id, self.version)


class Store:
    def __init__(self, root: str | os.PathLike, shape: BaseShape, max_bytes: int = 512 * 2**20,
                 capacity: Capacity | None = None):
        self.root, self.shape, self.max_bytes = Path(root), shape, max_bytes
        self.capacity = capacity or Capacity()
        """What an adapter may demand; checked on upload and again on every read, so an
        adapter stored under looser limits fails its own requests, not the server."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], Entry] = {}
        self._scan()

    def _scan(self) -> None:
        for tdir in self.root.iterdir():
            if not tdir.is_dir() or tdir.name.startswith("."):
                continue
            for adir in tdir.iterdir():
                if adir.name.startswith("."):
                    shutil.rmtree(adir, ignore_errors=True)  # a write or delete cut short
                    continue
                for leftover in adir.glob(".*"):
                    shutil.rmtree(leftover, ignore_errors=True)
                e = self._entry_from_disk(tdir.name, adir.name)
                if e is not None:
                    self._entries[(e.tenant, e.adapter_id)] = e

    def _entry_from_disk(self, tenant: str, adapter_id: str) -> Entry | None:
        versions = sorted(int(p.name[1:]) for p in (self.root / tenant / adapter_id).glob("v*") if p.name[1:].isdigit())
        if not versions:
            return None
        v = versions[-1]
        d = self.root / tenant / adapter_id / f"v{v}"
        kind, cfg = parse_config((d / CONFIG_NAME).read_bytes())
        size = sum(f.stat().st_size for f in d.iterdir())
        return Entry(tenant, adapter_id, v, kind, size, d.stat().st_mtime, get_type(kind).virtual_tokens(cfg))

    # --- reads -------------------------------------------------------------------------
    def list(self, tenant: str | None = None) -> list[Entry]:
        with self._lock:
            return sorted((e for e in self._entries.values() if tenant is None or e.tenant == tenant),
                          key=lambda e: (e.tenant, e.adapter_id))

    def get(self, tenant: str, adapter_id: str) -> Entry:
        with self._lock:
            e = self._entries.get((tenant, adapter_id))
        if e is None:
            raise NotFound(adapter_id)
        return e

    def read(self, e: Entry) -> Adapter:
        """Load and validate one stored version (host memory, CPU tensors). Called from a
        loader thread, so its torch ops run serially (see adapters.threads)."""
        with serial():
            return load_dir(self.root / e.tenant / e.adapter_id / f"v{e.version}", self.shape, self.capacity)

    # --- writes ------------------------------------------------------------------------
    def put(self, tenant: str, adapter_id: str, config: bytes, weights: bytes) -> tuple[Entry, Adapter]:
        """Validate an upload fully, then publish it as the adapter's next version. Called from
        web worker threads, so validation runs serially (see adapters.threads)."""
        check_id("tenant", tenant)
        check_id("adapter id", adapter_id)
        if len(config) + len(weights) > self.max_bytes:
            raise AdapterError(f"upload is {len(config) + len(weights)} bytes; the limit is {self.max_bytes}")
        with serial():
            ad = load_bytes(config, weights, self.shape, self.capacity)  # raises before anything touches the disk
        with self._lock:
            adir = self.root / tenant / adapter_id
            adir.mkdir(parents=True, exist_ok=True)
            old = self._entries.get((tenant, adapter_id))
            version = (old.version if old else 0) + 1
            while (adir / f"v{version}").exists():
                version += 1
            tmp = stage_dir(adir, {CONFIG_NAME: config, WEIGHTS_NAME: weights}, ".upload-")
            try:
                os.rename(tmp, adir / f"v{version}")
                fsync_dir(adir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            e = Entry(tenant, adapter_id, version, ad.kind, len(config) + len(weights), time.time(),
                      get_type(ad.kind).virtual_tokens(ad.config))
            self._entries[(tenant, adapter_id)] = e
            for p in adir.glob("v*"):  # older versions: running requests hold their own copy
                if p.name != f"v{version}":
                    shutil.rmtree(p, ignore_errors=True)
        return e, ad

    def delete(self, tenant: str, adapter_id: str) -> Entry:
        with self._lock:
            e = self._entries.pop((tenant, adapter_id), None)
            if e is None:
                raise NotFound(adapter_id)
            adir = self.root / tenant / adapter_id
            trash = adir.parent / f".deleted-{adapter_id}-{time.time_ns()}"
            os.rename(adir, trash)  # one step: gone from view even if the rmtree is cut short
            fsync_dir(adir.parent)
        shutil.rmtree(trash, ignore_errors=True)
        return e

