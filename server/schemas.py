"""Request bodies at the HTTP edge (the only place pydantic is used).

Every field is bounded here: numbers by range (no NaN or Infinity), strings and lists by
length. The limits an operator sets (max_new_tokens, stop strings, body bytes) are checked
against these values in server/app.py; these are the fixed outer bounds.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT32 = 2**31 - 1
NAME_CHARS = 256  # model, adapter ids (an admin's "tenant/id" included), user
MAX_STOP = 1024
STOP_CHARS = 4096
MAX_MESSAGES = 4096
MAX_TOKEN_LIST = 1024  # logit_bias entries, stop_token_ids
MAX_N = 16  # completions per request (n, best_of): each is a generation in the batch
MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs

# OpenAI request fields this server does not implement yet: refused (never silently ignored)
# unless they carry their "off" value.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "suffix": (None, ""),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]), "store": (None, False),
    "web_search_options": (None,), "reasoning_effort": (None,),
}

Name = Annotated[str, Field(max_length=NAME_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TGIGrammar(Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["json", "json_object"]
    """JSON grammars only; TGI's regex grammar is refused."""
    value: dict | None = None


class TGIParameters(Body):
    """TGI / LoRAX `parameters`. Every one of TGI's parameters is implemented or refused by
    name; an unknown parameter is an error (nothing a client sends is silently ignored)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    adapter_id: Name | None = None
    max_new_tokens: int | None = Field(default=None, ge=1, le=INT32)
    temperature: float | None = Field(default=None, gt=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=INT32)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    """TGI's seed is an unsigned 64-bit integer."""
    stop: StopList = Field(default_factory=list)
    details: bool = False
    """Return finish reason, token count, seed and every token with its logprob."""
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """With each token, this many most likely ones."""
    return_full_text: bool = False
    """Prepend the prompt to generated_text."""
    truncate: int | None = Field(default=None, ge=1, le=INT32)
    """Keep only the last `truncate` prompt tokens."""
    do_sample: bool = False
    ignore_eos: bool = False
    """vLLM's extension: generate max_new_tokens whatever the model says (benchmarks)."""
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    """Sample this many sequences (seeds seed, seed + 1, ...) and return the most likely;
    the others in details.best_of_sequences. Needs sampling; not with streaming, as TGI."""
    decoder_input_details: bool = False
    """With details: every prompt token with its logprob given the ones before it
    (details.prefill; the first has none). Not with streaming, as TGI."""
    typical_p: None = None
    """Typical sampling is not implemented: refused when set."""
    watermark: Literal[False] = False
    """Watermarking is not implemented: refused when true."""
    grammar: TGIGrammar | None = None
    """TGI's grammar: {"type": "json", "value": schema} constrains the output to the schema."""
    adapter_source: Literal["local", None] = None
    """LoRAX: adapters come from this server's store only."""


class TGIRequest(Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class JsonSchemaSpec(Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    name: Name | None = None
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict | None = Field(default=None, alias="schema")
    """The JSON Schema the output must be valid under (size bounded where it is compiled)."""
    strict: bool | None = None
    """Always strict here: the output is constrained to the schema token by token."""


class ResponseFormat(Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    value: dict | None = None
    """TGI-style schema on json_object (what huggingface_hub sends for json_schema)."""

    def grammar_schema(self) -> tuple[bool, dict | None]:
        """(whether the output is constrained to JSON, the schema or None for any JSON)."""
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            return True, self.json_schema.schema_
        return self.type == "json_object", self.value


class StreamOptions(Body):
    include_usage: bool = False
    """Send a last chunk with token usage and no choices (OpenAI, vLLM)."""


class _OpenAIBase(Body):
    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, data):
        if isinstance(data, dict):
            for k, off in UNSUPPORTED.items():
                if k in data and not any(data[k] == v and type(data[k]) is type(v) for v in off):
                    raise ValueError(f"{k} is not supported by this server (send it unset)")
        return data

    model: Name
    max_tokens: int | None = Field(default=None, ge=1, le=INT32)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1, le=INT32)
    """vLLM's extension; 0 or -1 = off."""
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    """vLLM's extension."""
    n: int = Field(default=1, ge=1, le=MAX_N)
    """Completions to return; with a seed, completion i is drawn with seed + i."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    """OpenAI's seed is a signed 64-bit integer."""
    user: Name | None = None
    ignore_eos: bool = False
    """vLLM's extension."""
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(ge=-100, le=100)]] \
        | None = Field(default=None, max_length=MAX_TOKEN_LIST)
    """Token id (as a string, as OpenAI sends it) -> bias added to its logit."""
    min_tokens: int = Field(default=0, ge=0, le=INT32)
    """vLLM's extension: no EOS or stop token before this many tokens."""
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(max_length=MAX_TOKEN_LIST)] | None = None
    """vLLM's extension: token ids that end generation."""
    response_format: ResponseFormat | None = None
    """json_object: the output is JSON; json_schema: JSON valid under the schema (constrained decoding)."""


class CompletionRequest(_OpenAIBase):
    prompt: (str
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(min_length=1)])
    echo: bool = False
    """Return the prompt before the completion."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """Each token's logprob and this many most likely alternatives."""
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    """Generate this many and return the n with the highest total logprob."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be >= n")
        return self

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


class ContentPart(Body):
    type: Literal["text"]
    """Only text parts are served; an image or audio part is refused."""
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)] | None = None
    """Text, or a list of text parts (joined); None only for an assistant turn."""
    name: Name | None = None
    tool_call_id: Name | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data):
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            for part in data["content"]:
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"content parts of type {part.get('type')!r} are not supported (text only)")
        return data

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        # the developer role is OpenAI's new name for system; chat templates know system
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text(), **({"name": self.name} if self.name else {}),
                **({"tool_call_id": self.tool_call_id} if self.tool_call_id else {})}


class ChatRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32)
    logprobs: bool = False
    """Return each token's logprob."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    """With logprobs: this many most likely alternatives per token."""
    best_of: None = None
    """Not part of chat completions."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
