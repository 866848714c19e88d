"""Every error the HTTP API answers with, the framework's own included, as JSON.

On the OpenAI routes (/v1/completions, /v1/chat/completions, /v1/models, and vLLM's
/v1/load_lora_adapter, /v1/unload_lora_adapter, /tokenize, /detokenize) the body is OpenAI's
error object {"error": {"message", "type", "param", "code"}} and bad input is a 400, so the
`openai` SDK raises its typed exceptions with our message. Elsewhere (TGI's routes, adapters,
health) it is {"error": message, "error_type": kind} with 422 for bad input, as TGI does.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.base import AdapterError
from engine.errors import QaaError

ERROR_TYPES = {400: "validation", 401: "authentication", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 422: "validation", 429: "overloaded", 503: "unavailable",
               507: "insufficient_storage"}
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable"}
# OpenAI's routes and vLLM's extensions (which answer with OpenAI's error object too)
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
                "/v1/unload_lora_adapter", "/tokenize", "/detokenize")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, error_type: str, headers: dict | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers, self.param = status, message, error_type, headers, param


def is_openai(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def error(status, message, error_type=None, headers=None, path: str = "", param: str | None = None):
    error_type = error_type or ERROR_TYPES.get(status, "internal")
    if is_openai(path):
        status = 400 if status == 422 else status
        body = {"error": {"message": message, "type": OPENAI_TYPES.get(status, "server_error"), "param": param,
                          "code": error_type}}
    else:
        body = {"error": message, "error_type": error_type}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return error(e.status, e.message, e.error_type, e.headers, request.url.path, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _framework(request: Request, e: StarletteHTTPException):
        # unknown routes, wrong methods, unreadable bodies, the body limit
        msg = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return error(e.status_code, msg, headers=getattr(e, "headers", None), path=request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error(500, f"internal error: {type(e).__name__}", "internal", path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        # a union (stop: str | list) reports each branch; the one about the value says most
        first = next((x for x in errs if not x.get("type", "").endswith("_type")), errs[0] if errs else {})
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        return error(422, f"{where}: {msg}"[:1000], "validation", path=request.url.path,
                     param=where.split(".")[0] or None)

    @app.exception_handler(QaaError)
    async def _input(request: Request, e: QaaError):
        return error(422, str(e), "validation", path=request.url.path)

    @app.exception_handler(AdapterError)
    async def _adapter(request: Request, e: AdapterError):
        return error(422, str(e), "adapter", path=request.url.path)


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, with the error body every route really answers with declared for
    every 4xx and 5xx (in place of FastAPI's {"detail"} shape), and uploads' 200 (replaced)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = {"type": "object", "required": ["error", "error_type"],
                        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}}
    schemas["OpenAIError"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    for k in ("HTTPValidationError", "ValidationError"):
        schemas.pop(k, None)
    for path, ops in schema["paths"].items():
        ref = "#/components/schemas/" + ("OpenAIError" if is_openai(path) else "Error")
        err = {"content": {"application/json": {"schema": {"$ref": ref}}}}
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
