"""A real uvicorn server on loopback for the tests: in this process (a thread) or a subprocess."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120, proc=None, output=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {output()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def server_args(model, store, port, **kw) -> list[str]:
    args = ["--model", str(model), "--port", str(port), "--adapter-dir", str(store), "--device", "cpu",
            "--max-seq-len", "256"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])  # True: a bare flag
    return args


class ThreadServer:
    """uvicorn.Server on a thread; `.app.state.s` exposes the internals to the test."""

    def __init__(self, model, store, **kw):
        import uvicorn

        from server.cli import build, parse_args

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = build(parse_args(server_args(model, store, self.port, **kw)))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_ready(self.url)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.s


class ProcServer:
    """`python -m server.cli` as a child process. Its stdout and stderr go to a file (a pipe
    nobody reads would stop the server once its logs fill the pipe); `output()` reads it."""

    def __init__(self, model, store, **kw):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "server.cli", *server_args(model, store, self.port, **kw)]

    def __enter__(self):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_ready(self.url, proc=self.proc, output=self.output)
        return self

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def terminate(self, timeout=60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def upload(url: str, adapter_id: str, files: dict[str, bytes], key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    parts = {name: (name, io.BytesIO(data), "application/octet-stream") for name, data in files.items()}
    return httpx.put(f"{url}/v1/adapters/{adapter_id}", files=parts, headers=headers, timeout=60)


def metrics(url: str) -> dict[str, float]:
    """/metrics parsed by prometheus_client: {'name{"label": "value"}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def adapter_files(ad) -> dict[str, bytes]:
    from adapters.files import CONFIG_NAME, WEIGHTS_NAME, to_bytes

    cfg, weights = to_bytes(ad)
    return {CONFIG_NAME: cfg, WEIGHTS_NAME: weights}


def generate(url: str, inputs: str, key: str | None = None, **params) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/generate", json={"inputs": inputs, "parameters": params}, headers=headers, timeout=120)


def sse_events(response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out
