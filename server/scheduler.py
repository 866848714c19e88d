"""Continuous (iteration-level) batching on a thread of its own.

Each step: finish cancelled requests; admit waiting requests while KV slots allow and their
adapter is on the device (a request whose adapter is still loading stays queued and the
others go ahead); then one forward holds a token for every decoding request and, within the
step's token budget (`max_batched_tokens`), chunks of the prompts being prefilled, oldest
admission first, whatever their adapters and adapter types (chunked prefill: a long prompt
costs every running request a bounded delay per step, not its whole prefill at once). A
request leaves on EOS, a stop string, its token limit, cancellation or client disconnect,
and its KV slot and its adapter pin are released at once. Events reach the HTTP side
through each request's asyncio queue (call_soon_threadsafe), so the event loop never blocks
on the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from adapters.base import AdapterError
from engine.errors import QaaError
from server.logs import log_request
from server.requests import Draining, Event, QueueFull, Request
from server.residency import Residency

log = logging.getLogger("qaa_serve.scheduler")


PREFILL_TOKENS = 48
"""Prefill tokens per step beyond one per running request, unless told otherwise: on the CPU
a small chunk keeps the p99 inter-token latency near the median (docs/benchmarks.md)."""


class Scheduler:
    def __init__(self, engine, residency: Residency, max_running: int, max_waiting: int, metrics=None,
                 stall_seconds: float = 60.0, max_batched_tokens: int | None = None):
        self.engine, self.res, self.metrics = engine, residency, metrics
        self.max_running = min(max_running, engine.cache.n_slots)
        max_batched_tokens = max_batched_tokens or self.max_running + PREFILL_TOKENS
        if max_batched_tokens <= self.max_running:
            raise ValueError(f"max_batched_tokens ({max_batched_tokens}) must exceed the running requests' limit "
                             f"({self.max_running}): each step feeds every decoding request one token and "
                             "prefills with what is left")
        self.max_batched_tokens = max_batched_tokens
        self.max_waiting = max_waiting
        self.stall_seconds = stall_seconds
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.draining = False
        self.drain_deadline: float | None = None
        self.heartbeat = time.monotonic()  # the loop's last sign of life (see stalled)
        self.faults = None
        """Tests only: fault(stage, what) is called at 'admit', 'prefill' and 'decode' with the
        requests about to run, and may raise to stand for a failure there."""
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

    # --- called from other threads -------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self.cv:
            if self.draining:
                raise Draining("the server is shutting down")
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

    def stalled(self) -> bool:
        """Work is pending but the loop has not come round for stall_seconds (a step hangs)."""
        with self.cv:
            pending = bool(self.running or self.waiting or self.tasks)
        return pending and time.monotonic() - self.heartbeat > self.stall_seconds

    def idle(self) -> bool:
        with self.cv:
            return not self.running and not self.waiting

    def begin_drain(self, seconds: float) -> None:
        """Stop taking requests; those already taken may finish until `seconds` from now, then
        each still open ends with an error event saying the server shut down."""
        with self.cv:
            self.draining = True
            deadline = time.monotonic() + max(0.0, seconds)
            self.drain_deadline = min(self.drain_deadline or deadline, deadline)
            self.cv.notify()

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Drain (see begin_drain), then end the loop."""
        self.begin_drain(drain_seconds)
        while time.monotonic() < self.drain_deadline + 2 and not self.idle():
            time.sleep(0.02)
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # --- the scheduler thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not (self.stopping or self.running or self.tasks or self._admissible() or self._drain_due()):
                    self.heartbeat = time.monotonic()
                    self.cv.wait(timeout=0.5)
                self.heartbeat = time.monotonic()
                tasks, self.tasks = list(self.tasks), deque()
                if self.stopping:
                    self._end_all(Event("error", message="the server is shutting down", status=503), "cancelled")
                    return
            for fn in tasks:
                try:
                    fn()
                except Exception as e:  # a task is bookkeeping (publish, forget): never fatal
                    log.exception("scheduler task failed: %s", e)
            try:
                if self._drain_due():
                    self._end_all(Event("error", status=503, message="the server is shutting down and its drain "
                                        "deadline passed before this request finished"), "cancelled")
                if not self._step():
                    with self.cv:  # waiting on an adapter read: the loader's wake ends this early
                        self.cv.wait(timeout=0.05)
            except Exception as e:  # a fault outside any one request's work: fail what is running
                log.exception("scheduler step failed")
                for r in self.running:
                    self._fail(r, "step", e)
                self.running = []
            try:
                self._gauges()
            except Exception:
                log.exception("updating gauges failed")

    def _admissible(self) -> bool:
        # something waits and a slot is free (adapter readiness is checked in the step)
        return bool(self.waiting) and len(self.running) < self.max_running

    def _drain_due(self) -> bool:
        return (self.drain_deadline is not None and time.monotonic() >= self.drain_deadline
                and bool(self.running or self.waiting))

    def _end_all(self, ev: Event, outcome: str) -> None:
        with self.cv:
            reqs, self.running = list(self.waiting) + self.running, []
            self.waiting.clear()
        for r in reqs:
            r.emit(ev)
            self._release(r, outcome)

    def _step(self) -> bool:
        """One iteration; False when there was nothing to run."""
        for r in [r for r in self.running if r.cancelled]:
            self.running.remove(r)
            self._finish(r, "cancelled")
        if self.running:  # rows 0..n-1 in slot order: the step reads the KV cache as a view
            self.engine.compact([r.seq for r in self.running])
            self.running.sort(key=lambda r: r.seq.slot)
        admitted = self._admit()
        if admitted and self.metrics:
            now = time.perf_counter()
            for r in admitted:
                self.metrics.queue_time.labels(adapter_type=r.adapter_type).observe(now - r.arrived)
                self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        self.running += admitted
        work = self._plan()
        if not work:
            return False
        self._run(work)
        self.running = [r for r in self.running if not r.seq.finished]
        return True

    def _plan(self) -> list[tuple[Request, int]]:
        """This step's work: (request, tokens to feed). Every decoding request feeds its last
        token; what is left of the budget goes to prefill chunks, oldest admission first."""
        work = [(r, 1) for r in self.running if not r.seq.prefilling]
        left = self.max_batched_tokens - len(work)
        for r in sorted((r for r in self.running if r.seq.prefilling), key=lambda r: r.admitted):
            if left <= 0:
                break
            n = min(left, len(r.seq.prompt_ids) - r.seq.prefilled)
            work.append((r, n))
            left -= n
        return work

    def _run(self, work: list[tuple[Request, int]]) -> None:
        """One forward over `work`.

        A forward that raises has changed no sequence (engine.steps samples before it
        appends and moves a prefill on only when the step succeeds), so it is run again one
        request at a time: a failure that one request causes fails that request alone, and
        the others lose nothing but time. Tokens are delivered only after the forwards, so a
        retry never repeats a delivered step."""
        stages = {r.id: "prefill" if r.seq.prefilling else "decode" for r, _ in work}
        try:
            done = [(work, self._forward(work))]
        except Exception as e:
            if len(work) == 1:
                self._fail(work[0][0], stages[work[0][0].id], e)
                return
            done = []
            for w in work:
                try:
                    done.append(([w], self._forward([w])))
                except Exception as e:
                    self._fail(w[0], stages[w[0].id], e)
        for ws, texts in done:
            self._deliver([r for r, _ in ws], texts)

    def _forward(self, work: list[tuple[Request, int]]) -> list[str | None]:
        if self.faults is not None:
            for stage in ("prefill", "decode"):
                reqs = [r for r, _ in work if r.seq.prefilling == (stage == "prefill")]
                if reqs:
                    self.faults(stage, reqs)
        # engine.steps.step, or with --compile the captured step for steps that only decode
        return self.engine.step(self.engine.model, self.engine.cache, [(r.seq, n) for r, n in work], self.engine.seams_for)

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
            try:
                if r.entry is not None:
                    err = self.res.take_failure(r.entry.key)
                    if err is not None:
                        raise err
                    r.handle = self.res.acquire(r.entry)
                    if r.handle is None:
                        continue  # still loading or no free slot: later requests may go ahead
                if self.faults is not None:
                    self.faults("admit", [r])
                r.seq = self.engine.new_sequence(r.prompt_ids, r.params, r.handle)
                r.admitted = time.perf_counter()
                self.engine.admit(r.seq)
            except Exception as e:
                self._drop_waiting(r)
                self._fail(r, "admission" if r.entry is None or r.handle is not None else "adapter load", e)
                continue
            self._drop_waiting(r)
            admitted.append(r)
        return admitted

    def _drop_waiting(self, r: Request) -> None:
        with self.cv:
            try:
                self.waiting.remove(r)
            except ValueError:
                pass

    def _deliver(self, reqs: list[Request], texts: list[str | None]) -> None:
        now = time.perf_counter()
        for r, text in zip(reqs, texts):
            if r.seq.error is not None:
                self._fail(r, "generation", r.seq.error)
                continue
            if text is None:  # a prefill chunk that did not reach the prompt's end
                continue
            tok = r.seq.out_ids[-1]
            if self.metrics:
                self.metrics.generation_tokens.inc()
                if r.first_token is None:
                    self.metrics.ttft.labels(adapter_type=r.adapter_type).observe(now - r.arrived)
                else:
                    self.metrics.itl.labels(adapter_type=r.adapter_type).observe(now - r.last_token)
            r.first_token = r.first_token or now
            r.last_token = now
            r.emit(Event("token", tok, text, logprob=r.seq.logprobs[-1] if r.seq.logprobs else None))
            if r.seq.finished:
                self._finish(r, r.seq.finish_reason)

    def _finish(self, r: Request, reason: str) -> None:
        if r.seq is not None and r.seq.finish_reason is None:
            r.seq.finish_reason = reason
        r.emit(Event("done", finish_reason=reason))
        self._release(r, reason)

    def _fail(self, r: Request, stage: str, e: Exception) -> None:
        """End one request with an error event that names what failed; free what it holds."""
        if r.seq is not None and r.seq.finish_reason is None:
            r.seq.finish_reason = "error"
        bad_input = isinstance(e, (QaaError, AdapterError))  # the request's or its adapter's fault
        if not bad_input:
            log.warning("request %s failed in %s: %r", r.id, stage, e)
        r.emit(Event("error", message=f"{stage} failed: {e}", status=422 if bad_input else 500))
        self._release(r, "error")

    def _release(self, r: Request, outcome: str) -> None:
        """Free a request's KV slot and adapter pin and count its outcome, exactly once."""
        if r.released:
            return
        r.released = True
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
            self.metrics.adapters_pinned.set(sum(self.res.pins.values()))
            with self.cv:
                waiting = [r.entry for r in self.waiting if r.entry is not None]
            running = [r.entry for r in self.running if r.entry is not None]
            self.metrics.set_lora_requests(self.res.max_device, [(e.tenant, e.adapter_id) for e in running],
                                           [(e.tenant, e.adapter_id) for e in waiting])
