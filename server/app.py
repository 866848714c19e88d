"""The HTTP API: TGI/LoRAX generation, OpenAI-compatible completions, adapters, health, metrics.

Every error is JSON {"error": message, "error_type": kind}, the framework's own (unknown
route, wrong method, unreadable body) included, with a 4xx status for anything the client did:
400 unreadable body, 401 no/unknown key, 404 unknown adapter or route, 405 wrong method, 413
body or upload too large, 422 bad input or over a limit, 429 queue full (with Retry-After);
503 while shutting down, 507 when the store's disk is full, 500 for the server's own faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.base import AdapterError
from engine.cli_parser import version
from engine.sampling import SamplingParams
from server.auth import Auth, Principal
from server.errors import ERROR_TYPES, HTTPError, error, install_error_handlers, openapi_schema
from server.limits import BodyLimit, Limits
from server.request_id import RequestId
from server.requests import Draining, Event, QueueFull, Request as GenRequest
from server.scheduler import Scheduler
from server.store import NotFound, Store, check_id


@dataclass
class ServerState:
    engine: object
    store: Store
    residency: object
    scheduler: Scheduler
    metrics: object
    auth: Auth
    model_name: str
    limits: Limits
    """What one request may ask for (max_new_tokens, stop strings, body bytes)."""
    lora_root: Path | None = None
    """Where /v1/load_lora_adapter may read adapter directories from; None = off."""

    @property
    def max_new_tokens(self) -> int:
        return self.limits.max_new_tokens


def create_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="qaa-serve", version=version(), lifespan=lifespan)
    app.state.s = state
    app.add_middleware(BodyLimit, limits=state.limits)
    app.add_middleware(RequestId)

    install_error_handlers(app)

    from server.routes_adapters import register_adapter_routes
    from server.routes_tokens import register_token_routes

    register_adapter_routes(app, state)
    register_token_routes(app, state)

    @app.get("/health")
    async def health():
        """200 while the server takes requests; 503 while it drains, or when its scheduler has
        work pending but has not come round for --stall-seconds (a hung step)."""
        sch = state.scheduler
        if sch.draining:
            return error(503, "the server is shutting down", "unavailable")
        if sch.stalled():
            return error(503, f"the scheduler has made no progress for over {sch.stall_seconds:g} s "
                              "with requests pending", "stalled")
        return {"status": "ok", "model": state.model_name}

    @app.get("/info")
    async def info():
        """TGI's /info: what is served and its limits, plus the base model's shape (what a
        client needs to build adapter files for it, e.g. qaa-loadtest's synthetic adapters),
        and this host's native bf16 support (cpu_bf16: "amx", "avx512_bf16" or null), which
        decides the default dtype on the CPU."""
        from adapters.registry import kinds
        from engine.engine import cpu_bf16

        e, cfg = state.engine, state.engine.cfg
        return {"model_id": state.model_name, "model_dtype": str(e.dtype).removeprefix("torch."),
                "model_device_type": e.device.type, "cpu_bf16": cpu_bf16(), "max_total_tokens": e.max_seq_len,
                "max_input_tokens": e.max_seq_len - 1, "max_new_tokens": state.max_new_tokens,
                "max_concurrent_requests": state.scheduler.max_running,
                "max_waiting_requests": state.scheduler.max_waiting,
                "max_num_batched_tokens": state.scheduler.max_batched_tokens,
                "limits": {**asdict(state.limits), **asdict(e.capacity), "max_prompt_chars": e.max_prompt_chars,
                           "stall_seconds": state.scheduler.stall_seconds},
                "adapter_types": kinds(), "version": app.version,
                "model_config": {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
                                 "hidden_size": cfg.dim, "intermediate_size": cfg.intermediate_size,
                                 "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                                 "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                                 "eos_token_id": list(cfg.eos_token_ids)}}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from server.routes_tgi import register_tgi_routes

    register_tgi_routes(app, state)

    from server.routes_openai import register_openai_routes

    register_openai_routes(app, state)

    app.openapi = lambda: openapi_schema(app)
    return app


# --- helpers --------------------------------------------------------------------------------

def _principal(state: ServerState, request: Request) -> Principal:
    p = state.auth.principal(request.headers.get("authorization"))
    if p is None:
        raise HTTPError(401, "missing or invalid API key (send Authorization: Bearer <key>)", "authentication")
    return p


# names clients send when they have no model name to give: TGI ignores `model`, and
# huggingface_hub's InferenceClient sends "tgi" or "dummy" when it is pointed at a URL
BASE_ALIASES = ("tgi", "dummy")


def adapter_ref(state: ServerState, p: Principal, adapter_id: str | None) -> tuple[str, str] | None:
    """None for the base model; else (tenant, adapter id) of the caller's adapter of that name,
    whether or not it exists (404 for a name that cannot be one)."""
    if adapter_id in (None, "", state.model_name, *BASE_ALIASES):
        return None
    tenant, aid = p.tenant, adapter_id
    if p.admin and "/" in adapter_id:
        tenant, aid = adapter_id.split("/", 1)
    try:
        return check_id("tenant", tenant), check_id("adapter id", aid)
    except AdapterError:
        raise HTTPError(404, f"adapter {adapter_id!r} not found", "not_found") from None


def resolve_adapter(state: ServerState, p: Principal, adapter_id: str | None):
    """None for the base model; else the caller's stored adapter (404 if it has none, or if
    it does not load: the store logs why)."""
    ref = adapter_ref(state, p, adapter_id)
    if ref is None:
        return None
    try:
        return state.store.get(*ref)
    except (NotFound, AdapterError):
        raise HTTPError(404, f"adapter {adapter_id!r} not found", "not_found") from None


async def _encode(state: ServerState, prompt, chat: bool = False) -> list[int]:
    """Token ids, computed off the event loop: a long prompt never stalls other requests."""
    return await asyncio.to_thread(state.engine.encode_prompt, prompt, chat)


async def _with_grammar(state: ServerState, params: SamplingParams, constrained: bool, schema: dict | None,
                        param: str) -> SamplingParams:
    """params with the compiled JSON grammar when the output is to be JSON (schema None: any
    JSON). Compiling runs off the event loop, bounded in time."""
    if not constrained:
        return params
    try:
        grammar = await asyncio.wait_for(asyncio.to_thread(state.engine.grammars.json, schema), timeout=10)
    except asyncio.TimeoutError:
        raise HTTPError(422, "the JSON schema takes too long to compile", "validation", param=param) from None
    return dataclasses.replace(params, grammar=grammar)


def _sampling(state: ServerState, stop: list[str], **kw) -> SamplingParams:
    lim = state.limits
    if len(stop) > lim.max_stop:
        raise HTTPError(422, f"stop: at most {lim.max_stop} stop strings are accepted, got {len(stop)}", "validation")
    if any(len(s) > lim.max_stop_chars for s in stop):
        raise HTTPError(422, f"stop: a stop string may have at most {lim.max_stop_chars} characters", "validation")
    if kw["max_new_tokens"] > lim.max_new_tokens:
        raise HTTPError(422, f"max_new_tokens must be <= {lim.max_new_tokens}, got {kw['max_new_tokens']}", "validation")
    if kw.get("min_tokens", 0) > kw["max_new_tokens"]:
        raise HTTPError(422, f"min_tokens ({kw['min_tokens']}) must be <= max_tokens ({kw['max_new_tokens']})",
                        "validation")
    return SamplingParams(stop=stop, **kw)


def _limits(state: ServerState, ids: list[int], max_new: int, entry) -> None:
    virtual = entry.virtual_tokens if entry is not None else 0
    total = state.engine.max_seq_len
    if len(ids) + virtual + max_new > total:
        raise HTTPError(422, f"prompt tokens ({len(ids)}) + max_new_tokens ({max_new})"
                        f"{f' + {virtual} virtual tokens' if virtual else ''} must be <= {total}", "validation")


async def _start(state: ServerState, p: Principal, adapter_id, ids, params: SamplingParams,
                 fit: bool = False, request: Request | None = None, user: str | None = None) -> GenRequest:
    """Queue a generation. fit: max_new_tokens was not asked for, so it shrinks to the room
    the context leaves after the prompt (and a prefix adapter's virtual tokens)."""
    entry = resolve_adapter(state, p, adapter_id)
    if fit:
        virtual = entry.virtual_tokens if entry is not None else 0
        params.max_new_tokens = max(1, min(params.max_new_tokens, state.engine.max_seq_len - len(ids) - virtual))
    _limits(state, ids, params.max_new_tokens, entry)
    req = GenRequest(ids, params, entry, asyncio.get_running_loop(), tenant=p.tenant, user=user,
                     request_id=request.scope.get("state", {}).get("request_id") if request is not None else None)
    try:
        state.scheduler.submit(req)
    except (QueueFull, Draining) as e:
        state.metrics.requests.labels(outcome="rejected", adapter_type=req.adapter_type).inc()
        if isinstance(e, Draining):
            raise HTTPError(503, f"server unavailable: {e}", "unavailable") from None
        raise HTTPError(429, f"server busy: {e}", "overloaded", {"Retry-After": "1"}) from None
    return req


async def _start_all(state: ServerState, p: Principal, adapter_id, ids, params: SamplingParams, k: int,
                     fit: bool = False, request: Request | None = None, user: str | None = None) -> list[GenRequest]:
    """k generations of one request (OpenAI's n/best_of, TGI's best_of), queued together;
    generation i draws with seed + i. If one cannot be queued, those already are cancelled."""
    reqs = []
    try:
        for i in range(k):
            seed = None if params.seed is None else (params.seed + i) % 2**64
            reqs.append(await _start(state, p, adapter_id, ids, dataclasses.replace(params, seed=seed), fit,
                                     request, user))
    except BaseException:
        for r in reqs:
            state.scheduler.cancel(r)
        raise
    return reqs


async def _events(state: ServerState, reqs: list[GenRequest]):
    """(index, event) of one or several generations as their events come, until each is done
    (or one fails); a consumer that stops early (the client went away) cancels the rest."""
    gets = {asyncio.ensure_future(r.queue.get()): i for i, r in enumerate(reqs)}
    try:
        while gets:
            done, _ = await asyncio.wait(gets, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=gets.get):
                i = gets.pop(fut)
                ev = fut.result()
                yield i, ev
                if ev.kind == "error":
                    return
                if ev.kind == "token":
                    gets[asyncio.ensure_future(reqs[i].queue.get())] = i
    finally:
        for fut, i in gets.items():  # what is still waiting for events has not ended
            fut.cancel()
            state.scheduler.cancel(reqs[i])


async def _collect_all(state: ServerState, reqs: list[GenRequest], request: Request) -> list[tuple[list[Event], str]]:
    """_collect of several generations of one request (n, best_of); if one fails or the client
    goes, the others are cancelled."""
    try:
        return await asyncio.gather(*(_collect(state, r, request) for r in reqs))
    except BaseException:
        for r in reqs:
            state.scheduler.cancel(r)
        raise


async def _collect(state: ServerState, req: GenRequest, request: Request) -> tuple[list[Event], str]:
    """Every token event of one generation and its finish reason; cancelled if the client goes."""
    events = []
    while True:
        try:
            ev = await asyncio.wait_for(req.queue.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                state.scheduler.cancel(req)
                raise HTTPError(499, "client disconnected", "cancelled") from None
            continue
        if ev.kind == "error":
            raise HTTPError(ev.status, ev.message, _event_error_type(ev))
        if ev.kind == "token":
            events.append(ev)
        else:
            return events, ev.finish_reason


def _event_error_type(ev: Event) -> str:
    return ERROR_TYPES.get(ev.status, "generation")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
