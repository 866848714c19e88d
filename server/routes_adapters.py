"""Adapter management (/v1/adapters) and the OpenAI model list (/v1/models)."""

from __future__ import annotations

import errno

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from adapters.files import CONFIG_NAME, WEIGHTS_NAME
from server.store import NotFound, check_id


def register_adapter_routes(app: FastAPI, state) -> None:
    from server.app import HTTPError, _principal, resolve_adapter

    def info(e) -> dict:
        return {"id": e.adapter_id, "tenant": e.tenant, "type": e.kind, "version": e.version,
                "size_bytes": e.size_bytes, "created": int(e.created), "residency": state.residency.tier(e.key)}

    def visible(p):
        return state.store.list(None if p.admin and state.auth.enabled else p.tenant)

    async def read_parts(request: Request) -> tuple[bytes, bytes]:
        """The two files of an upload. The body streams into spooled temporary files (on disk
        past 1 MB) while the body limit counts it, so an oversized upload is refused with 413
        before it is held anywhere whole; a field sent twice or an unknown field is refused."""
        try:
            form = await request.form(max_files=8, max_fields=8, max_part_size=2**20)
        except MultiPartException as e:
            raise HTTPError(422, f"the upload is not an acceptable multipart form: {e.message}", "validation") from None
        except (AssertionError, ValueError, KeyError) as e:  # malformed framing or headers
            raise HTTPError(422, f"the upload is not a readable multipart form: {e}", "validation") from None
        try:
            names = [k for k, _ in form.multi_items()]
            for name in names:
                if name not in (CONFIG_NAME, WEIGHTS_NAME):
                    raise HTTPError(422, f"unknown upload field {name[:100]!r} (expected {CONFIG_NAME} and "
                                         f"{WEIGHTS_NAME})", "validation")
                if names.count(name) > 1:
                    raise HTTPError(422, f"upload field {name!r} was sent more than once", "validation")
            out = []
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                part = form.get(name)
                if not isinstance(part, UploadFile):
                    raise HTTPError(422, f"the upload needs a file field named {name!r}", "validation")
                data = await part.read(state.store.max_bytes + 1)
                if len(data) > state.store.max_bytes:
                    raise HTTPError(413, f"{name} exceeds the upload limit of {state.store.max_bytes} bytes",
                                    "too_large")
                out.append(data)
            return out[0], out[1]
        finally:
            await form.close()

    upload_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [CONFIG_NAME, WEIGHTS_NAME],
        "properties": {CONFIG_NAME: {"type": "string", "format": "binary"},
                       WEIGHTS_NAME: {"type": "string", "format": "binary"}}}}}}}

    @app.put("/v1/adapters/{adapter_id:path}", status_code=201, openapi_extra=upload_schema,
             summary="Upload or replace an adapter (multipart: adapter_config.json + adapter_model.safetensors)")
    async def put_adapter(adapter_id: str, request: Request):
        p = _principal(state, request)
        tenant = p.tenant
        if p.admin and "/" in adapter_id:
            tenant, adapter_id = adapter_id.split("/", 1)
            check_id("tenant", tenant)
        check_id("adapter id", adapter_id)
        config, weights = await read_parts(request)
        existed = any(e.adapter_id == adapter_id for e in state.store.list(tenant))
        try:
            entry, ad = await run_in_threadpool(state.store.put, tenant, adapter_id, config, weights)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HTTPError(507, "the adapter store's disk is full; the upload was not stored "
                                     "(every earlier version is intact)", "insufficient_storage") from None
            raise

        def publish():  # on the scheduler thread: running requests keep the old version
            state.residency.forget(tenant, adapter_id)
            state.residency.put_host(entry.key, ad)

        state.scheduler.post(publish)
        return JSONResponse(info(entry), status_code=200 if existed else 201)

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        p = _principal(state, request)
        return {"object": "list", "data": [info(e) for e in visible(p)]}

    @app.get("/v1/adapters/{adapter_id:path}")
    async def get_adapter(adapter_id: str, request: Request):
        p = _principal(state, request)
        return info(resolve_adapter(state, p, adapter_id))

    @app.delete("/v1/adapters/{adapter_id:path}")
    async def delete_adapter(adapter_id: str, request: Request):
        p = _principal(state, request)
        e = resolve_adapter(state, p, adapter_id)
        try:
            await run_in_threadpool(state.store.delete, e.tenant, e.adapter_id)
        except NotFound:
            raise HTTPError(404, f"adapter {adapter_id!r} not found", "not_found") from None
        state.scheduler.post(lambda: state.residency.forget(e.tenant, e.adapter_id))
        return {"id": e.adapter_id, "deleted": True}

    @app.get("/v1/models")
    async def models(request: Request):
        p = _principal(state, request)
        data = [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "qaa-serve"}]
        for e in visible(p):
            mid = e.adapter_id if e.tenant == p.tenant else f"{e.tenant}/{e.adapter_id}"
            data.append({"id": mid, "object": "model", "created": int(e.created), "owned_by": e.tenant,
                         "parent": state.model_name, "adapter_type": e.kind})
        return {"object": "list", "data": data}
