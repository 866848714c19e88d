"""What one request may ask of the server, and the byte limit on request bodies.

Every tenant is untrusted: each number, string and list a request carries is bounded where it
enters (pydantic's fixed bounds in server/schemas.py, these configurable ones in server/app.py),
before the scheduler thread sees it. What an adapter may demand is adapters.base.Capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException

from server.errors import error


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 2_000_000
    """Largest JSON request body (TGI's default payload limit); refused with 413 before parsing."""
    max_upload_bytes: int = 512 * 2**20
    """Largest adapter upload (both files); refused with 413 while it streams in."""
    max_new_tokens: int = 1024
    """Largest max_new_tokens / max_tokens a request may ask for."""
    max_stop: int = 16
    """Most stop strings per request (each is searched for at every token)."""
    max_stop_chars: int = 256
    """Longest stop string."""

    @classmethod
    def from_args(cls, args, max_seq_len: int) -> "Limits":
        """qaa-serve's options (server/cli.py) for a context of max_seq_len."""
        return cls(max_request_bytes=args.max_request_bytes, max_upload_bytes=int(args.max_upload_mb * 2**20),
                   max_new_tokens=min(args.max_new_tokens, max_seq_len - 1), max_stop=args.max_stop,
                   max_stop_chars=args.max_stop_chars)

    def body_limit(self, method: str, path: str) -> int:
        # an upload carries the adapter's files plus multipart framing and the (small) config
        if method == "PUT" and path.startswith("/v1/adapters/"):
            return self.max_upload_bytes + 2**20
        return self.max_request_bytes


class BodyLimit:
    """ASGI middleware: a body over its limit gets 413, whether it says its length up front
    (refused before any byte is read) or streams (refused once the count passes the limit,
    so an oversized body is never held whole in memory or on disk)."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.body_limit(scope["method"], scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = (error(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes",
                              path=scope["path"], headers={"connection": "close"}) if length.isdigit()
                        else error(400, "content-length is not a number", path=scope["path"]))
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # raised inside the endpoint's read: the app's handler turns it into JSON
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)
