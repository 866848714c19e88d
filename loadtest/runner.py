"""Run one workload against the server: open loop (arrivals on a clock) or closed loop.

Bounded in count and time: at most `requests` requests (or what arrives within
`duration`), each cut off after `request_timeout` seconds, so a run always ends by itself.
A failed request is recorded with its error kind and the run goes on.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx

from loadtest.client import Record, stream_completion
from loadtest.workload import Spec, Workload, specs


class Progress:
    """A live one-line status on stderr (rewritten in place on a terminal, a line every
    few seconds otherwise)."""

    def __init__(self, label: str, total: int | None, enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stderr.isatty()
        self.sent = self.done = self.errors = self.tokens = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def line(self) -> str:
        el = time.perf_counter() - self.t0
        of = f"/{self.total}" if self.total else ""
        return (f"[{self.label}] sent {self.sent}{of}  done {self.done}  errors {self.errors}  "
                f"{self.tokens / max(el, 1e-9):.1f} out tok/s  {el:.0f}s")

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            print("\r" + self.line().ljust(100), end="\n" if final else "", file=sys.stderr, flush=True)
        elif final or now - self._last >= 5:
            print(self.line(), file=sys.stderr, flush=True)
            self._last = now

    async def ticker(self) -> None:
        while True:
            self.show()
            await asyncio.sleep(0.5)


async def _one(client, url, model, rec, prompt, t0, api_key, timeout, progress: Progress) -> Record:
    progress.sent += 1
    try:
        await asyncio.wait_for(stream_completion(client, url, model, rec, prompt, t0, api_key, timeout), timeout)
    except asyncio.TimeoutError:
        rec.error = "timeout"
    progress.done += 1
    progress.errors += rec.error is not None
    progress.tokens += rec.output_tokens if rec.ok else 0
    return rec


async def run(w: Workload, url: str, adapter_ids: list[str], base_model: str, api_key: str | None = None,
              request_timeout: float = 300.0, label: str = "run", show_progress: bool = True) -> tuple[list[Record], float]:
    """Send the workload; return the records in request order and the wall time (seconds from
    the start to the last response)."""
    if w.n_adapters > len(adapter_ids):
        raise ValueError(f"the workload needs {w.n_adapters} adapters, {len(adapter_ids)} given")
    progress = Progress(label, w.requests, show_progress)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    records: list[Record] = []

    def start(s: Spec) -> tuple[Record, str]:
        adapter = None if s.adapter is None else adapter_ids[s.adapter]
        rec = Record(s.index, adapter, len(s.prompt), s.output_len)
        records.append(rec)
        return rec, adapter or base_model

    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        progress.t0 = t0
        ticker = asyncio.create_task(progress.ticker())
        try:
            if w.open_loop:
                tasks, due = [], 0.0
                for s in specs(w):
                    due += s.gap
                    delay = t0 + due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    rec, model = start(s)
                    tasks.append(asyncio.create_task(
                        _one(client, url, model, rec, s.prompt, t0, api_key, request_timeout, progress)))
                await asyncio.gather(*tasks)
            else:
                it = specs(w)

                async def worker():
                    for s in it:  # one shared iterator: each spec goes to exactly one worker
                        if w.duration is not None and time.perf_counter() - t0 > w.duration:
                            return
                        rec, model = start(s)
                        await _one(client, url, model, rec, s.prompt, t0, api_key, request_timeout, progress)

                await asyncio.gather(*(worker() for _ in range(w.concurrency)))
        finally:
            ticker.cancel()
            progress.show(final=True)
        ends = [r.end for r in records if r.end is not None]
        wall = (max(ends) if ends else time.perf_counter() - t0)
    records.sort(key=lambda r: r.index)
    return records, wall
