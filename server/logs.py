"""Logs for operators: the standard library's logging, to stderr, as text or one JSON object
per line (`--log-format`), uvicorn's own lines included.

Besides uvicorn's lines there are three kinds, each a message plus fields:
- `startup`: what runs where and with which limits, once, before the port accepts;
- `request`: one per finished request (ids, adapter, token counts, timings, outcome);
- `stats`: every few seconds while the server is busy (vLLM's periodic line): running and
  waiting requests, tokens per second in and out, KV use, adapter loads.
No line ever carries a prompt or generated text: the request line holds counts only.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from pathlib import Path

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

log = logging.getLogger("qaa_serve.server")
request_log = logging.getLogger("qaa_serve.request")
stats_log = logging.getLogger("qaa_serve.stats")


class TextFormatter(logging.Formatter):
    """`2026-01-01T12:00:00.123Z INFO qaa_serve.request request id=3 tenant=acme ...`"""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        parts = [_iso(record.created), record.levelname, record.name, record.getMessage()]
        parts += [f"{k}={_text(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _iso(record.created), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _text(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


def setup(level: str = "info", fmt: str = "text", stream=None) -> None:
    """One handler on the root logger; uvicorn's loggers hand their records to it (uvicorn is
    started with log_config=None, so it adds no handlers of its own)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.captureWarnings(True)  # e.g. the CPU kernels' "unavailable" warning becomes a line


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields})


# --- the startup summary ------------------------------------------------------------------

def kernel_state(device, dtype) -> str:
    """Whether the adapters' fused CPU kernels serve here, and if so whether this start
    compiled them or loaded them from the cache (calling library() now also moves the
    compile from the first request to the start)."""
    from adapters import cpu_kernels
    from adapters.base import cache_root

    if device.type != "cpu" or dtype not in cpu_kernels.SUFFIX:
        return f"not used ({device.type}, {str(dtype).removeprefix('torch.')})"
    d = cache_root() / "kernels"
    before = set(d.glob("*.so")) if d.is_dir() else set()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = cpu_kernels.library()
    if lib is None:
        why = str(caught[0].message)[:160] if caught else f"{cpu_kernels.ENV_SWITCH}=0"
        return f"unavailable, torch path ({why})"
    path = Path(lib._name)
    how = "loaded" if path in before else f"built in {time.perf_counter() - t0:.1f}s"
    return f"{how} {path}, called through {'ctypes' if cpu_kernels.entry() is None else 'its CPython entry'}"


LIMIT_OPTIONS = ("max_request_bytes", "max_stop", "max_stop_chars", "max_lora_rank", "max_circuit_layers",
                 "max_prefix_tokens", "stall_seconds")
"""qaa-serve's per-tenant limits, logged as given."""


def startup_summary(state, args, listen: str) -> dict:
    """The fields of the startup line (state: server.app.ServerState; args: qaa-serve's)."""
    e = state.engine
    auth = state.auth
    return {
        "version": _version(), "model": state.model_name, "model_dir": str(e.model_dir),
        "device": str(e.device), "dtype": str(e.dtype).removeprefix("torch."),
        "store": str(state.store.root), "kv_slots": e.cache.n_slots,
        "device_adapter_slots": state.residency.max_device, "host_adapters": state.residency.max_host,
        "max_running": state.scheduler.max_running, "max_waiting": state.scheduler.max_waiting,
        "max_seq_len": e.max_seq_len, "max_new_tokens": state.max_new_tokens,
        "max_upload_mb": args.max_upload_mb, "drain_seconds": args.drain_seconds,
        **{k: getattr(args, k) for k in LIMIT_OPTIONS if hasattr(args, k)},
        "kernels": kernel_state(e.device, e.dtype), "listen": listen,
        "compile": e.graph.describe() if getattr(e, "graph", None) is not None else "off",
        "auth": f"on ({len(auth.keys)} keys)" if auth.enabled else "off (single tenant, loopback only)",
        "load_seconds": round(getattr(e, "load_seconds", 0.0), 2),
    }


def _version() -> str:
    from engine.cli_parser import version

    return version()


# --- one line per finished request ----------------------------------------------------------

def log_request(r, outcome: str) -> None:
    """Called by the scheduler as a request leaves (r: server.scheduler.Request). Counts and
    timings only: the prompt and the generated text are never read here."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    now = time.perf_counter()
    e = r.entry
    admitted = getattr(r, "admitted", None)

    def since(t):
        return None if t is None else round(t - r.arrived, 4)

    event(request_log, "request", id=r.request_id or r.id, tenant=r.tenant or (e.tenant if e else None),
          user=r.user, adapter=e.adapter_id if e else None,
          adapter_version=e.version if e else None, adapter_type=r.adapter_type,
          prompt_tokens=len(r.prompt_ids), generated_tokens=len(r.seq.out_ids) if r.seq is not None else 0,
          queue_s=since(admitted), ttft_s=since(r.first_token), e2e_s=round(now - r.arrived, 4), outcome=outcome)


# --- the periodic stats line ----------------------------------------------------------------

class StatsReporter:
    """A daemon thread that logs a stats line every `interval` seconds while there is work
    (requests running or waiting, or tokens since the last line). It only reads: list
    lengths, the KV cache's free list and the metric counters."""

    def __init__(self, scheduler, engine, residency, metrics, interval: float):
        self.s, self.engine, self.res, self.m, self.interval = scheduler, engine, residency, metrics, interval
        self._stop = threading.Event()
        self._last = self._counters()
        self._t = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="stats", daemon=True)

    def start(self) -> StatsReporter:
        if self.interval > 0:
            self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a stats line must never take the server down
                log.exception("stats line failed")

    def _counters(self) -> dict[str, float]:
        reg = self.m.registry

        def get(name, **labels):
            return reg.get_sample_value(name, labels) or 0.0

        finished = sum(s.value for f in self.m.requests.collect() for s in f.samples if s.name.endswith("_total"))
        return {"prompt": get("qaa_prompt_tokens_total"), "gen": get("qaa_generation_tokens_total"),
                "finished": finished, "loads_device": get("qaa_adapter_load_seconds_count", tier="device"),
                "loads_host": get("qaa_adapter_load_seconds_count", tier="host")}

    def tick(self) -> dict | None:
        """Log one line if busy since the last tick; return its fields (None when idle)."""
        now, cur = time.monotonic(), self._counters()
        dt, last = max(now - self._t, 1e-9), self._last
        self._t, self._last = now, cur
        running, waiting = len(self.s.running), len(self.s.waiting)
        moved = any(cur[k] != last[k] for k in cur)
        if not (running or waiting or moved):
            return None
        fields = {"running": running, "waiting": waiting,
                  "prompt_tok_s": round((cur["prompt"] - last["prompt"]) / dt, 1),
                  "gen_tok_s": round((cur["gen"] - last["gen"]) / dt, 1),
                  "finished": int(cur["finished"] - last["finished"]),
                  "kv_use": round(self.engine.cache.usage(), 3),
                  "adapter_loads_device": int(cur["loads_device"] - last["loads_device"]),
                  "adapter_loads_host": int(cur["loads_host"] - last["loads_host"]),
                  "adapters_device": len(self.res.device), "adapters_host": len(self.res.host)}
        event(stats_log, "stats", **fields)
        return fields
