"""Push an adapter directory to a running qaa-serve (PUT /v1/adapters/{id}), stdlib only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from adapters.files import CONFIG_NAME, WEIGHTS_NAME
from engine.errors import QaaError


class UploadError(QaaError):
    pass


def upload_adapter(url: str, adapter_id: str, adapter_dir: str | Path, api_key: str | None = None, timeout: float = 120) -> dict:
    adapter_dir = Path(adapter_dir)
    boundary = uuid.uuid4().hex
    body = b""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + (adapter_dir / name).read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{url.rstrip('/')}/v1/adapters/{adapter_id}", data=body, headers=headers, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", "")
        except Exception:
            msg = ""
        raise UploadError(f"upload to {url} failed: HTTP {e.code} {msg}".strip()) from None
    except (urllib.error.URLError, OSError) as e:
        raise UploadError(f"upload to {url} failed: {getattr(e, 'reason', e)}") from None
