"""The HTTP side: server info, adapter upload/delete, one timed streaming request, metrics.

Requests go to the OpenAI-compatible `/v1/completions` with a token-id prompt (exact input
lengths without a tokenizer here), `ignore_eos` (exact output lengths, vLLM's extension),
greedy decoding, `stream: true` so the first token is timed, and
`stream_options.include_usage` so the generated token count comes from the server.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx


class ServerError(Exception):
    """The server could not be used at all (unreachable, or refused the set-up)."""


@dataclass
class Record:
    """One request as the client saw it; times are seconds since the run started."""

    index: int
    adapter: str | None
    input_len: int
    output_len: int
    """Tokens asked for."""
    sent: float = 0.0
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    """Tokens the server reports generating (usage), else the chunks counted."""
    error: str | None = None
    """None, or the kind: http_<status>[_<error_type>], timeout, connect, disconnected, stream_error."""
    itl: list[float] = field(default_factory=list)
    """Inter-token latencies: the gaps between consecutive token chunks of the stream (vLLM's
    ITL); a closing chunk that carries only the finish reason is not a token, and a token
    whose text is incomplete (part of a UTF-8 character) comes with the next."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if not self.ok or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return asdict(self)


def headers(api_key: str | None) -> dict:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def info(url: str, api_key: str | None = None) -> dict:
    try:
        r = httpx.get(f"{url}/info", headers=headers(api_key), timeout=10)
    except httpx.HTTPError as e:
        raise ServerError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200 or "model_config" not in r.text:
        raise ServerError(f"{url}/info answered {r.status_code}: not a qaa-serve server")
    return r.json()


def list_adapters(url: str, api_key: str | None) -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/adapters", headers=headers(api_key), timeout=30)
    if r.status_code != 200:
        raise ServerError(f"GET /v1/adapters answered {r.status_code}: {r.text[:200]}")
    return {a["id"]: a for a in r.json()["data"]}


def upload(client: httpx.Client, url: str, adapter_id: str, files: dict[str, bytes], api_key: str | None) -> None:
    parts = {name: (name, data, "application/octet-stream") for name, data in files.items()}
    r = client.put(f"{url}/v1/adapters/{adapter_id}", files=parts, headers=headers(api_key), timeout=300)
    if r.status_code not in (200, 201):
        raise ServerError(f"upload of {adapter_id} refused ({r.status_code}): {r.text[:300]}")


def delete(client: httpx.Client, url: str, adapter_id: str, api_key: str | None) -> None:
    client.delete(f"{url}/v1/adapters/{adapter_id}", headers=headers(api_key), timeout=60)


def metrics(url: str, api_key: str | None = None) -> dict[str, float] | None:
    """{'name{label=value,...}': value} from /metrics, or None when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = httpx.get(f"{url}/metrics", headers=headers(api_key), timeout=10)
        if r.status_code != 200:
            return None
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out
    except (httpx.HTTPError, ValueError):
        return None


def _error_kind(status: int, body: bytes) -> str:
    try:
        msg = json.loads(body)
        err = msg.get("error")
        # OpenAI's error object (its code, else its type), or TGI's {"error", "error_type"}
        kind = (err.get("code") or err.get("type")) if isinstance(err, dict) else msg.get("error_type")
    except (ValueError, AttributeError):
        kind = None
    return f"http_{status}" + (f"_{kind}" if isinstance(kind, str) and kind.isidentifier() else "")


async def stream_completion(client: httpx.AsyncClient, url: str, model: str, rec: Record, prompt: list[int],
                            t0: float, api_key: str | None, timeout: float) -> Record:
    """Send one streaming completion and fill `rec` with its timings or its error kind."""
    body = {"model": model, "prompt": prompt, "max_tokens": rec.output_len, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    rec.sent = time.perf_counter() - t0
    chunks, usage = 0, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers(api_key),
                                 timeout=httpx.Timeout(timeout, connect=10)) as r:
            if r.status_code != 200:
                rec.error = _error_kind(r.status_code, await r.aread())
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    rec.error = "stream_error"
                    return rec
                choice = (msg.get("choices") or [{}])[0]
                if choice and (choice.get("text") or not choice.get("finish_reason")):  # not a bare finish chunk
                    now = time.perf_counter() - t0
                    if rec.first_token is None:
                        rec.first_token = now
                    else:
                        rec.itl.append(now - last)
                    last = now
                    chunks += 1
                if msg.get("usage"):
                    usage = msg["usage"]
        rec.end = time.perf_counter() - t0
        rec.output_tokens = int(usage["completion_tokens"]) if usage else chunks
        if rec.first_token is None:
            rec.error = "no_tokens"
    except httpx.TimeoutException:
        rec.error = "timeout"
    except httpx.ConnectError:
        rec.error = "connect"
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        rec.error = "disconnected"
    except (ValueError, KeyError, TypeError):
        rec.error = "bad_response"
    return rec
