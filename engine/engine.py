"""The engine facade: a loaded model, its tokenizer and a KV cache, plus a static batch loop."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.base import Capacity, cpu_flags, cpuinfo as read_cpuinfo
from engine.adapter_slots import AdapterSlots, Handle
from engine.constraints import Grammars
from engine.errors import InputError, QaaError
from engine.graph import GraphConfig, GraphDecoder
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams
from engine.steps import Sequence, prefill, step
from engine.tokenizer import Tokenizer
from engine.weights import resolve_model_dir, load_model


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise QaaError(f"device {device!r} is not one of auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QaaError("device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cpu_bf16(cpuinfo: str | None = None) -> str | None:
    """This CPU's native bf16 support, from /proc/cpuinfo's flags (or the `cpuinfo` text given):
    "amx" (AMX-BF16 tile matmuls, Sapphire Rapids and later), "avx512_bf16" (bf16 dot-product
    instructions, e.g. Cooper Lake, Zen 4), or None. oneDNN, behind torch's bf16 GEMMs on the
    CPU, uses either; without them bf16 is emulated and slower than fp32."""
    line = cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)  # none (not Linux): no claim of bf16
    flags = set(line.partition(":")[2].split())
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else None


DTYPE_ENV = "QAA_DTYPE"
"""The dtype used when none is given (None); unset means auto. The test suite sets float32."""


def pick_dtype(dtype: str | None, device: torch.device, cpuinfo: str | None = None) -> torch.dtype:
    """The serving dtype. auto: bf16 on CUDA and on a CPU with native bf16 (see cpu_bf16;
    `cpuinfo` stands in for /proc/cpuinfo), fp32 elsewhere; None: $QAA_DTYPE, else auto;
    else the one named."""
    if dtype is None:
        dtype = os.environ.get(DTYPE_ENV) or "auto"
    if dtype == "auto":
        native = device.type == "cuda" or cpu_bf16(cpuinfo) is not None
        return torch.bfloat16 if native else torch.float32
    if dtype not in DTYPES:
        raise QaaError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class Engine:
    """Owns the frozen model on one device, its tokenizer and a slot KV cache."""

    def __init__(self, model: str | Path | None = None, device: str = "auto", dtype: str | None = None,
                 max_batch: int = 8, max_seq_len: int | None = None, max_adapters: int = 8,
                 capacity: Capacity | None = None, compile: bool | GraphConfig = False):
        t0 = time.perf_counter()
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model_dir = resolve_model_dir(model)
        self.model = load_model(self.model_dir, self.device, self.dtype)
        self.tokenizer = Tokenizer(self.model_dir)
        self.cfg = self.model.cfg
        self.max_seq_len = min(max_seq_len or 2048, self.cfg.max_position)
        self.cache = KVCache(self.cfg, max_batch, self.max_seq_len, self.device, self.dtype, scratch=bool(compile))
        self.grammars = Grammars(self.model_dir, self.cfg.vocab_size)
        self.shape = self.cfg.shape()
        # Text longer than this cannot fit in the context whatever its tokens (x4: Unicode
        # normalisation may fold several characters into one), so it is refused before the
        # tokenizer spends time on it.
        self.max_prompt_chars = 4 * self.max_seq_len * self.tokenizer.max_token_chars
        self.capacity = (capacity or Capacity()).within(self.max_seq_len)
        self.adapters = AdapterSlots(self.shape, max_adapters, self.device, self.dtype, self.capacity)
        self.graph = None
        self.step = step
        """The step schedulers call (engine.steps.step's contract): that one, or with `compile`
        the captured decode step for steps that only decode (engine.graph)."""
        if compile:
            cfg = compile if isinstance(compile, GraphConfig) else GraphConfig()
            self.graph = GraphDecoder(self.model, self.cache, self.adapters, cfg)
            self.step = self.graph.step
        self.load_seconds = time.perf_counter() - t0

    @property
    def name(self) -> str:
        """The model's name: SmolLM2-135M-Instruct for the default, else the directory name."""
        from engine.weights import DEFAULT_MODEL_NAME, cache_root

        return DEFAULT_MODEL_NAME if self.model_dir.parent == cache_root() / "models" else self.model_dir.name

    def encode_prompt(self, prompt: str | list[dict] | list[int], chat: bool = False) -> list[int]:
        """Token ids for a text prompt, token ids as given, or chat messages rendered by the
        chat template."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
            ids = list(prompt)
        elif chat or isinstance(prompt, list):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            total = 0
            for m in messages:  # one turn may be empty (an assistant's tool call), not all
                content = m.get("content", "") if isinstance(m, dict) else None
                if not isinstance(content, str):
                    raise InputError("each chat message's content must be text")
                total += len(content)
            check_length(total, self.max_prompt_chars)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            check_prompt_text(prompt, self.max_prompt_chars)
            ids = self.tokenizer.encode(prompt)
        if len(ids) >= self.max_seq_len:
            raise InputError(f"prompt has {len(ids)} tokens; the context holds at most {self.max_seq_len - 1} prompt tokens")
        return ids

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, adapter: str | Handle | None = None) -> Sequence:
        """A sequence for the base model or for a loaded adapter (its name or Handle)."""
        if not prompt_ids:
            raise InputError("prompt is empty")
        h: Handle | None = self.adapters.get(adapter) if isinstance(adapter, str) else adapter
        start = h.virtual_tokens if h is not None else 0
        if start + len(prompt_ids) >= self.max_seq_len:
            raise InputError(f"prompt has {len(prompt_ids)} tokens (+{start} virtual); the context holds {self.max_seq_len}")
        return Sequence(prompt_ids, params, self.tokenizer, start=start, max_len=self.max_seq_len, adapter=h)

    def load_adapter(self, name: str, source) -> Handle:
        """Load an adapter directory (or an adapters.base.Adapter) under `name`."""
        return self.adapters.load(name, source)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams], chat: bool = False,
                 adapters: list[str | None] | None = None) -> list[Completion]:
        """Complete every prompt, `max_batch` at a time; row i uses its own parameters and the
        loaded adapter adapters[i] (None = base model), whatever the adapters' types."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        seqs = [self.new_sequence(self.encode_prompt(p, chat), sp, a) for p, sp, a in zip(prompts, params, adapters)]
        for i in range(0, len(seqs), self.cache.n_slots):
            self.run(seqs[i : i + self.cache.n_slots])
        return [Completion(s.text, s.out_ids, s.finish_reason, len(s.prompt_ids)) for s in seqs]

    def run(self, seqs: list[Sequence]) -> None:
        """Static batching: prefill together, decode until every row has finished."""
        for s in seqs:
            self.admit(s)
        try:
            prefill(self.model, self.cache, seqs, self.seams_for)
            running = seqs
            while True:
                done = [s for s in running if s.finished]
                if done:
                    for s in done:
                        self.cache.free(s.slot)
                        s.slot = -1
                    running = self.compact([s for s in running if not s.finished])
                if not running:
                    break
                self.step(self.model, self.cache, [(s, 1) for s in running], self.seams_for)
        finally:
            for s in seqs:
                if s.slot >= 0:
                    self.cache.free(s.slot)
                    s.slot = -1

    def compact(self, running: list[Sequence]) -> list[Sequence]:
        """Move running sequences' KV into the lowest slots (see KVCache.compact); returns them
        in slot order, so a step over them reads the cache without a gather."""
        moves = self.cache.compact([(s.slot, s.pos) for s in running])
        for s in running:
            s.slot = moves.get(s.slot, s.slot)
        return sorted(running, key=lambda s: s.slot)


    def admit(self, s: Sequence) -> None:
        """Give a sequence its KV slot; a prefix adapter's keys/values fill its first positions."""
        s.slot = self.cache.alloc()
        if s.adapter is not None and s.adapter.kind == "prefix":
            self.adapters.write_prefix(self.cache, s.slot, s.adapter)

    def seams_for(self, seqs: list[Sequence]):
        return self.adapters.seams_for([s.adapter for s in seqs], self.device)


def check_prompt_text(text, max_chars: int | None = None) -> None:
    if not isinstance(text, str):
        raise InputError("prompt must be text")
    check_length(len(text), max_chars)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("prompt is not valid UTF-8") from None


def check_length(chars: int, max_chars: int | None) -> None:
    if not chars:
        raise InputError("prompt is empty")
    if max_chars is not None and chars > max_chars:
        raise InputError(f"prompt has {chars} characters; no text over {max_chars} fits in the context")
