"""Adapter management (/v1/adapters) and the OpenAI model list (/v1/models)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile
from fastapi.concurrency import run_in_threadpool

from adapters.files import CONFIG_NAME, WEIGHTS_NAME
from server.store import NotFound, check_id


def register_adapter_routes(app: FastAPI, state) -> None:
    from server.app import HTTPError, _principal, resolve_adapter

    def info(e) -> dict:
        return {"id": e.adapter_id, "tenant": e.tenant, "type": e.kind, "version": e.version,
                "size_bytes": e.size_bytes, "created": int(e.created), "residency": state.residency.tier(e.key)}

    def visible(p):
        return state.store.list(None if p.admin and state.auth.enabled else p.tenant)

    async def read_part(form, name: str) -> bytes:
        part = form.get(name)
        if part is None or not isinstance(part, UploadFile):
            raise HTTPError(422, f"the upload needs a file field named {name!r}", "validation")
        data = await part.read(state.store.max_bytes + 1)
        if len(data) > state.store.max_bytes:
            raise HTTPError(413, f"{name} exceeds the upload limit of {state.store.max_bytes} bytes", "too_large")
        return data

    upload_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [CONFIG_NAME, WEIGHTS_NAME],
        "properties": {CONFIG_NAME: {"type": "string", "format": "binary"},
                       WEIGHTS_NAME: {"type": "string", "format": "binary"}}}}}}}

    @app.put("/v1/adapters/{adapter_id}", status_code=201, openapi_extra=upload_schema,
             summary="Upload or replace an adapter (multipart: adapter_config.json + adapter_model.safetensors)")
    async def put_adapter(adapter_id: str, request: Request):
        p = _principal(state, request)
        tenant = p.tenant
        if p.admin and "/" in adapter_id:
            tenant, adapter_id = adapter_id.split("/", 1)
        check_id("adapter id", adapter_id)
        try:
            form = await request.form(max_part_size=state.store.max_bytes + 1)
        except Exception as e:
            raise HTTPError(422, f"the upload is not a readable multipart form: {e}", "validation") from None
        config, weights = await read_part(form, CONFIG_NAME), await read_part(form, WEIGHTS_NAME)
        existed = any(e.adapter_id == adapter_id for e in state.store.list(tenant))
        entry, ad = await run_in_threadpool(state.store.put, tenant, adapter_id, config, weights)

        def publish():  # on the scheduler thread: running requests keep the old version
            state.residency.forget(tenant, adapter_id)
            state.residency.put_host(entry.key, ad)

        state.scheduler.post(publish)
        from fastapi.responses import JSONResponse

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
