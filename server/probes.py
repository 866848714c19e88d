"""Kubernetes probes. Readiness: the model is loaded (the app exists only after it is) and the
server is not draining. Liveness: the scheduler is making progress: while requests are running
or waiting, a step must end at least every `stall_seconds` (each step's end is published as
the value of vllm:lora_requests_info)."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse


def register_probes(app, state, stall_seconds: float = 60.0) -> None:
    seen = {"stamp": None, "since": 0.0}  # the last step time a probe saw, and since when

    @app.get("/health/ready")
    async def ready():
        if state.scheduler.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ready", "model": state.model_name}

    @app.get("/health/live")
    async def live():
        s, now = state.scheduler, time.monotonic()
        stamp = state.metrics.lora_info.stamp
        if not (s.running or s.waiting) or stamp != seen["stamp"]:
            seen["stamp"], seen["since"] = stamp, now
        stuck = now - seen["since"]
        if stuck > stall_seconds:
            return JSONResponse({"status": "stalled", "seconds_without_a_step": round(stuck, 1)}, status_code=503)
        return {"status": "live"}
