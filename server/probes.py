"""Kubernetes probes, split the way Kubernetes uses them (`/health` answers 503 for either).
Readiness: the model is loaded (the app exists only after it is) and the server is not
draining, so a rollout stops sending to a pod that is shutting down. Liveness: the scheduler
is making progress (Scheduler.stalled: work pending and no loop for --stall-seconds), so a
hung pod is restarted but a draining one is not."""

from __future__ import annotations



def register_probes(app, state) -> None:
    from server.errors import error

    @app.get("/health/ready")
    async def ready():
        if state.scheduler.draining:
            return error(503, "the server is shutting down", "unavailable")
        return {"status": "ready", "model": state.model_name}

    @app.get("/health/live")
    async def live():
        if state.scheduler.stalled():
            return error(503, f"the scheduler has made no progress for over {state.scheduler.stall_seconds:g} s "
                              "with requests pending", "stalled")
        return {"status": "live"}
