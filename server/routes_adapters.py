"""Adapter management (/v1/adapters) and the OpenAI model list (/v1/models)."""

from __future__ import annotations

import errno
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from adapters.files import CONFIG_NAME, WEIGHTS_NAME
from typing import Annotated

from pydantic import Field

from server.schemas import Body, Name
from server.store import NotFound, check_id


class LoadLora(Body):
    lora_name: Name
    lora_path: Annotated[str, Field(max_length=4096)]


class UnloadLora(Body):
    lora_name: Name


def register_adapter_routes(app: FastAPI, state) -> None:
    from server.app import HTTPError, _principal, adapter_ref, resolve_adapter

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
        entry, existed = await store_and_publish(tenant, adapter_id, config, weights)
        return JSONResponse(info(entry), status_code=200 if existed else 201)

    async def store_and_publish(tenant: str, adapter_id: str, config: bytes, weights: bytes):
        """Validate and store a new version, then hand it to the scheduler's thread (running
        requests keep the old version). (entry, whether the id existed)."""
        existed = any(e.adapter_id == adapter_id for e in state.store.list(tenant))
        try:
            entry, ad = await run_in_threadpool(state.store.put, tenant, adapter_id, config, weights)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HTTPError(507, "the adapter store's disk is full; the upload was not stored "
                                     "(every earlier version is intact)", "insufficient_storage") from None
            raise

        def publish():
            state.residency.forget(tenant, adapter_id)
            state.residency.put_host(entry.key, ad)

        state.scheduler.post(publish)
        return entry, existed

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLora, request: Request):
        """vLLM's runtime adapter loading (what the Kubernetes inference gateway's adapter
        syncer calls): an adapter directory on the server's disk, under --lora-load-root only
        (off without it, as in vLLM), stored for the caller as `lora_name`."""
        p = _principal(state, request)
        root = state.lora_root
        if root is None:
            raise HTTPError(404, "loading adapters from server paths is off (start with --lora-load-root DIR)",
                            "not_found")
        check_id("adapter id", body.lora_name)
        path = (root / body.lora_path).resolve()  # an absolute lora_path stays absolute
        if not path.is_relative_to(root):
            raise HTTPError(422, "lora_path must be under the server's --lora-load-root", "validation",
                            param="lora_path")
        try:
            config = (path / CONFIG_NAME).read_bytes()
            wpath = path / WEIGHTS_NAME
            if wpath.stat().st_size > state.store.max_bytes:
                raise HTTPError(413, f"{WEIGHTS_NAME} exceeds the upload limit of {state.store.max_bytes} bytes",
                                "too_large")
            weights = wpath.read_bytes()
        except OSError as e:
            raise HTTPError(422, f"lora_path {body.lora_path!r} holds no readable adapter ({e.strerror})",
                            "validation", param="lora_path") from None
        await store_and_publish(p.tenant, body.lora_name, config, weights)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLora, request: Request):
        _principal(state, request)
        if state.lora_root is None:
            raise HTTPError(404, "loading adapters from server paths is off (start with --lora-load-root DIR)",
                            "not_found")
        await delete_adapter(body.lora_name, request)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

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
        ref = adapter_ref(state, p, adapter_id)  # not resolve_adapter: an adapter that does not load can go too
        try:
            if ref is None:
                raise NotFound(adapter_id)
            await run_in_threadpool(state.store.delete, *ref)
        except NotFound:
            raise HTTPError(404, f"adapter {adapter_id!r} not found", "not_found") from None
        state.scheduler.post(lambda: state.residency.forget(*ref))
        return {"id": ref[1], "deleted": True}

    def model_card(p, e=None) -> dict:
        if e is None:
            return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "qaa-serve",
                    "max_model_len": state.engine.max_seq_len}
        mid = e.adapter_id if e.tenant == p.tenant else f"{e.tenant}/{e.adapter_id}"
        return {"id": mid, "object": "model", "created": int(e.created), "owned_by": e.tenant,
                "parent": state.model_name, "root": state.model_name, "adapter_type": e.kind,
                "max_model_len": state.engine.max_seq_len}

    @app.get("/v1/models")
    async def models(request: Request):
        p = _principal(state, request)
        return {"object": "list", "data": [model_card(p)] + [model_card(p, e) for e in visible(p)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        """One model: the base model, or an adapter the caller may use (404 otherwise)."""
        p = _principal(state, request)
        return model_card(p, resolve_adapter(state, p, model_id))
