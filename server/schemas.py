"""Request bodies at the HTTP edge (the only place pydantic is used)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TGIParameters(BaseModel):
    """TGI / LoRAX `parameters`; fields of theirs we do not act on are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    adapter_id: str | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    details: bool = False
    do_sample: bool = False
    ignore_eos: bool = False
    """vLLM's extension: generate max_new_tokens whatever the model says (benchmarks)."""


class TGIRequest(BaseModel):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    """Send a last chunk with token usage and no choices (OpenAI, vLLM)."""


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    """vLLM's extension."""
    repetition_penalty: float = Field(default=1.0, gt=0)
    """vLLM's extension."""
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False
    """vLLM's extension."""


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str] | list[int]
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
