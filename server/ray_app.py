"""qaa-serve on Ray Serve: a stateless ingress with the same HTTP API, and engine replicas
whose adapters come through `@serve.multiplexed`, so a tenant's adapter requests go to the
replicas that already hold it (Serve's router prefers them; base-model requests carry no id
and are load-balanced).

- Ingress (`Ingress`): the app from server.app.create_app over a tokenizer, the shared
  adapter store and auth; instead of a local scheduler it forwards each generation to an
  engine replica through a streaming DeploymentHandle, keyed by "tenant/adapter_id". Uploads
  and deletes go to the shared store (server.store), where every replica sees them.
- Engine (`Engine`): one model, scheduler and residency per replica, built by server.cli.build;
  `max_ongoing_requests` is its scheduler's --max-running, so Serve's router, not the
  replica's queue, holds what does not fit, and can send it to another replica.
- Every generation response carries `x-qaa-replica`, the engine replica that ran it.

`serve run deploy/ray/config.yaml` (import path `server.ray_app:build`) or
`qaa-serve --ray --replicas N`.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
from types import SimpleNamespace

from ray import serve

from server.requests import Event
from server.scheduler import PREFILL_TOKENS

REPLICA_HEADER = "x-qaa-replica"
RAY_ONLY = ("replicas", "autoscaling_config", "affinity", "engine_num_cpus", "refresh_seconds")
_box: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qaa_replica_box", default=None)


def _argv(args: dict) -> list[str]:
    """qaa-serve's command-line options from a Serve config's `args` map."""
    out = []
    for k, v in args.items():
        if k not in RAY_ONLY and v is not None:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _replica_name() -> str:
    return serve.get_replica_context().replica_id.unique_id


@serve.deployment(name="Engine")
class EngineReplica:
    """One model, scheduler and adapter residency; generations stream back as Events."""

    def __init__(self, argv: list[str], threads: int, refresh_seconds: float):
        import torch

        from server.cli import build, parse_args

        torch.set_num_threads(threads)
        args = parse_args(argv)
        self.s = build(args).state.s
        self.s.store.refresh_seconds = refresh_seconds
        self.s.scheduler.start()
        self.name = _replica_name()

        async def held(model_id: str):
            """What Serve's router counts as held here: the residency's host tier holds the
            adapter itself (read on first use, counted in qaa_adapter_cache_misses)."""
            return SimpleNamespace(id=model_id)

        # Made here, not at class level, so that the ids Serve keeps (LRU by request) are as
        # many as the host tier holds (LRU by use): a larger count reports adapters the
        # residency has dropped, a smaller one hides adapters it still holds from the router.
        self._adapter = serve.multiplexed(max_num_models_per_replica=args.max_host_adapters)(held)

    async def generate(self, prompt_ids: list[int], params, entry):
        """Events of one generation, after a first item naming this replica."""
        from server.requests import Draining, QueueFull, Request

        mid = serve.get_multiplexed_model_id()
        if mid:
            await self._adapter(mid)
        yield self.name
        req = Request(prompt_ids, params, entry, asyncio.get_running_loop())
        try:
            self.s.scheduler.submit(req)
        except QueueFull as e:
            yield Event("error", message=f"server busy: {e}", status=429)
            return
        except Draining as e:
            yield Event("error", message=str(e), status=503)
            return
        ended = False
        try:
            while not ended:
                ev = await req.queue.get()
                ended = ev.kind in ("done", "error")
                yield ev
        finally:
            if not ended:  # the ingress cancelled (its client went away)
                self.s.scheduler.cancel(req)

    async def stats(self) -> tuple[str, dict, list[str]]:
        """(this replica, its adapter cache counters, the adapters in its host tier): what
        server.bench_fleet sums and compares across replicas."""
        m = self.s.metrics
        counts = {f"{kind}_{tier}": c.labels(tier=tier)._value.get()
                  for kind, c in (("hits", m.adapter_hits), ("misses", m.adapter_misses)) for tier in ("device", "host")}
        loop = asyncio.get_running_loop()
        held = loop.create_future()
        # read on the scheduler's thread, the only one that changes the residency
        self.s.scheduler.post(lambda: loop.call_soon_threadsafe(
            held.set_result, sorted({f"{t}/{a}" for t, a, *_ in self.s.residency.host})))
        return self.name, counts, await asyncio.wait_for(held, 30)

    def check_health(self):
        """Serve's liveness probe: the scheduler thread must be alive."""
        if not self.s.scheduler.thread.is_alive():
            raise RuntimeError("the scheduler thread has stopped")
        if self.s.scheduler.stalled():
            raise RuntimeError("the scheduler has work but has made no progress for --stall-seconds")

    def __del__(self):
        s = getattr(self, "s", None)
        if s is not None:
            s.scheduler.stop(0)


class _Forwarder:
    """Stands in for the Scheduler at the ingress: submit() starts a streaming call to an
    engine replica and feeds its events into the request's queue."""

    def __init__(self, handle, affinity: bool, max_running: int, max_waiting: int, stall_seconds: float,
                 max_batched_tokens: int):
        self.handle, self.affinity = handle, affinity
        self.max_running, self.max_waiting, self.stall_seconds = max_running, max_waiting, stall_seconds
        self.max_batched_tokens = max_batched_tokens  # each replica's, as /info reports it
        self.draining = False  # Serve drains the ingress itself
        self.tasks: dict[int, asyncio.Task] = {}

    def stalled(self) -> bool:
        """The engine replicas' liveness is Serve's health check (EngineReplica.check_health)."""
        return False

    def submit(self, req) -> None:
        box = _box.get()
        if box is not None:
            box["replica"] = asyncio.get_running_loop().create_future()
        self.tasks[req.id] = asyncio.get_running_loop().create_task(self._run(req, box))

    def cancel(self, req) -> None:
        task = self.tasks.get(req.id)
        if task is not None:
            task.cancel()

    def post(self, fn) -> None:
        """Residency updates after an upload: engine replicas read the store themselves."""

    async def _run(self, req, box) -> None:
        e = req.entry
        mid = f"{e.tenant}/{e.adapter_id}" if e is not None and self.affinity else ""
        gen = self.handle.options(stream=True, multiplexed_model_id=mid).generate.remote(req.prompt_ids, req.params, e)
        try:
            async for item in gen:
                if isinstance(item, str):
                    if box is not None and not box["replica"].done():
                        box["replica"].set_result(item)
                    continue
                req.queue.put_nowait(item)
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception as err:  # the replica died or could not be reached
            req.queue.put_nowait(Event("error", message=f"engine replica failed: {type(err).__name__}: {err}",
                                       status=503))
        finally:
            self.tasks.pop(req.id, None)
            if box is not None and not box["replica"].done():
                box["replica"].set_result("none")


class _ReplicaHeader:
    """ASGI middleware: holds back a generation's response start until its engine replica is
    known, and names it in x-qaa-replica (streams too: the replica answers before any token)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        box: dict = {}
        token = _box.set(box)

        async def send_with_replica(msg):
            if msg["type"] == "http.response.start" and "replica" in box:
                name = await asyncio.shield(box["replica"])
                msg = {**msg, "headers": [*msg.get("headers", []), (REPLICA_HEADER.encode(), name.encode())]}
            await send(msg)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _box.reset(token)


class _TokenizerOnly:
    """What the app needs of an Engine at the ingress: the tokenizer and the model's shape,
    no weights (encode_prompt is Engine's own)."""

    def __init__(self, args):
        import torch

        from engine.config import ModelConfig
        from server.cli import capacity_of
        from engine.engine import Engine, pick_device, pick_dtype
        from engine.tokenizer import Tokenizer
        from engine.weights import resolve_model_dir

        self.model_dir = resolve_model_dir(args.model)
        self.tokenizer = Tokenizer(self.model_dir)
        self.cfg = ModelConfig.from_dir(self.model_dir)
        self.shape = self.cfg.shape()
        self.max_seq_len = min(args.max_seq_len, self.cfg.max_position)
        self.max_prompt_chars = 4 * self.max_seq_len * self.tokenizer.max_token_chars  # as Engine's
        self.capacity = capacity_of(args).within(self.max_seq_len)
        self.device = pick_device(args.device) if args.device != "auto" else torch.device("cpu")
        self.dtype = pick_dtype(args.dtype, self.device)
        self._engine = Engine
        self.grammars = _NoGrammars()

    @property
    def name(self) -> str:
        return self._engine.name.fget(self)

    def encode_prompt(self, prompt, chat: bool = False) -> list[int]:
        return self._engine.encode_prompt(self, prompt, chat)


class _NoGrammars:
    """Constrained decoding needs the compiled grammar beside the engine that decodes; through
    the Ray ingress it is refused by name (400) rather than failing inside a replica."""

    def json(self, schema=None):
        from engine.errors import InputError

        raise InputError("response_format / grammar (constrained decoding) is not served through the Ray "
                         "ingress yet; send it to a qaa-serve replica directly")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, engine, argv: list[str], affinity: bool, replicas: int, refresh_seconds: float):
        from server.app import ServerState
        from server.auth import Auth
        from server.cli import parse_args
        from server.limits import Limits
        from server.metrics import Metrics
        from server.store import Store

        args = parse_args(argv)
        tok = _TokenizerOnly(args)
        limits = Limits.from_args(args, tok.max_seq_len)
        store = Store(args.adapter_dir, tok.shape, max_bytes=limits.max_upload_bytes, capacity=tok.capacity,
                      refresh_seconds=refresh_seconds)
        fwd = _Forwarder(engine, affinity, args.max_running * replicas, args.max_waiting, args.stall_seconds,
                         args.max_num_batched_tokens or args.max_running + PREFILL_TOKENS)
        residency = SimpleNamespace(tier=lambda key: "disk")  # the ingress holds none: the store has it
        self.state = ServerState(tok, store, residency, fwd, Metrics(tok.name), Auth.from_file(args.api_keys), tok.name,
                                 limits)

    def __serve_build_asgi_app__(self):
        from server.app import create_app

        return _ReplicaHeader(create_app(self.state))


def build(args: dict):
    """The Serve application: `args` are qaa-serve's options (model, adapter_dir, max_running,
    ...) plus replicas (or autoscaling_config), affinity (default true), engine_num_cpus and
    refresh_seconds (the shared store's staleness bound, default 1)."""
    from server.cli import parse_args

    argv = _argv(args)
    cli = parse_args(argv)
    replicas = int(args.get("replicas", 2))
    cpus = float(args.get("engine_num_cpus", 1))
    refresh = float(args.get("refresh_seconds", 1.0))
    scale = ({"autoscaling_config": args["autoscaling_config"]} if args.get("autoscaling_config")
             else {"num_replicas": replicas})
    engine = EngineReplica.options(max_ongoing_requests=cli.max_running, ray_actor_options={"num_cpus": cpus},
                                   health_check_period_s=2, **scale).bind(argv, max(1, int(cpus)), refresh)
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(engine, argv, bool(args.get("affinity", True)), replicas, refresh)


def main(args) -> int:
    """`qaa-serve --ray`: start (or join, with RAY_ADDRESS) a Ray cluster, run the app with
    --replicas engine replicas on --host:--port, and serve until interrupted."""
    import signal
    import threading

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    opts = {k: v for k, v in vars(args).items() if k not in ("ray", "host", "port")}
    serve.run(build(opts), name="qaa", route_prefix="/")
    print(f"qaa-serve: {args.replicas} engine replicas on Ray Serve at http://{args.host}:{args.port}", file=sys.stderr)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stopper = threading.Thread(target=serve.shutdown, daemon=True)  # drains the replicas
    stopper.start()
    stopper.join(60)  # bounded: a cluster whose processes already died cannot answer
    ray.shutdown()
    return 0
