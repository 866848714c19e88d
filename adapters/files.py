"""The adapter file format: `adapter_config.json` + `adapter_model.safetensors`.

Reading validates everything before returning, so a bad file is refused whole: the config is
JSON with a known peft_type and valid fields; the tensors come from safetensors only (never
pickle), are exactly the expected keys with the expected shapes, floating point and finite.
Writing is atomic: temp files in the target's parent, fsync, then one rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.base import Adapter, AdapterError, BaseShape, Capacity
from adapters.registry import get_type, type_for_peft

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


def parse_config(data: bytes) -> tuple[str, object]:
    """Bytes of adapter_config.json -> (kind, validated config)."""
    try:
        d = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise AdapterError(f"{CONFIG_NAME} must be a JSON object")
    if "peft_type" not in d:
        raise AdapterError(f"{CONFIG_NAME} has no peft_type")
    t = type_for_peft(d["peft_type"])
    return t.kind, t.parse_config({k: v for k, v in d.items() if k != "peft_type"})


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a number JSON allows", name, 0)


def parse_tensors(data: bytes) -> dict[str, torch.Tensor]:
    # safetensors: u64 header length, then the JSON header; torch.save: a zip or a raw pickle
    if data[8:9] != b"{" and (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        raise AdapterError(f"{WEIGHTS_NAME} is a pickle/zip file: only safetensors are accepted")
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error type for truncation/garbage
        raise AdapterError(f"{WEIGHTS_NAME} is not a readable safetensors file ({e})") from None


def validate(kind: str, cfg, tensors: dict[str, torch.Tensor], shape: BaseShape) -> Adapter:
    t = get_type(kind)
    t.check_config(cfg, shape)
    expected = t.expected_shapes(cfg, shape)
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing:
        raise AdapterError(f"{WEIGHTS_NAME} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        raise AdapterError(f"{WEIGHTS_NAME} has {len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    for k, want in expected.items():
        v = tensors[k]
        if tuple(v.shape) != tuple(want):
            raise AdapterError(f"tensor {k} has shape {tuple(v.shape)}, the base model needs {tuple(want)}")
        if not v.is_floating_point():
            raise AdapterError(f"tensor {k} has dtype {v.dtype}, expected floating point")
        if not torch.isfinite(v).all():
            raise AdapterError(f"tensor {k} contains NaN or Inf")
    return Adapter(kind, cfg, dict(tensors), shape)


def load_bytes(config: bytes, weights: bytes, shape: BaseShape, cap: Capacity | None = None) -> Adapter:
    """Validate an adapter given as the bytes of its two files (an upload). With `cap`, what
    it demands is checked against a server's capacity before its tensors are read."""
    kind, cfg = parse_config(config)
    if cap is not None:
        t = get_type(kind)
        t.check_config(cfg, shape)
        t.check_capacity(cfg, shape, cap)
    return validate(kind, cfg, parse_tensors(weights), shape)


def load_dir(path: str | os.PathLike, shape: BaseShape, cap: Capacity | None = None) -> Adapter:
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter path {path} is not a directory")
    if not (path / CONFIG_NAME).is_file():
        raise AdapterError(f"{path} has no {CONFIG_NAME}")
    if not (path / WEIGHTS_NAME).is_file():
        pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise AdapterError(f"{path} holds {pickles[0]} (pickle): only {WEIGHTS_NAME} is accepted")
        raise AdapterError(f"{path} has no {WEIGHTS_NAME}")
    return load_bytes((path / CONFIG_NAME).read_bytes(), (path / WEIGHTS_NAME).read_bytes(), shape, cap)


def to_bytes(ad: Adapter) -> tuple[bytes, bytes]:
    t = get_type(ad.kind)
    cfg = {"peft_type": t.peft_type, **t.config_dict(ad.config)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ad.tensors.items()}
    return json.dumps(cfg, indent=2).encode(), st_save(tensors, metadata={"format": "pt"})


def stage_dir(parent: Path, files: dict[str, bytes], prefix: str) -> Path:
    """Write files into a new dot-prefixed temp directory under parent, each fsynced; the
    caller renames it into place (one atomic step) or removes it. The directory is 0755 and
    the files 0644 (mkdtemp's 0700 would hide them from another UID: a sidecar, a container
    user reading a shared store)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        os.chmod(tmp, 0o755)
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def save_dir(ad: Adapter, path: str | os.PathLike) -> Path:
    """Write the adapter directory atomically (a reader sees the old one or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg, weights = to_bytes(ad)
    tmp = stage_dir(path.parent, {CONFIG_NAME: cfg, WEIGHTS_NAME: weights}, f".{path.name}.tmp-")
    try:
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def fsync_dir(p: Path) -> None:
    """Make a rename inside p durable."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
