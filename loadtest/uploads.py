"""Put the load test's adapters on the server before a run and take them away after.

Synthetic adapter i is `{prefix}-s{seed}-{i:04d}-{type}`: the same id always means the same
bytes (weights seeded by (seed, i)), so ids already on the server are reused, not uploaded
again, and only what this run uploaded is deleted afterwards.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest import client as http
from loadtest.synthetic import adapter_files
from loadtest.workload import assign_types

PEFT_TYPE_KIND = {"LORA": "lora", "SORA": "sora", "PREFIX_TUNING": "prefix", "QAA": "qaa"}


@dataclass
class AdapterSet:
    ids: list[str] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)
    """adapter id -> type."""
    uploaded: list[str] = field(default_factory=list)
    """What this run uploaded (and so deletes at the end)."""


def _from_dir(root: Path, n: int, prefix: str) -> list[tuple[str, str, dict[str, bytes]]]:
    dirs = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file()) if root.is_dir() else []
    if not dirs:
        raise ValueError(f"{root} holds no adapter directories (each needs adapter_config.json and "
                         "adapter_model.safetensors)")
    out = []
    for i in range(n):  # fewer directories than adapters: reuse them under new ids
        d = dirs[i % len(dirs)]
        files = {name: (d / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
        kind = PEFT_TYPE_KIND.get(json.loads(files["adapter_config.json"]).get("peft_type"), "unknown")
        out.append((f"{prefix}-d{i:04d}", kind, files))
    return out


def prepare(aset: AdapterSet, url: str, n: int, types: dict[str, float], info: dict, seed: int,
            api_key: str | None, prefix: str = "lt", from_dir: Path | None = None, workers: int = 4,
            show_progress: bool = True) -> AdapterSet:
    """Fill `aset` with n adapters on the server (uploading what is missing). `aset` is the
    caller's so that what was uploaded before a failure is still known for cleanup."""
    if n == 0:
        return aset
    existing = http.list_adapters(url, api_key)
    if from_dir is not None:
        plan = [(aid, kind, lambda f=files: f) for aid, kind, files in _from_dir(from_dir, n, prefix)]
    else:
        plan = [(f"{prefix}-s{seed}-{i:04d}-{kind}", kind,
                 lambda kind=kind, i=i: adapter_files(kind, info["model_config"], seed * 1_000_003 + i, info["model_id"]))
                for i, kind in enumerate(assign_types(types, n))]
    todo = []
    for aid, kind, make in plan:
        aset.ids.append(aid)
        aset.types[aid] = kind
        if from_dir is not None or aid not in existing:
            todo.append((aid, make))
    done = 0
    with httpx.Client() as c, cf.ThreadPoolExecutor(workers) as pool:
        futs = {pool.submit(http.upload, c, url, aid, make(), api_key): aid for aid, make in todo}
        try:
            for f in cf.as_completed(futs):
                f.result()
                aset.uploaded.append(futs[f])
                done += 1
                if show_progress and (done % 25 == 0 or done == len(todo)):
                    last = done == len(todo)
                    if sys.stderr.isatty():  # in place on a terminal, a line now and then in a log
                        print(f"\r[upload] {done}/{len(todo)} adapters", end="\n" if last else "", file=sys.stderr, flush=True)
                    elif last or done % 250 == 0:
                        print(f"[upload] {done}/{len(todo)} adapters", file=sys.stderr, flush=True)
        except BaseException:
            for f in futs:
                f.cancel()
            for f in futs:  # what did get through is still this run's to clean up
                if f.done() and not f.cancelled() and f.exception() is None and futs[f] not in aset.uploaded:
                    aset.uploaded.append(futs[f])
            raise
    return aset


def cleanup(url: str, aset: AdapterSet, api_key: str | None) -> None:
    with httpx.Client() as c:
        for aid in aset.uploaded:
            try:
                http.delete(c, url, aid, api_key)
            except httpx.HTTPError:
                pass
