"""TGI / LoRAX generation: POST /generate, /generate_stream and TGI's POST / (which streams
when `stream` is set), in TGI's shapes: details with every token and its logprob, top tokens,
and a stream whose last token event carries generated_text and details."""

from __future__ import annotations


from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from engine.errors import InputError
from server.schemas import TGIRequest
from server.requests import Event


def register_tgi_routes(app: FastAPI, state) -> None:
    from server.app import (
        _collect_all, _encode, _event_error_type, _events, _principal, _sampling, _sse, _start_all, _with_grammar,
    )

    tok = state.engine.tokenizer

    def token(ev: Event) -> dict:
        return {"id": ev.token_id, "text": ev.text, "logprob": ev.logprob[0] if ev.logprob else None,
                "special": ev.token_id in tok.eos_ids}

    def top(ev: Event) -> list[dict]:
        return [{"id": t, "text": tok.decode([t], skip_special_tokens=False), "logprob": lp,
                 "special": t in tok.eos_ids} for t, lp in (ev.logprob[1] if ev.logprob else [])]

    async def start(body: TGIRequest, request: Request):
        p = _principal(state, request)
        q = body.parameters
        sample = q.do_sample or (q.temperature is not None and q.temperature > 0)
        params = _sampling(
            state, q.stop, max_new_tokens=q.max_new_tokens or min(100, state.max_new_tokens),
            temperature=(q.temperature or 1.0) if sample else 0.0, top_k=q.top_k or 0, top_p=q.top_p or 1.0,
            repetition_penalty=q.repetition_penalty or 1.0, frequency_penalty=q.frequency_penalty or 0.0,
            seed=q.seed, ignore_eos=q.ignore_eos,
            # TGI reports every token's logprob (details, streams): one log-softmax per row and step
            logprobs=q.top_n_tokens or 0, prompt_logprobs=q.decoder_input_details)
        if q.grammar is not None:
            params = await _with_grammar(state, params, True, q.grammar.value, "grammar")
        ids = await _encode(state, body.inputs)
        if q.truncate is not None:
            ids = ids[-q.truncate:]
        k = q.best_of or 1
        if k > 1 and not sample:
            raise InputError("best_of > 1 needs sampling: set do_sample or a temperature above 0 (as TGI)")
        # as OpenAI's best_of: sequence i draws with seed + i
        reqs = await _start_all(state, p, q.adapter_id, ids, params, k, request=request)
        return reqs, q

    def final(req, q, events: list[Event], reason: str, prefix: str) -> dict:
        reason = {"stop": "eos_token", "length": "length"}.get(reason, reason)
        if reason == "eos_token" and events and events[-1].token_id not in tok.eos_ids:
            reason = "stop_sequence"  # a stop string or stop token, not EOS
        out = {"generated_text": prefix + "".join(e.text for e in events)}
        details = {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids), "generated_tokens": len(events),
                   "seed": req.params.seed}
        if q.details:
            prefill = [{"id": t, "text": tok.decode([t], skip_special_tokens=False), "logprob": lp[0] if lp else None}
                       for t, lp in zip(req.prompt_ids, req.seq.prompt_logprobs)] if q.decoder_input_details else []
            details.update(prefill=prefill, tokens=[token(e) for e in events])
            if q.top_n_tokens:
                details["top_tokens"] = [top(e) for e in events]
        return {**out, "details": details}

    @app.post("/")
    @app.post("/generate")
    async def generate(body: TGIRequest, request: Request):
        """TGI's /generate; TGI's POST / is the same route, streaming when `stream` is set."""
        if body.stream:
            return await generate_stream(body, request)
        reqs, q = await start(body, request)
        prefix = body.inputs if q.return_full_text else ""
        results = await _collect_all(state, reqs, request)
        outs = [final(r, q, evs, reason, prefix) for r, (evs, reason) in zip(reqs, results)]
        if len(outs) == 1:
            return outs[0]
        # the most likely sequence answers; TGI lists the others, best first, with its details
        score = [sum(e.logprob[0] for e in evs) for evs, _ in results]
        order = sorted(range(len(outs)), key=lambda i: -score[i])
        best, others = outs[order[0]], [outs[i] for i in order[1:]]
        if q.details:
            best["details"]["best_of_sequences"] = [{"generated_text": o["generated_text"], **o["details"]}
                                                    for o in others]
        return best

    @app.post("/generate_stream")
    async def generate_stream(body: TGIRequest, request: Request):
        q = body.parameters
        for name, on in (("decoder_input_details", q.decoder_input_details), ("best_of", (q.best_of or 1) > 1)):
            if on:
                raise InputError(f"{name} is not supported when streaming tokens (as TGI)")
        (req,), q = await start(body, request)
        prefix = body.inputs if q.return_full_text else ""

        def event(ev: Event, last: dict | None) -> str:
            out = {"index": len(seen), "token": token(ev), "generated_text": None, "details": None}
            if q.top_n_tokens:
                out["top_tokens"] = top(ev)
            return _sse({**out, **(last or {})})

        seen: list[Event] = []

        async def events():
            held = None  # the last token waits: TGI's final event is the last token's
            async for _, ev in _events(state, [req]):
                if ev.kind == "error":
                    if held is not None:
                        yield event(held, None)
                    yield _sse({"error": ev.message, "error_type": _event_error_type(ev)})
                    return
                if ev.kind == "token":
                    if held is not None:
                        yield event(held, None)
                    seen.append(ev)
                    held = ev
                    continue
                last = final(req, q, seen, ev.finish_reason, prefix)
                if held is not None:
                    yield event(held, {"generated_text": last["generated_text"], "details": last["details"]})
                else:  # finished before its first token (cancelled)
                    yield _sse({"index": 0, "token": None, **last})

        return StreamingResponse(events(), media_type="text/event-stream")
