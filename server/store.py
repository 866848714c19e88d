"""The adapter store: a directory that survives restarts and crashes, and that several
replicas on several hosts may share (NFS, a Kubernetes ReadWriteMany volume).

Layout: ROOT/<tenant>/<adapter_id>/v<N>/{adapter_config.json, adapter_model.safetensors,
.upload_id}. The current version of an adapter is its highest v<N>. A new version is written
to a dot-prefixed temp directory, fsynced, and renamed into place in one step, so a crash or
a kill leaves either the old version or the new one visible, never half of one. Uploads are
validated in full before any byte is written.

Writers on different hosts: version N belongs to whoever creates the claim file
`.claim-v<N>` with O_CREAT|O_EXCL (atomic on local filesystems and on NFSv3+), and only the
owner renames a staged directory onto v<N>. Claims are never removed while the adapter
exists, so no two writers can both own N, and a writer always claims above every version it
saw: uploads of one adapter are totally ordered by N. After publishing v<N>, versions below
N-1 are removed (the one before stays, so a replica that resolved it a moment ago can still
read it). A delete renames the adapter's directory away in one step, claims included, so a
re-upload of the id starts again at v1: a version is known by its number and its upload id, a
random id written with its files (versions from before upload ids stand in their directory's
inode and mtime), never by its number alone.

Readers racing a writer: a version is removed only once a newer one is published (put prunes
superseded versions; delete renames the whole adapter away), and rmtree takes a directory apart
file by file. So a version that is missing or incomplete while a newer one exists (or the
adapter is gone) is going away, and the reader retries with the newest; one that is incomplete
or invalid while it is still the newest is broken, and the reader gets its validation error.
An adapter whose newest version's config does not parse (corrupt, or written by a newer server
during a rolling upgrade) is left out of list() with one warning per version; get() and read()
give its error, and delete() removes it all the same.

Readers: each replica caches what it saw and re-reads an adapter's directory from disk when
its cached view is older than `refresh_seconds` (and list() rescans the tree on the same
bound), so a replacement or delete through any replica is seen by every other one within
refresh_seconds plus the filesystem's own attribute cache (see README: mount NFS with
`actimeo=1` or less). Leftover temp directories from a crash are removed once they are an
hour old: a fresh one may be another host's upload in progress.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adapters.base import Adapter, AdapterError, BaseShape, Capacity
from adapters.files import CONFIG_NAME, WEIGHTS_NAME, fsync_dir, load_bytes, load_dir, parse_config, stage_dir
from adapters.registry import get_type
from adapters.threads import serial

log = logging.getLogger("qaa_serve.store")

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
    upload: str = ""
    """Which upload published this version number (see _upload_id)."""

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.tenant, self.adapter_id, self.version, self.upload)


STALE_TEMP_SECONDS = 3600.0
"""Age after which a dot-prefixed temp directory is taken as a crash's leftover."""


READ_TRIES = 5
"""Looks a reader takes when the version it resolved goes away under it. Each look takes the
newest version, and put removes a version only two uploads after it, so running out means
uploads outpace reads, not a broken adapter."""


def _versions(adir: Path) -> tuple[list[int], int]:
    """(published versions, highest claimed version) of one adapter directory."""
    published, claimed = [], 0
    try:
        names = os.listdir(adir)
    except FileNotFoundError:
        return [], 0
    for n in names:
        if n.startswith("v") and n[1:].isdigit():
            published.append(int(n[1:]))
        elif n.startswith(".claim-v") and n[8:].isdigit():
            claimed = max(claimed, int(n[8:]))
    return sorted(published), claimed


UPLOAD_ID_NAME = ".upload_id"


def _upload_id(vdir: Path) -> str:
    """What tells this version directory from an earlier one of the same number (a delete
    takes the claims along, so numbers start over). Versions written before upload ids have
    none: their directory's inode and mtime stand in, unique while it exists."""
    try:
        return (vdir / UPLOAD_ID_NAME).read_bytes().decode(errors="replace")
    except FileNotFoundError:
        st = vdir.stat()  # FileNotFoundError: the version itself is gone
        return f"dir-{st.st_ino}-{st.st_mtime_ns}"


def _going_away(adir: Path, version: int, upload: str) -> bool:
    """Whether this upload's v<version> may be vanishing under a reader: it is gone, or a newer
    version is published (only superseded versions are removed), or the number now belongs to
    a re-upload after a delete. False: it is the newest and stays."""
    published, _ = _versions(adir)
    if not published or published[-1] != version:
        return True
    try:
        return _upload_id(adir / f"v{version}") != upload
    except FileNotFoundError:
        return True


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def _outpaced(adapter_id: str) -> AdapterError:
    return AdapterError(f"adapter {adapter_id!r} is being replaced faster than it can be read; try again")


class Store:
    def __init__(self, root: str | os.PathLike, shape: BaseShape, max_bytes: int = 512 * 2**20,
                 capacity: Capacity | None = None, refresh_seconds: float = 1.0):
        """refresh_seconds: how stale this replica's view of an adapter may be before it is
        read again from disk (the staleness bound for changes made by other replicas)."""
        self.root, self.shape, self.max_bytes = Path(root), shape, max_bytes
        self.capacity = capacity or Capacity()
        """What an adapter may demand; checked on upload and again on every read, so an
        adapter stored under looser limits fails its own requests, not the server."""
        self.refresh_seconds = refresh_seconds
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], Entry] = {}
        self._checked: dict[tuple[str, str], float] = {}  # monotonic time of the last disk read
        self._parsed: dict[tuple[str, str, int, str], Entry] = {}  # a published version never changes
        self._listed: dict[str | None, float] = {}  # tenant (None: all) -> monotonic time of its last scan
        self._warned: set[tuple] = set()  # invalid versions already logged: list() meets them on every scan
        self._sweep()

    def _sweep(self) -> None:
        now = time.time()
        for tdir in self.root.iterdir():
            if not tdir.is_dir() or tdir.name.startswith("."):
                continue
            for adir in tdir.iterdir():
                if adir.name.startswith(".deleted-"):  # already out of view
                    shutil.rmtree(adir, ignore_errors=True)
                    continue
                for leftover in adir.glob(".upload-*"):
                    try:
                        if now - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
                            shutil.rmtree(leftover, ignore_errors=True)
                    except FileNotFoundError:
                        pass

    def _entry_from_disk(self, tenant: str, adapter_id: str) -> Entry | None:
        """The newest published version as it is on disk now (None: no such adapter)."""
        adir = self.root / tenant / adapter_id
        for _ in range(READ_TRIES):  # a version can vanish between listing and reading: look again
            versions, _ = _versions(adir)
            if not versions:
                return None
            v = versions[-1]
            d = adir / f"v{v}"
            try:
                upload = _upload_id(d)
                e = self._parsed.get((tenant, adapter_id, v, upload))
                if e is not None:
                    return e
                kind, cfg = parse_config((d / CONFIG_NAME).read_bytes())
                size = sum(f.stat().st_size for f in d.iterdir() if f.name != UPLOAD_ID_NAME)
                created = d.stat().st_mtime
            except FileNotFoundError:
                continue
            except AdapterError as err:
                if _going_away(adir, v, upload):
                    continue
                self._warn_invalid((tenant, adapter_id, v, upload), err)
                raise
            if _going_away(adir, v, upload):  # superseded meanwhile: the size may be of a half-removed v<N>
                continue
            e = Entry(tenant, adapter_id, v, kind, size, created, get_type(kind).virtual_tokens(cfg), upload)
            with self._lock:
                self._parsed[e.key] = e
            return e
        raise _outpaced(adapter_id)

    def _warn_invalid(self, key: tuple, err: AdapterError) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        tenant, adapter_id, version, _ = key
        log.warning("adapter %s/%s v%d is invalid here and left out of listings (delete or re-upload it): %s",
                    tenant, adapter_id, version, err)

    def _refresh(self, tenant: str, adapter_id: str) -> Entry | None:
        e = self._entry_from_disk(tenant, adapter_id)
        with self._lock:
            if e is None:
                self._entries.pop((tenant, adapter_id), None)
            else:
                self._entries[(tenant, adapter_id)] = e
            self._checked[(tenant, adapter_id)] = time.monotonic()
        return e

    # --- reads -------------------------------------------------------------------------
    def list(self, tenant: str | None = None) -> list[Entry]:
        if time.monotonic() - max(self._listed.get(tenant, -1e9), self._listed.get(None, -1e9)) > self.refresh_seconds:
            self._rescan(tenant)
        with self._lock:
            return sorted((e for e in self._entries.values() if tenant is None or e.tenant == tenant),
                          key=lambda e: (e.tenant, e.adapter_id))

    def _rescan(self, tenant: str | None) -> None:
        t0 = time.monotonic()
        tdirs = [self.root / tenant] if tenant is not None else [p for p in self.root.iterdir() if not p.name.startswith(".")]
        seen = set()
        for tdir in tdirs:
            try:
                names = os.listdir(tdir)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for n in names:
                if not n.startswith("."):
                    seen.add((tdir.name, n))
                    try:
                        self._refresh(tdir.name, n)
                    except AdapterError:  # one bad adapter must not take the listing down with it
                        with self._lock:
                            self._entries.pop((tdir.name, n), None)
        with self._lock:
            for key in [k for k in self._entries if (tenant is None or k[0] == tenant) and k not in seen]:
                del self._entries[key]  # deleted through another replica
            self._listed[tenant] = t0

    def get(self, tenant: str, adapter_id: str) -> Entry:
        """The newest version, as seen at most refresh_seconds ago."""
        with self._lock:
            e = self._entries.get((tenant, adapter_id))
            fresh = time.monotonic() - self._checked.get((tenant, adapter_id), float("-inf")) <= self.refresh_seconds
        if not fresh:
            e = self._refresh(tenant, adapter_id)
        if e is None:
            raise NotFound(adapter_id)
        return e

    def read(self, e: Entry) -> Adapter:
        """Load and validate one stored version (host memory, CPU tensors); if a newer upload
        has removed it meanwhile (even halfway), the newest version. An invalid newest version
        raises its AdapterError. Called from a loader thread, so its torch ops run serially
        (see adapters.threads)."""
        with serial():
            for _ in range(READ_TRIES):
                adir = self.root / e.tenant / e.adapter_id
                vdir = adir / f"v{e.version}"
                try:
                    ad = load_dir(vdir, self.shape, self.capacity)
                    if _upload_id(vdir) == e.upload:  # checked after: the files read were this upload's
                        return ad
                except FileNotFoundError:  # a file went between load_dir's checks and its read
                    pass
                except AdapterError:  # missing or incomplete: going away, or broken?
                    if not _going_away(adir, e.version, e.upload):
                        raise  # there, the newest, and invalid: its own error
                newer = self._refresh(e.tenant, e.adapter_id)  # removed by a newer upload or a delete
                if newer is None:
                    raise NotFound(f"adapter {e.adapter_id!r} was deleted")
                e = newer
            raise _outpaced(e.adapter_id)

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
        adir = self.root / tenant / adapter_id
        adir.mkdir(parents=True, exist_ok=True)
        upload = secrets.token_hex(16)
        tmp = None
        try:
            files = {CONFIG_NAME: config, WEIGHTS_NAME: weights, UPLOAD_ID_NAME: upload.encode()}
            tmp = stage_dir(adir, files, ".upload-")
            version = self._publish(adir, tmp)
        except FileNotFoundError:  # a delete renamed adir away after the mkdir
            _remove(tmp)
            raise AdapterError(f"adapter {adapter_id!r} was deleted while this upload was written; upload it again") from None
        except BaseException:
            _remove(tmp)
            raise
        e = Entry(tenant, adapter_id, version, ad.kind, len(config) + len(weights), time.time(),
                  get_type(ad.kind).virtual_tokens(ad.config), upload)
        with self._lock:
            self._parsed[e.key] = e
        for v in _versions(adir)[0]:  # older versions: running requests hold their own copy
            if v < version - 1:
                shutil.rmtree(adir / f"v{v}", ignore_errors=True)
        self._refresh(tenant, adapter_id)  # another host may have published a newer one meanwhile
        return e, ad

    @staticmethod
    def _publish(adir: Path, tmp: Path) -> int:
        """Claim the next free version number and rename the staged directory onto it."""
        published, claimed = _versions(adir)
        version = max(published[-1] if published else 0, claimed) + 1
        while True:
            try:
                os.close(os.open(adir / f".claim-v{version}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:  # another writer got there first: take the next one
                version += 1
                continue
            try:
                os.rename(tmp, adir / f"v{version}")  # a non-empty v<N> is never replaced
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY):  # written by a claim-less writer
                    version += 1
                    continue
                raise
            fsync_dir(adir)
            return version

    def delete(self, tenant: str, adapter_id: str) -> None:
        """Remove an adapter that has a published version, whether or not its content is valid
        here (so a corrupt one, or one a newer server wrote, can be removed)."""
        check_id("tenant", tenant)
        check_id("adapter id", adapter_id)
        adir = self.root / tenant / adapter_id
        trash = adir.parent / f".deleted-{adapter_id}-{time.time_ns()}"
        try:
            if not _versions(adir)[0]:
                raise FileNotFoundError  # nothing published: an upload in progress is not an adapter yet
            os.rename(adir, trash)  # one step: gone from view even if the rmtree is cut short
        except FileNotFoundError:
            self._forget(tenant, adapter_id)
            raise NotFound(adapter_id) from None
        fsync_dir(adir.parent)
        self._forget(tenant, adapter_id)
        shutil.rmtree(trash, ignore_errors=True)

    def _forget(self, tenant: str, adapter_id: str) -> None:
        with self._lock:
            self._entries.pop((tenant, adapter_id), None)
            self._checked[(tenant, adapter_id)] = time.monotonic()
