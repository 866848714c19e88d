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
    from engine.cli_parser import Parser, number
    from server.logs import FORMATS, LEVELS

    ap = Parser("qaa-serve", description=__doc__)
    ap.add_argument("--model", metavar="DIR", default=None, help="local HF Llama-family checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: needs --api-keys)")
    ap.add_argument("--port", metavar="PORT", type=number(int, 0, 65535), default=8000, help="port to listen on (0: any free port)")
    ap.add_argument("--adapter-dir", metavar="DIR", default=os.environ.get("QAA_ADAPTER_DIR", "adapters-store"),
                    help="the adapter store, created if missing ($QAA_ADAPTER_DIR)")
    ap.add_argument("--max-running", metavar="N", type=number(int, 1), default=16, help="requests decoding together (KV slots)")
    ap.add_argument("--max-num-batched-tokens", metavar="N", type=number(int, 2), default=None,
                    help="tokens per step: one per decoding request, the rest prefill chunks (more than --max-running; default --max-running + 48)")
    ap.add_argument("--max-waiting", metavar="N", type=number(int, 1), default=256, help="queued requests before 429")
    ap.add_argument("--max-device-adapters", metavar="N", type=number(int, 1), default=32, help="adapters held in device slot banks")
    ap.add_argument("--max-host-adapters", metavar="N", type=number(int, 1), default=256, help="adapters held in host memory")
    ap.add_argument("--max-seq-len", metavar="N", type=number(int, 2), default=2048, help="prompt + generated tokens per request")
    ap.add_argument("--max-new-tokens", metavar="N", type=number(int, 1), default=1024, help="largest max_new_tokens a request may ask for")
    ap.add_argument("--max-upload-mb", metavar="MB", type=number(float, 0.001), default=512, help="largest adapter upload, in MiB")
    ap.add_argument("--api-keys", default=None, metavar="FILE",
                    help="JSON file: key -> tenant (see server/auth.py); without it: single tenant, loopback only")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default $QAA_DTYPE, else auto: bf16 on "
                                                  "CUDA and on a CPU with native bf16, AMX or avx512_bf16; fp32 elsewhere)")
    ap.add_argument("--compile", action="store_true",
                    help="decode through a static-shape step compiled by torch.compile (CUDA graphs on a GPU); "
                         "compiles every batch and length bucket at start")
    ap.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager", "none"),
                    help="torch.compile backend for --compile; none: the static step uncompiled (on a GPU, CUDA "
                         "graphs of it without inductor's compile time)")
    ap.add_argument("--drain-seconds", metavar="S", type=number(float, 0), default=30,
                    help="on SIGTERM, how long running requests may finish")
    # what one tenant's request or adapter may demand (see README: Limits)
    ap.add_argument("--max-request-bytes", metavar="N", type=number(int, 1), default=2_000_000,
                    help="largest JSON request body (413 above)")
    ap.add_argument("--max-stop", metavar="N", type=number(int, 0), default=16, help="most stop strings per request")
    ap.add_argument("--max-stop-chars", metavar="N", type=number(int, 1), default=256, help="longest stop string")
    ap.add_argument("--max-lora-rank", metavar="R", type=number(int, 1), default=64,
                    help="largest LoRA/SoRA rank an adapter may have")
    ap.add_argument("--max-circuit-layers", metavar="L", type=number(int, 1), default=64,
                    help="deepest QAA circuit an adapter may have")
    ap.add_argument("--max-prefix-tokens", metavar="N", type=number(int, 1), default=128,
                    help="most prefix-tuning virtual tokens (also bounded by --max-seq-len - 2)")
    ap.add_argument("--lora-load-root", default=None, metavar="DIR",
                    help="enable vLLM's /v1/load_lora_adapter for adapter directories under this directory")
    ap.add_argument("--stall-seconds", metavar="S", type=number(float, 0.001), default=60,
                    help="/health answers 503 when the scheduler has made no progress this long with work pending")
    ap.add_argument("--metrics-adapter-names", default="all", help="adapter ids vllm:lora_requests_info may show: "
                    "all, none, or comma-separated tenants (see server/metrics.py)")
    ap.add_argument("--ray", action="store_true", help="run on Ray Serve: an ingress and --replicas engine replicas")
    ap.add_argument("--replicas", type=number(int, 1), default=2, metavar="N", help="engine replicas with --ray")
    ap.add_argument("--log-level", choices=LEVELS, default="info", help="lowest level logged (uvicorn's too)")
    ap.add_argument("--log-format", choices=FORMATS, default="text", help="text lines, or one JSON object per line")
    ap.add_argument("--stats-interval", metavar="S", type=number(float, 0), default=10,
                    help="seconds between stats lines while busy (0: none)")
    args = ap.parse_args(argv)
    if args.api_keys is None and not _loopback(args.host):  # build() checks it too, for its other callers
        ap.error(f"without --api-keys the server is single-tenant and listens on loopback only; "
                 f"{args.host} is not a loopback address")
    return args


def capacity_of(args):
    """What one adapter may demand, from qaa-serve's options."""
    from adapters.base import Capacity

    return Capacity(max_rank=args.max_lora_rank, max_circuit_layers=args.max_circuit_layers,
                    max_virtual_tokens=args.max_prefix_tokens)


def build(args, scheduler_thread: bool = True):
    """Everything but the HTTP listener: engine, store, residency, scheduler, app.

    scheduler_thread=True starts the scheduler on a thread when the app starts; False leaves
    it to the caller to run on the main thread (what `qaa-serve` does)."""
    from engine.engine import Engine
    from engine.graph import GraphConfig
    from server.app import ServerState, create_app
    from server.auth import Auth
    from server.limits import Limits
    from server.metrics import Metrics
    from server.residency import Residency
    from server.scheduler import Scheduler
    from server.store import Store

    if args.max_num_batched_tokens is not None and args.max_num_batched_tokens <= args.max_running:
        raise SystemExit(f"qaa-serve: error: --max-num-batched-tokens ({args.max_num_batched_tokens}) must exceed "
                         f"--max-running ({args.max_running}): every step feeds each decoding request a token")
    auth = Auth.from_file(args.api_keys)
    if not auth.enabled and not _loopback(args.host):
        raise SystemExit(f"qaa-serve: error: without --api-keys the server is single-tenant and listens on loopback "
                         f"only; {args.host} is not a loopback address")
    capacity = capacity_of(args)
    engine = Engine(args.model, device=args.device, dtype=args.dtype, max_batch=args.max_running,
                    max_seq_len=args.max_seq_len, max_adapters=args.max_device_adapters, capacity=capacity,
                    compile=args.compile and GraphConfig(backend=None if args.compile_backend == "none" else args.compile_backend))
    limits = Limits.from_args(args, engine.max_seq_len)
    names = args.metrics_adapter_names
    metrics = Metrics(engine.name, names if names in ("all", "none") else frozenset(names.split(",")),
                      args.max_device_adapters)
    store = Store(args.adapter_dir, engine.shape, max_bytes=limits.max_upload_bytes, capacity=engine.capacity)
    residency = Residency(engine, store, args.max_device_adapters, args.max_host_adapters, metrics)
    scheduler = Scheduler(engine, residency, args.max_running, args.max_waiting, metrics, args.stall_seconds,
                          args.max_num_batched_tokens)

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


def listen_socket(host: str, port: int):
    """The listening address, bound before the model loads (so a taken port fails in
    milliseconds) and handed to uvicorn; SO_REUSEADDR as uvicorn sets it."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv=None) -> int:
    args = parse_args(argv)
    from server import logs

    logs.setup(args.log_level, args.log_format)
    if args.ray:
        from server.ray_app import main as ray_main

        return ray_main(args)
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as e:
        print(f"qaa-serve: error: cannot listen on {args.host}:{args.port} (--host/--port): "
              f"{e.strerror or e}", file=sys.stderr)
        return 2
    from adapters.base import AdapterError
    from engine.errors import QaaError

    try:
        logs.event(logs.log, "loading", model=args.model or "default", device=args.device)
        app = build(args, scheduler_thread=False)
    except (QaaError, AdapterError) as e:
        sock.close()
        print(f"qaa-serve: error: {e}", file=sys.stderr)
        return 2
    s = app.state.s
    host, port = sock.getsockname()[:2]
    logs.event(logs.log, "startup", **logs.startup_summary(s, args, f"http://{_url_host(host)}:{port}"))
    stats = logs.StatsReporter(s.scheduler, s.engine, s.residency, s.metrics, args.stats_interval).start()
    try:
        return serve(app, args, sock)
    finally:
        stats.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(app, args, sock=None) -> int:
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
    server = ThreadedServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           log_config=None, timeout_graceful_shutdown=2))
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
            server.run(sockets=[sock] if sock is not None else None)
        finally:  # whether it shut down cleanly or never started, the main loop ends too
            scheduler.stop(0 if not server.started else args.drain_seconds)

    t = threading.Thread(target=http, name="http")
    t.start()
    scheduler.run()
    t.join()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
