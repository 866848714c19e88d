"""Request bodies at the HTTP edge (the only place pydantic is used).

Every field is bounded here: numbers by range (no NaN or Infinity), strings and lists by
length. The limits an operator sets (max_new_tokens, stop strings, body bytes) are checked
against these values in server/app.py; these are the fixed outer bounds.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

INT32 = 2**31 - 1
NAME_CHARS = 256  # model, adapter ids (an admin's "tenant/id" included), user
MAX_STOP = 1024
STOP_CHARS = 4096
MAX_MESSAGES = 4096

Name = Annotated[str, Field(max_length=NAME_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TGIParameters(Body):
    """TGI / LoRAX `parameters`; fields of theirs we do not act on are accepted and ignored."""

    adapter_id: Name | None = None
    max_new_tokens: int | None = Field(default=None, ge=1, le=INT32)
    temperature: float | None = Field(default=None, gt=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=INT32)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    """TGI's seed is an unsigned 64-bit integer."""
    stop: StopList = Field(default_factory=list)
    details: bool = False
    do_sample: bool = False
    ignore_eos: bool = False
    """vLLM's extension: generate max_new_tokens whatever the model says (benchmarks)."""


class TGIRequest(Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class StreamOptions(Body):
    include_usage: bool = False
    """Send a last chunk with token usage and no choices (OpenAI, vLLM)."""


class _OpenAIBase(Body):
    model: Name
    max_tokens: int | None = Field(default=None, ge=1, le=INT32)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1, le=INT32)
    """vLLM's extension; 0 or -1 = off."""
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    """vLLM's extension."""
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    """OpenAI's seed is a signed 64-bit integer."""
    user: Name | None = None
    ignore_eos: bool = False
    """vLLM's extension."""


class CompletionRequest(_OpenAIBase):
    prompt: (str
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(min_length=1)])
    echo: bool = False


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32)
