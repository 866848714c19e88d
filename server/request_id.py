"""X-Request-Id: echoed when the client sends a usable one, generated otherwise, on every
response (errors included), so a client, a proxy and the server's logs name one request alike."""

from __future__ import annotations

import re
import uuid

HEADER = b"x-request-id"
USABLE = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")


class RequestId:
    """ASGI middleware; the id is also put in scope["state"]["request_id"] for the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(HEADER, b"")
        rid = given if USABLE.match(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
