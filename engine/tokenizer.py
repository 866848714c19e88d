"""Tokenizer of an HF checkpoint directory: `tokenizers` for text; chat templates rendered by
transformers' own renderer (its sandboxed environment, filters, globals and variables), so a
template renders here exactly as `apply_chat_template` renders it."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from engine.errors import InputError, ModelError


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelError(f"{path} has no tokenizer.json")
        self.tk = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")
        self.chat_template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            self.chat_template = (path / "chat_template.jinja").read_text()
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        # what transformers hands every template: its special tokens by name
        self.special_tokens = {k: _token_str(cfg[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if cfg.get(k) is not None}
        self.add_bos = bool(cfg.get("add_bos_token", False))
        eos = set()
        for src in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list):
                eos.update(src)
        if self.eos_token is not None and self.tk.token_to_id(self.eos_token) is not None:
            eos.add(self.tk.token_to_id(self.eos_token))
        self.eos_ids = frozenset(eos)
        self.bos_id = self.tk.token_to_id(self.bos_token) if self.bos_token else None
        self.vocab_size = self.tk.get_vocab_size()
        # no token stands for more characters than its longest vocabulary entry (byte-level
        # BPE: one character per byte), which bounds the text that can fit in a context
        self.max_token_chars = max((len(t) for t in self.tk.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        # Some tokenizer_config.json files ask for BOS that tokenizer.json does not add itself.
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None,
                            documents=None, **kwargs) -> str:
        """Render the checkpoint's chat template to text, as transformers does."""
        if not self.chat_template:
            raise InputError("this model has no chat template; send plain text instead of chat messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError("each chat message needs a 'role' and a 'content'")
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template([messages], tools=tools, documents=documents,
                                                chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt,
                                                **{**self.special_tokens, **kwargs})
        except TemplateError as e:  # raise_exception() in a template, or a template that does not parse
            raise InputError(f"chat template: {e}") from None
        return rendered[0]


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{p} is not valid JSON: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: text appears only once its UTF-8 bytes are complete.

    Decodes a short window (the last few tokens already shown plus the new ones) rather than
    the whole output, so each step costs O(1) in the output length (TGI's offset scheme).
    """

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids = tok, []
        self.prefix_offset = self.read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included (as U+FFFD)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
