"""A generation request as the scheduler holds it, the events it sends back to the HTTP side,
and the refusals of a full or closing queue."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from engine.sampling import SamplingParams
from engine.steps import Sequence
from server.store import Entry


class QueueFull(Exception):
    pass


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class Event:
    kind: str
    """'token' (text may be empty while UTF-8 is incomplete), 'done' or 'error'."""
    token_id: int = -1
    text: str = ""
    finish_reason: str | None = None
    message: str = ""
    logprob: tuple | None = None
    """For 'token' with logprobs asked for: (logprob, [(id, logprob)] of the top ones)."""
    status: int = 500
    """For 'error': the HTTP status that fits (422 the request's or adapter's fault, 503
    shutting down, 500 the server's)."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    entry: Entry | None
    """The stored adapter version to use, None for the base model."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    seq: Sequence | None = None
    handle: object = None
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    released: bool = False
    tenant: str | None = None
    """Who sent it (for its log line; adapters carry their own tenant)."""
    request_id: str | None = None
    """The X-Request-Id it came with (or was given)."""
    user: str | None = None
    """OpenAI's end-user id, when the client sent one (recorded in the log line)."""

    @property
    def adapter_type(self) -> str:
        return self.entry.kind if self.entry is not None else "base"

    def emit(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the event loop has closed: no one is left to tell
            self.cancelled = True
