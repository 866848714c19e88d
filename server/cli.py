"""`qaa-serve`: one frozen model on the device, many tenants' adapters, over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from pathlib import Path
from contextlib import asynccontextmanager


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="qaa-serve", description=__doc__)
    ap.add_argument("--model", default=None, help="local HF Llama-family checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--adapter-dir", default=os.environ.get("QAA_ADAPTER_DIR", "adapters-store"),
                    help="the adapter store (created if missing)")
    ap.add_argument("--max-running", type=int, default=16, help="requests decoding together (KV slots)")
    ap.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    ap.add_argument("--max-device-adapters", type=int, default=32, help="adapters held in device slot banks")
    ap.add_argument("--max-host-adapters", type=int, default=256, help="adapters held in host memory")
    ap.add_argument("--max-seq-len", type=int, default=2048, help="prompt + generated tokens per request")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_new_tokens a request may ask for")
    ap.add_argument("--max-upload-mb", type=float, default=512)
    ap.add_argument("--api-keys", default=None, help="JSON file: key -> tenant (see server/auth.py)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--drain-seconds", type=float, default=30, help="on SIGTERM, how long running requests may finish")
    # what one tenant's request or adapter may demand (see README: Limits)
    ap.add_argument("--max-request-bytes", type=int, default=2_000_000, help="largest JSON request body (413 above)")
    ap.add_argument("--max-stop", type=int, default=16, help="most stop strings per request")
    ap.add_argument("--max-stop-chars", type=int, default=256, help="longest stop string")
    ap.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA/SoRA rank an adapter may have")
    ap.add_argument("--max-circuit-layers", type=int, default=64, help="deepest QAA circuit an adapter may have")
    ap.add_argument("--max-prefix-tokens", type=int, default=128,
                    help="most prefix-tuning virtual tokens (also bounded by --max-seq-len - 2)")
    ap.add_argument("--lora-load-root", default=None,
                    help="enable vLLM's /v1/load_lora_adapter for adapter directories under this directory")
    ap.add_argument("--stall-seconds", type=float, default=60,
                    help="/health answers 503 when the scheduler has made no progress this long with work pending")
    ap.add_argument("--metrics-adapter-names", default="all", help="adapter ids vllm:lora_requests_info may show: "
                    "all, none, or comma-separated tenants (see server/metrics.py)")
    ap.add_argument("--ray", action="store_true", help="run on Ray Serve: an ingress and --replicas engine replicas")
    ap.add_argument("--replicas", type=int, default=2, help="engine replicas with --ray")
    return ap.parse_args(argv)


def build(args, scheduler_thread: bool = True):
    """Everything but the HTTP listener: engine, store, residency, scheduler, app.

    scheduler_thread=True starts the scheduler on a thread when the app starts; False leaves
    it to the caller to run on the main thread (what `qaa-serve` does)."""
    from adapters.base import Capacity
    from engine.engine import Engine
    from server.app import ServerState, create_app
    from server.auth import Auth
    from server.limits import Limits
    from server.metrics import Metrics
    from server.residency import Residency
    from server.scheduler import Scheduler
    from server.store import Store

    auth = Auth.from_file(args.api_keys)
    if not auth.enabled and not _loopback(args.host):
        raise SystemExit(f"qaa-serve: error: without --api-keys the server is single-tenant and listens on loopback "
                         f"only; {args.host} is not a loopback address")
    capacity = Capacity(max_rank=args.max_lora_rank, max_circuit_layers=args.max_circuit_layers,
                        max_virtual_tokens=args.max_prefix_tokens)
    engine = Engine(args.model, device=args.device, dtype=args.dtype, max_batch=args.max_running,
                    max_seq_len=args.max_seq_len, max_adapters=args.max_device_adapters, capacity=capacity)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_new_tokens=min(args.max_new_tokens, engine.max_seq_len - 1), max_stop=args.max_stop,
                    max_stop_chars=args.max_stop_chars)
    names = args.metrics_adapter_names
    metrics = Metrics(engine.name, names if names in ("all", "none") else frozenset(names.split(",")),
                      args.max_device_adapters)
    store = Store(args.adapter_dir, engine.shape, max_bytes=limits.max_upload_bytes, capacity=engine.capacity)
    residency = Residency(engine, store, args.max_device_adapters, args.max_host_adapters, metrics)
    scheduler = Scheduler(engine, residency, args.max_running, args.max_waiting, metrics, args.stall_seconds)

    @asynccontextmanager
    async def lifespan(app):
        if scheduler_thread:
            scheduler.start()
        yield
        # uvicorn has stopped accepting and waited for open responses; finish what is left
        await asyncio.to_thread(scheduler.stop, args.drain_seconds)

    lora_root = Path(args.lora_load_root).resolve() if args.lora_load_root else None
    state = ServerState(engine, store, residency, scheduler, metrics, auth, engine.name, limits, lora_root)
    app = create_app(state, lifespan=lifespan)
    from server.probes import register_probes

    register_probes(app, state)
    return app


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ray:
        from server.ray_app import main as ray_main

        return ray_main(args)
    from adapters.base import AdapterError
    from engine.errors import QaaError

    try:
        app = build(args, scheduler_thread=False)
    except (QaaError, AdapterError) as e:
        print(f"qaa-serve: error: {e}", file=sys.stderr)
        return 2
    return serve(app, args)


def serve(app, args) -> int:
    """uvicorn's event loop on a thread, the scheduler (the model) on the main thread.

    SIGTERM/SIGINT drain: the server takes no new requests (503, /health 503), running and
    queued ones may finish until --drain-seconds, then every one still open ends with a final
    event saying the server shut down, the listener closes and the process exits 0. A second
    signal ends the drain at once.
    """
    import contextlib
    import signal
    import threading
    import time

    import uvicorn

    class ThreadedServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # signals belong to the main thread, see below
            yield

    # open responses have had their final events by the time uvicorn is told to exit
    server = ThreadedServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=2))
    scheduler = app.state.s.scheduler

    def close_when_drained():
        deadline = time.monotonic() + args.drain_seconds + 1
        while not scheduler.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        server.should_exit = True

    def on_signal(signum, frame):
        if scheduler.draining:
            scheduler.begin_drain(0)
            return
        scheduler.begin_drain(args.drain_seconds)
        threading.Thread(target=close_when_drained, name="drain", daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def http():
        try:
            server.run()
        finally:  # whether it shut down cleanly or never started, the main loop ends too
            scheduler.stop(0 if not server.started else args.drain_seconds)

    t = threading.Thread(target=http, name="http")
    t.start()
    scheduler.run()
    t.join()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
