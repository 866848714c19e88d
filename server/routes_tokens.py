"""vLLM's /tokenize and /detokenize, and /version."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import FastAPI, Request
from pydantic import Field

from engine.engine import check_prompt_text
from server.schemas import INT32, MAX_MESSAGES, Body, ChatMessage, Name


class TokenizeRequest(Body):
    model: Name | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    """Chat messages, rendered by the chat template (instead of prompt)."""
    add_special_tokens: bool = True
    """For prompt: add the tokenizer's special tokens (BOS) as generation does."""
    add_generation_prompt: bool = True
    """For messages: end with the assistant turn's opening, as generation does."""


class DetokenizeRequest(Body):
    model: Name | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(max_length=1_000_000)]


def register_token_routes(app: FastAPI, state) -> None:
    from server.app import HTTPError, _principal

    eng = state.engine

    def tokenize_sync(body: TokenizeRequest) -> list[int]:
        if (body.prompt is None) == (body.messages is None):
            raise HTTPError(422, "send exactly one of prompt and messages", "validation")
        if body.messages is not None:
            text = eng.tokenizer.apply_chat_template([m.for_template() for m in body.messages],
                                                     add_generation_prompt=body.add_generation_prompt)
            check_prompt_text(text, eng.max_prompt_chars)
            return eng.tokenizer.encode(text, add_special_tokens=False)
        check_prompt_text(body.prompt, eng.max_prompt_chars)
        return eng.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        """The token ids generation would see for a prompt or chat messages (vLLM's shape)."""
        _principal(state, request)
        ids = await asyncio.to_thread(tokenize_sync, body)
        return {"count": len(ids), "max_model_len": eng.max_seq_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        _principal(state, request)
        bad = next((t for t in body.tokens if t >= eng.cfg.vocab_size), None)
        if bad is not None:
            raise HTTPError(422, f"token id {bad} is outside the vocabulary (0..{eng.cfg.vocab_size - 1})", "validation")
        return {"prompt": await asyncio.to_thread(eng.tokenizer.decode, body.tokens, False)}

    @app.get("/version")
    async def version():
        return {"version": app.version}
