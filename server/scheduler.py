"""Continuous (iteration-level) batching on a thread of its own.

Each step: finish cancelled requests; admit waiting requests while KV slots allow and their
adapter is on the device (a request whose adapter is still loading stays queued and the
others go ahead); prefill the admitted ones together; decode one token for every running
request in one forward, whatever their adapters and adapter types. A request leaves on EOS,
a stop string, its token limit, cancellation or client disconnect, and its KV slot and its
adapter pin are released at once. Events reach the HTTP side through each request's asyncio
queue (call_soon_threadsafe), so the event loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from engine.sampling import SamplingParams
from engine.steps import Sequence, decode, prefill
from server.logs import log_request
from server.residency import Residency
from server.store import Entry


class QueueFull(Exception):
    pass


@dataclass
class Event:
    kind: str
    """'token' (text may be empty while UTF-8 is incomplete), 'done' or 'error'."""
    token_id: int = -1
    text: str = ""
    finish_reason: str | None = None
    message: str = ""


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

    @property
    def adapter_type(self) -> str:
        return self.entry.kind if self.entry is not None else "base"

    def emit(self, ev: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)


class Scheduler:
    def __init__(self, engine, residency: Residency, max_running: int, max_waiting: int, metrics=None):
        self.engine, self.res, self.metrics = engine, residency, metrics
        self.max_running = min(max_running, engine.cache.n_slots)
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.draining = False
        self.tasks: deque = deque()  # callables the scheduler thread runs (it owns the banks)
        residency.wake = self.wake
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        """Run the loop on a thread of its own (tests, embedding). `qaa-serve` calls run() on
        the main thread instead: the main thread loaded the model, so it owns torch's OpenMP
        team, and a second team started from a scheduler thread makes libgomp stop spinning
        between regions (see adapters.threads; 2x on a mixed-adapter decode step, measured)."""
        self.thread.start()

    def run(self) -> None:
        """Run the loop on the calling thread until stop()."""
        self._loop()

    # --- called from the event loop ------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self.cv:
            if self.draining:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(req)
            self.cv.notify()

    def cancel(self, req: Request) -> None:
        with self.cv:
            req.cancelled = True
            self.cv.notify()

    def post(self, fn) -> None:
        """Run fn on the scheduler thread before its next step."""
        with self.cv:
            self.tasks.append(fn)
            self.cv.notify()

    def wake(self) -> None:
        with self.cv:
            self.cv.notify()

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop admitting; let running and queued requests finish for up to drain_seconds,
        then cancel whatever is left and end the thread."""
        with self.cv:
            self.draining = True
            self.cv.notify()
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline:
            with self.cv:
                if not self.running and not self.waiting:
                    break
            time.sleep(0.02)
        with self.cv:
            for r in list(self.waiting) + self.running:
                r.cancelled = True
            self.stopping = True
            self.cv.notify()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # --- the scheduler thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.running and not self.tasks and not self._admissible():
                    self.cv.wait(timeout=0.5)
                tasks, self.tasks = list(self.tasks), deque()
                if self.stopping:
                    for r in list(self.waiting) + self.running:
                        self._finish(r, "cancelled")
                    self.waiting.clear()
                    self.running.clear()
                    return
            for fn in tasks:
                fn()
            try:
                if not self._step():
                    with self.cv:  # waiting on an adapter read: the loader's wake ends this early
                        self.cv.wait(timeout=0.05)
            except Exception as e:  # a failed forward fails the requests in it, not the server
                for r in self.running:
                    r.emit(Event("error", message=f"generation failed: {e}"))
                    self._release(r, "error")
                self.running = []
            self._gauges()

    def _admissible(self) -> bool:
        # something waits and a slot is free (adapter readiness is checked in the step)
        return bool(self.waiting) and len(self.running) < self.max_running

    def _step(self) -> bool:
        """One iteration; False when there was nothing to run."""
        for r in [r for r in self.running if r.cancelled]:
            self.running.remove(r)
            self._finish(r, "cancelled")
        if self.running:  # rows 0..n-1 in slot order: the step reads the KV cache as a view
            self.engine.compact([r.seq for r in self.running])
            self.running.sort(key=lambda r: r.seq.slot)
        admitted = self._admit()
        now = time.perf_counter()
        if admitted:
            if self.metrics:
                for r in admitted:
                    self.metrics.queue_time.labels(adapter_type=r.adapter_type).observe(now - r.arrived)
                    self.metrics.prompt_tokens.inc(len(r.prompt_ids))
            seqs = [r.seq for r in admitted]
            self._deliver(admitted, prefill(self.engine.model, self.engine.cache, seqs, self.engine.seams_for(seqs)))
        if self.running:
            seqs = [r.seq for r in self.running]
            self._deliver(self.running, decode(self.engine.model, self.engine.cache, seqs, self.engine.seams_for(seqs)))
        ran = bool(admitted or self.running)
        self.running = [r for r in self.running + admitted if not r.seq.finished]
        return ran

    def _admit(self) -> list[Request]:
        admitted = []
        with self.cv:
            candidates = list(self.waiting)
        for r in candidates:
            if len(self.running) + len(admitted) >= self.max_running:
                break
            if r.cancelled:
                self._drop_waiting(r)
                self._finish(r, "cancelled")
                continue
            handle = None
            if r.entry is not None:
                err = self.res.take_failure(r.entry.key)
                if err is not None:
                    self._drop_waiting(r)
                    r.emit(Event("error", message=f"adapter could not be loaded: {err}"))
                    self._count(r, "error")
                    continue
                handle = self.res.acquire(r.entry)
                if handle is None:
                    continue  # still loading or no free slot: later requests may go ahead
            r.handle = handle
            r.seq = self.engine.new_sequence(r.prompt_ids, r.params, handle)
            r.admitted = time.perf_counter()
            self.engine.admit(r.seq)
            self._drop_waiting(r)
            admitted.append(r)
        return admitted

    def _drop_waiting(self, r: Request) -> None:
        with self.cv:
            try:
                self.waiting.remove(r)
            except ValueError:
                pass

    def _deliver(self, reqs: list[Request], texts: list[str]) -> None:
        now = time.perf_counter()
        for r, text in zip(reqs, texts):
            tok = r.seq.out_ids[-1]
            if self.metrics:
                self.metrics.generation_tokens.inc()
                if r.first_token is None:
                    self.metrics.ttft.labels(adapter_type=r.adapter_type).observe(now - r.arrived)
                else:
                    self.metrics.itl.labels(adapter_type=r.adapter_type).observe(now - r.last_token)
            r.first_token = r.first_token or now
            r.last_token = now
            r.emit(Event("token", tok, text))
            if r.seq.finished:
                self._finish(r, r.seq.finish_reason)

    def _finish(self, r: Request, reason: str) -> None:
        if r.seq is not None and r.seq.finish_reason is None:
            r.seq.finish_reason = reason
        r.emit(Event("done", finish_reason=reason))
        self._release(r, reason)

    def _release(self, r: Request, outcome: str) -> None:
        if r.seq is not None and r.seq.slot >= 0:
            self.engine.cache.free(r.seq.slot)
            r.seq.slot = -1
            if r.handle is not None:
                self.res.release(r.handle, r.entry.key)
                r.handle = None
            if self.metrics and r.first_token is not None:
                self.metrics.e2e.labels(adapter_type=r.adapter_type).observe(time.perf_counter() - r.arrived)
        self._count(r, outcome)

    def _count(self, r: Request, outcome: str) -> None:
        log_request(r, outcome)
        if self.metrics:
            self.metrics.requests.labels(outcome=outcome, adapter_type=r.adapter_type).inc()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))
            self.metrics.kv_usage.set(self.engine.cache.usage())
            self.metrics.adapters_resident.labels(tier="device").set(len(self.res.device))
            self.metrics.adapters_resident.labels(tier="host").set(len(self.res.host))
