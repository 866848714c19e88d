"""OpenAI-compatible /v1/completions and /v1/chat/completions, streamed or not.

A request with n (or best_of) > 1 runs as that many generations side by side in the batch;
with a seed, generation i uses seed + i, so the n completions differ and repeat exactly.
best_of > n keeps the n with the highest total log-probability (as OpenAI does).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from engine.sampling import SamplingParams
from server.schemas import ChatRequest, CompletionRequest
from server.requests import Event


def register_openai_routes(app: FastAPI, state) -> None:
    from server.app import (
        HTTPError, _collect_all, _encode, _event_error_type, _events, _principal, _sampling, _sse, _start_all, _with_grammar,
    )

    async def constrained(body, params: SamplingParams) -> SamplingParams:
        if body.response_format is None:
            return params
        try:
            on, schema = body.response_format.grammar_schema()
        except ValueError as e:
            raise HTTPError(422, str(e), "validation", param="response_format") from None
        return await _with_grammar(state, params, on, schema, "response_format")

    def params_of(body, max_tokens) -> tuple[SamplingParams, bool]:
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        vocab = state.engine.cfg.vocab_size
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        for t in [*bias, *(body.stop_token_ids or [])]:
            if t >= vocab:
                raise HTTPError(422, f"token id {t} is outside the vocabulary (0..{vocab - 1})", "validation")
        # no max_tokens: up to the context (OpenAI's default), bounded by --max-new-tokens (_start)
        return _sampling(state, stop, max_new_tokens=max_tokens or state.max_new_tokens,
                         temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k),
                         repetition_penalty=body.repetition_penalty, seed=body.seed, ignore_eos=body.ignore_eos,
                         presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                         logit_bias=bias, min_tokens=body.min_tokens, stop_token_ids=list(body.stop_token_ids or []),
                         logprobs=body.wanted_logprobs()), max_tokens is None

    async def start_all(p, body, ids, params: SamplingParams, fit: bool, request: Request):
        """The request's n (or best_of) generations, queued together."""
        k = max(body.n, body.best_of or 1)
        if k > 1 and body.stream and (body.best_of or 1) > body.n:
            raise HTTPError(422, "best_of > n cannot be streamed", "validation", param="best_of")
        if k > 1 and (body.best_of or 1) > body.n and params.logprobs is None:
            params = dataclasses.replace(params, logprobs=0)  # ranking needs each token's logprob
        return await _start_all(state, p, body.model, ids, params, k, fit, request, body.user)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        p = _principal(state, request)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        params, fit = params_of(body, body.max_tokens)
        params = await constrained(body, params)
        ids = await _encode(state, prompt)
        if body.echo and body.logprobs is not None:  # the echoed prompt comes with its tokens' logprobs
            params = dataclasses.replace(params, prompt_logprobs=True)
        reqs = await start_all(p, body, ids, params, fit, request)
        echo = (prompt if isinstance(prompt, str) else state.engine.tokenizer.decode(ids)) if body.echo else ""
        return await respond(reqs, request, body, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        p = _principal(state, request)
        params, fit = params_of(body, body.max_completion_tokens or body.max_tokens)
        params = await constrained(body, params)
        ids = await _encode(state, [m.for_template() for m in body.messages], chat=True)
        reqs = await start_all(p, body, ids, params, fit, request)
        return await respond(reqs, request, body, chat=True)

    def token_str(t: int) -> str:
        return state.engine.tokenizer.decode([t], skip_special_tokens=False)

    def logprobs_of(events: list[Event], chat: bool, offset: int = 0) -> dict | None:
        events = [e for e in events if e.logprob is not None]
        if not events:
            return None
        if chat:
            def entry(t, lp):
                s = token_str(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(e.token_id, e.logprob[0]),
                                 "top_logprobs": [entry(t, lp) for t, lp in e.logprob[1]]} for e in events]}
        offsets, pos = [], offset
        for e in events:
            offsets.append(pos)
            pos += len(e.text)
        return {"tokens": [token_str(e.token_id) for e in events], "token_logprobs": [e.logprob[0] for e in events],
                "top_logprobs": [top_by_text(e.logprob[1]) for e in events],
                "text_offset": offsets}

    def top_by_text(pairs) -> dict:
        """OpenAI's top_logprobs map text -> logprob; tokens of one text (byte pieces) keep the
        most likely's logprob (pairs come most likely first)."""
        out = {}
        for t, lp in pairs:
            out.setdefault(token_str(t), lp)
        return out

    def prompt_logprobs_of(req) -> dict:
        """The echoed prompt's part of a completion's logprobs: each prompt token, the first
        without a logprob (nothing comes before it), as OpenAI's legacy completions give it."""
        toks, offsets, pos = [], [], 0
        for t in req.prompt_ids:
            toks.append(token_str(t))
            offsets.append(pos)
            pos += len(toks[-1])
        entries = req.seq.prompt_logprobs
        return {"tokens": toks, "token_logprobs": [e[0] if e else None for e in entries],
                "top_logprobs": [top_by_text(e[1]) if e else None for e in entries],
                "text_offset": offsets}

    def with_prompt(req, lps: dict | None) -> dict:
        head = prompt_logprobs_of(req)
        return {k: head[k] + (lps[k] if lps else []) for k in head}

    async def respond(reqs, request: Request, body, chat: bool, echo: str = ""):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, model = int(time.time()), body.model
        obj = "chat.completion" if chat else "text_completion"
        n_prompt = len(reqs[0].prompt_ids)
        if not body.stream:
            results = await _collect_all(state, reqs, request)
            used = sum(len(evs) for evs, _ in results)
            ranked = list(zip(reqs, results))
            if len(results) > body.n:  # best_of: the n most likely completions
                ranked = sorted(ranked, key=lambda x: -sum(e.logprob[0] for e in x[1][0]))[: body.n]
            choices = []
            for i, (req, (evs, reason)) in enumerate(ranked):
                text = "".join(e.text for e in evs)
                lps = logprobs_of(evs, chat, len(echo)) if body.wanted_logprobs() is not None else None
                if echo and req.params.prompt_logprobs:
                    lps = with_prompt(req, lps)
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                                "finish_reason": reason} if chat else
                               {"index": i, "text": echo + text, "finish_reason": reason, "logprobs": lps})
            usage = {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}

        usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if usage else {}
        chunk_obj = obj + ".chunk" if chat else obj

        def chunk(choices, **kw):
            return _sse({"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": choices, **kw})

        async def events():
            first, used = [True] * len(reqs), 0
            scored = echo and reqs[0].params.prompt_logprobs  # each echo comes with its first event
            if echo and not scored:
                yield chunk([{"index": i, "text": echo, "finish_reason": None, "logprobs": None}
                             for i in range(len(reqs))], **extra)
            async for i, ev in _events(state, reqs):
                if scored and first[i] and ev.kind != "error":
                    yield chunk([{"index": i, "text": echo, "finish_reason": None,
                                  "logprobs": with_prompt(reqs[i], None)}], **extra)
                used += ev.kind == "token"
                if ev.kind == "error":  # the final event says why; clients stop at [DONE]
                    yield _sse({"error": {"message": ev.message, "type": _event_error_type(ev), "code": ev.status}})
                    yield "data: [DONE]\n\n"
                    return
                reason = ev.finish_reason if ev.kind == "done" else None
                if ev.kind == "token" and not ev.text and not first[i] and ev.logprob is None:
                    continue
                lps = logprobs_of([ev], chat, 0) if ev.kind == "token" else None
                if chat:
                    delta = {"role": "assistant", "content": ev.text} if first[i] else (
                        {"content": ev.text} if ev.text else {})
                    choice = {"index": i, "delta": delta, "logprobs": lps, "finish_reason": reason}
                else:
                    choice = {"index": i, "text": ev.text, "finish_reason": reason, "logprobs": lps}
                first[i] = False
                yield chunk([choice], **extra)
            if usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
                yield chunk([], usage={"prompt_tokens": n_prompt, "completion_tokens": used,
                                       "total_tokens": n_prompt + used})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
