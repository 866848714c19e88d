"""The HTTP API: TGI/LoRAX generation, OpenAI-compatible completions, adapters, health, metrics.

Every error is JSON {"error": message, "error_type": kind}, the framework's own (unknown
route, wrong method, unreadable body) included, with a 4xx status for anything the client did:
400 unreadable body, 401 no/unknown key, 404 unknown adapter or route, 405 wrong method, 413
body or upload too large, 422 bad input or over a limit, 429 queue full (with Retry-After);
503 while shutting down, 507 when the store's disk is full, 500 for the server's own faults.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.base import AdapterError
from engine.errors import QaaError
from engine.sampling import SamplingParams
from server.auth import Auth, Principal
from server.limits import BodyLimit, Limits
from server.schemas import ChatRequest, CompletionRequest, TGIRequest
from server.scheduler import Draining, Event, QueueFull, Request as GenRequest, Scheduler
from server.store import NotFound, Store, check_id


class HTTPError(Exception):
    def __init__(self, status: int, message: str, error_type: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers


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

    @property
    def max_new_tokens(self) -> int:
        return self.limits.max_new_tokens


ERROR_TYPES = {400: "validation", 401: "authentication", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 422: "validation", 429: "overloaded", 503: "unavailable",
               507: "insufficient_storage"}


def error(status, message, error_type=None, headers=None):
    return JSONResponse({"error": message, "error_type": error_type or ERROR_TYPES.get(status, "internal")},
                        status_code=status, headers=headers)


def create_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="qaa-serve", version="0.1.0", lifespan=lifespan)
    app.state.s = state
    app.add_middleware(BodyLimit, limits=state.limits)

    @app.exception_handler(HTTPError)
    async def _http_error(_, e: HTTPError):
        return error(e.status, e.message, e.error_type, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _framework(_, e: StarletteHTTPException):
        # unknown routes, wrong methods, unreadable bodies, the body limit
        msg = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return error(e.status_code, msg, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return error(500, f"internal error: {type(e).__name__}", "internal")

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        errs = e.errors()
        # a union (stop: str | list) reports each branch; the one about the value says most
        first = next((x for x in errs if not x.get("type", "").endswith("_type")), errs[0] if errs else {})
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, f"{where}: {first.get('msg', 'invalid request')}"[:1000], "validation")

    @app.exception_handler(QaaError)
    async def _input(_, e: QaaError):
        return error(422, str(e), "validation")

    @app.exception_handler(AdapterError)
    async def _adapter(_, e: AdapterError):
        return error(422, str(e), "adapter")

    from server.routes_adapters import register_adapter_routes

    register_adapter_routes(app, state)

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
        client needs to build adapter files for it, e.g. qaa-loadtest's synthetic adapters)."""
        from adapters.registry import kinds

        e, cfg = state.engine, state.engine.cfg
        return {"model_id": state.model_name, "model_dtype": str(e.dtype).removeprefix("torch."),
                "model_device_type": e.device.type, "max_total_tokens": e.max_seq_len,
                "max_input_tokens": e.max_seq_len - 1, "max_new_tokens": state.max_new_tokens,
                "max_concurrent_requests": state.scheduler.max_running,
                "max_waiting_requests": state.scheduler.max_waiting,
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

    @app.post("/generate")
    async def generate(body: TGIRequest, request: Request):
        if body.stream:
            return await generate_stream(body, request)
        req = await _start_tgi(state, body, request)
        text, reason, n = await _collect(state, req, request)
        return _tgi_final(req, text, reason, n)

    @app.post("/generate_stream")
    async def generate_stream(body: TGIRequest, request: Request):
        req = await _start_tgi(state, body, request)

        async def events():
            text, n = "", 0
            async for ev in _events(state, req):
                if ev.kind == "error":
                    yield _sse({"error": ev.message, "error_type": _event_error_type(ev)})
                    return
                if ev.kind == "token":
                    text, n = text + ev.text, n + 1
                    yield _sse({"token": {"id": ev.token_id, "text": ev.text, "logprob": None, "special": False},
                                "generated_text": None, "details": None})
                else:
                    final = _tgi_final(req, text, ev.finish_reason, n)
                    yield _sse({"token": None, **final})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        p = _principal(state, request)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
            if len(prompt) != 1:
                raise HTTPError(422, "prompt: only one prompt per request is supported", "validation")
            prompt = prompt[0]
        params = _openai_params(state, body, body.max_tokens)
        req = await _start(state, p, body.model, await _encode(state, prompt), params)
        return await _openai_response(state, req, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        p = _principal(state, request)
        params = _openai_params(state, body, body.max_completion_tokens or body.max_tokens)
        ids = await _encode(state, [m.model_dump() for m in body.messages], chat=True)
        req = await _start(state, p, body.model, ids, params)
        return await _openai_response(state, req, request, body, chat=True)

    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with the error body every route really answers with declared for
    every 4xx and 5xx (in place of FastAPI's {"detail"} shape), and uploads' 200 (replaced)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = {"type": "object", "required": ["error", "error_type"],
                        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}}
    for k in ("HTTPValidationError", "ValidationError"):
        schemas.pop(k, None)
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            responses["4XX"] = {"description": "The request cannot be served (the message says why)", **err}
            responses["5XX"] = {"description": "The server failed or is shutting down", **err}
            if method == "put" and path.startswith("/v1/adapters/"):
                responses["200"] = {"description": "Replaced: a new version of an existing adapter",
                                    **responses.get("201", {})}
    app.openapi_schema = schema
    return schema


# --- helpers --------------------------------------------------------------------------------

def _principal(state: ServerState, request: Request) -> Principal:
    p = state.auth.principal(request.headers.get("authorization"))
    if p is None:
        raise HTTPError(401, "missing or invalid API key (send Authorization: Bearer <key>)", "authentication")
    return p


def resolve_adapter(state: ServerState, p: Principal, adapter_id: str | None):
    """None for the base model; else the caller's stored adapter (404 if it has none)."""
    if adapter_id in (None, "", state.model_name):
        return None
    tenant, aid = p.tenant, adapter_id
    if p.admin and "/" in adapter_id:
        tenant, aid = adapter_id.split("/", 1)
    try:
        check_id("adapter id", aid)
        return state.store.get(tenant, aid)
    except (NotFound, AdapterError):
        raise HTTPError(404, f"adapter {adapter_id!r} not found", "not_found") from None


async def _encode(state: ServerState, prompt, chat: bool = False) -> list[int]:
    """Token ids, computed off the event loop: a long prompt never stalls other requests."""
    return await asyncio.to_thread(state.engine.encode_prompt, prompt, chat)


def _sampling(state: ServerState, stop: list[str], **kw) -> SamplingParams:
    lim = state.limits
    if len(stop) > lim.max_stop:
        raise HTTPError(422, f"stop: at most {lim.max_stop} stop strings are accepted, got {len(stop)}", "validation")
    if any(len(s) > lim.max_stop_chars for s in stop):
        raise HTTPError(422, f"stop: a stop string may have at most {lim.max_stop_chars} characters", "validation")
    if kw["max_new_tokens"] > lim.max_new_tokens:
        raise HTTPError(422, f"max_new_tokens must be <= {lim.max_new_tokens}, got {kw['max_new_tokens']}", "validation")
    return SamplingParams(stop=stop, **kw)


def _limits(state: ServerState, ids: list[int], max_new: int, entry) -> None:
    virtual = entry.virtual_tokens if entry is not None else 0
    total = state.engine.max_seq_len
    if len(ids) + virtual + max_new > total:
        raise HTTPError(422, f"prompt tokens ({len(ids)}) + max_new_tokens ({max_new})"
                        f"{f' + {virtual} virtual tokens' if virtual else ''} must be <= {total}", "validation")


async def _start(state: ServerState, p: Principal, adapter_id, ids, params: SamplingParams) -> GenRequest:
    entry = resolve_adapter(state, p, adapter_id)
    _limits(state, ids, params.max_new_tokens, entry)
    req = GenRequest(ids, params, entry, asyncio.get_running_loop())
    try:
        state.scheduler.submit(req)
    except (QueueFull, Draining) as e:
        state.metrics.requests.labels(outcome="rejected", adapter_type=req.adapter_type).inc()
        if isinstance(e, Draining):
            raise HTTPError(503, f"server unavailable: {e}", "unavailable") from None
        raise HTTPError(429, f"server busy: {e}", "overloaded", {"Retry-After": "1"}) from None
    return req


async def _start_tgi(state: ServerState, body: TGIRequest, request: Request) -> GenRequest:
    p = _principal(state, request)
    q = body.parameters
    sample = q.do_sample or (q.temperature is not None and q.temperature > 0)
    params = _sampling(
        state, q.stop, max_new_tokens=q.max_new_tokens or min(100, state.max_new_tokens),
        temperature=(q.temperature or 1.0) if sample else 0.0, top_k=q.top_k or 0, top_p=q.top_p or 1.0,
        repetition_penalty=q.repetition_penalty or 1.0, seed=q.seed, ignore_eos=q.ignore_eos)
    ids = await _encode(state, body.inputs)
    return await _start(state, p, q.adapter_id, ids, params)


def _openai_params(state: ServerState, body, max_tokens) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return _sampling(state, stop, max_new_tokens=max_tokens or 16, temperature=body.temperature, top_p=body.top_p,
                     top_k=max(0, body.top_k), repetition_penalty=body.repetition_penalty, seed=body.seed,
                     ignore_eos=body.ignore_eos)


async def _events(state: ServerState, req: GenRequest):
    """The request's events until done; a consumer that stops early (disconnect) cancels it."""
    ended = False
    try:
        while not ended:
            ev: Event = await req.queue.get()
            ended = ev.kind in ("done", "error")
            yield ev
    finally:
        if not ended:
            state.scheduler.cancel(req)


async def _collect(state: ServerState, req: GenRequest, request: Request):
    """Wait for the whole completion, cancelling it if the client goes away."""
    text, n = "", 0
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
            text, n = text + ev.text, n + 1
        else:
            return text, ev.finish_reason, n


def _event_error_type(ev: Event) -> str:
    return {503: "unavailable", 422: "validation"}.get(ev.status, "generation")


def _tgi_final(req: GenRequest, text: str, reason: str, n: int) -> dict:
    reason = {"stop": "eos_token", "length": "length"}.get(reason, reason)
    if req.seq is not None and req.params.stop and reason == "eos_token" and req.seq.out_ids[-1] not in req.seq.tokenizer.eos_ids:
        reason = "stop_sequence"
    return {"generated_text": text,
            "details": {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids), "generated_tokens": n}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _openai_response(state, req: GenRequest, request: Request, body, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created, model = int(time.time()), body.model
    obj = "chat.completion" if chat else "text_completion"
    if not body.stream:
        text, reason, n = await _collect(state, req, request)
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n, "total_tokens": len(req.prompt_ids) + n}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                  if chat else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}

    usage = body.stream_options is not None and body.stream_options.include_usage
    extra = {"usage": None} if usage else {}

    async def events():
        first, n = True, 0
        async for ev in _events(state, req):
            n += ev.kind == "token"
            if ev.kind == "error":  # the final event says why; clients stop at [DONE]
                yield _sse({"error": {"message": ev.message, "type": _event_error_type(ev), "code": ev.status}})
                yield "data: [DONE]\n\n"
                return
            reason = ev.finish_reason if ev.kind == "done" else None
            if ev.kind == "token" and not ev.text and not first:
                continue
            if chat:
                delta = {"role": "assistant", "content": ev.text} if first else ({"content": ev.text} if ev.text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": ev.text, "finish_reason": reason, "logprobs": None}
            first = False
            yield _sse({"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model,
                        "choices": [choice], **extra})
        if usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
            p = len(req.prompt_ids)
            yield _sse({"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model,
                        "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
