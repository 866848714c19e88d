"""Grammar-constrained decoding (JSON and JSON Schema) with xgrammar, the library vLLM and
SGLang use: a grammar is compiled once per schema for the model's tokenizer, and each
sequence holds its own matcher, so rows of one batch follow different grammars (or none).

Per step, for a constrained row: the matcher's bitmask sets every token the grammar does not
allow next to -inf (after the raw logits' logprobs are taken, before any sampling), and the
drawn token advances the matcher. Once the grammar is complete the sequence ends ('stop').
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from engine.errors import InputError

MAX_SCHEMA_BYTES = 64 * 1024
CACHE = 256  # compiled grammars kept per engine


class Grammar:
    """A compiled grammar; matcher() starts a fresh one for a sequence."""

    def __init__(self, compiled, vocab_size: int, banned: torch.Tensor):
        self.compiled, self.vocab_size, self.banned = compiled, vocab_size, banned

    def matcher(self) -> "Matcher":
        return Matcher(self)


class Matcher:
    def __init__(self, g: Grammar):
        import xgrammar as xgr

        self.m = xgr.GrammarMatcher(g.compiled)
        self.banned = g.banned
        self.bitmask = xgr.allocate_token_bitmask(1, g.vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (V,) of every token the grammar forbids next to -inf, in place."""
        self.m.fill_next_token_bitmask(self.bitmask, 0)
        row = logits.unsqueeze(0)
        self._apply(row, self.bitmask.to(logits.device))
        logits.index_fill_(0, self.banned.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.m.accept_token(token):
            raise InputError(f"token {token} does not fit the grammar")

    @property
    def done(self) -> bool:
        return self.m.is_terminated()


class Grammars:
    """The engine's grammar compiler (built on first use) and a cache of compiled schemas."""

    def __init__(self, model_dir: Path, vocab_size: int):
        self.model_dir, self.vocab_size = model_dir, vocab_size
        self._compiler = None
        self._banned = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError:
                    raise InputError("constrained decoding needs the package xgrammar") from None
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self.model_dir)
                info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info)
                # JSON carries no raw control character (xgrammar's strings would allow them),
                # and compact JSON needs no whitespace: tokens holding one are never drawn
                special = set(tok.all_special_ids)
                self._banned = torch.tensor([i for i in range(len(tok)) if i not in special
                                             and any(ord(c) < 32 for c in tok.decode([i]))], dtype=torch.long)
            return self._compiler

    def json(self, schema: dict | None = None) -> Grammar:
        """Any JSON value (schema None), or JSON valid under `schema`; compact (no free
        whitespace, so a grammar cannot be kept open by spaces alone)."""
        key = json.dumps(schema, sort_keys=True) if schema is not None else ""
        if len(key) > MAX_SCHEMA_BYTES:
            raise InputError(f"the JSON schema is {len(key)} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
        with self._lock:
            g = self._cache.get(key)
            if g is not None:
                self._cache.move_to_end(key)
                return g
        compiler = self._get_compiler()
        try:
            compiled = (compiler.compile_builtin_json_grammar() if schema is None
                        else compiler.compile_json_schema(key, any_whitespace=False))
        except Exception as e:  # xgrammar's own error types for schemas it cannot compile
            raise InputError(f"the JSON schema cannot be used: {str(e).splitlines()[0][:300]}") from None
        g = Grammar(compiled, self.vocab_size, self._banned)
        with self._lock:
            self._cache[key] = g
            while len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        return g
