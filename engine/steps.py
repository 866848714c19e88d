"""Sequences and the step that advances them: decode tokens and prefill chunks in one forward.

A scheduler (the CLI's static loop, or the server's continuous batcher) decides which
sequences run in a step and how many prompt tokens each prefilling one feeds; `step` runs
one forward for all of them, whatever their lengths and positions, samples one token for
every row that has its whole prompt in the cache and updates each sequence. `prefill` (whole
prompts) and `decode` (one token each) are its two plain cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.kv_cache import KVCache
from engine.layout import mixed
from engine.sampling import SamplingParams, sample
from engine.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Sequence:
    """One request's state from admission to finish."""

    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    slot: int = -1
    """KV cache slot, -1 until admitted."""
    start: int = 0
    """Cache positions taken before the prompt (a prefix adapter's virtual tokens)."""
    prefilled: int = 0
    """Prompt tokens whose keys/values are in the cache (chunked prefill feeds them in parts)."""
    max_len: int = 0
    """Last cache position + 1 this sequence may reach."""
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    """None while running; then 'stop' (EOS or stop string), 'length', 'cancelled' or 'error'."""
    error: Exception | None = None
    """What ended the sequence when finish_reason is 'error'."""
    logprobs: list = field(default_factory=list)
    """With params.logprobs: per generated token, (its logprob, [(id, logprob)] of the top ones)."""
    prompt_logprobs: list = field(default_factory=list)
    """With params.prompt_logprobs: per prompt token, as `logprobs` (None for the first token)."""
    adapter: object = None
    """The adapter's Handle (name, kind, slot), or None for the base model."""

    def __post_init__(self):
        self.decoder = StreamDecoder(self.tokenizer)
        self.constraint = self.params.grammar.matcher() if self.params.grammar is not None else None
        self.generator = None
        self.history = None  # (N,) prompt + output ids, only kept for repetition penalty
        self._pending = ""  # decoded text not yet shown: it may be the start of a stop string

    @property
    def pos(self) -> int:
        """Cache position of the next token fed to the model (= positions written so far)."""
        return self.start + self.prefilled + max(len(self.out_ids) - 1, 0)

    @property
    def prefilling(self) -> bool:
        """Part of the prompt is not in the cache yet."""
        return self.prefilled < len(self.prompt_ids)

    @property
    def end_ids(self) -> set[int]:
        """Token ids that would end this sequence if drawn now."""
        return set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(self.tokenizer.eos_ids))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> str:
        """Add a sampled token; return the text it makes visible (stop strings held back)."""
        self.out_ids.append(token)
        if self.history is not None:
            self.history = torch.cat([self.history, self.history.new_tensor([token])])
        p = self.params
        if self.constraint is not None:
            self.constraint.accept(token)
        if (token in self.tokenizer.eos_ids and not p.ignore_eos) or token in p.stop_token_ids \
                or (self.constraint is not None and self.constraint.done):
            self.finish_reason = "stop"
            self._pending += self.decoder.flush()
            return self._flush()
        self._pending += self.decoder.push(token)
        for s in p.stop:
            i = (self.text + self._pending).find(s, max(0, len(self.text) - len(s)))
            if i >= 0:
                self._pending = (self.text + self._pending)[len(self.text) : i]
                self.finish_reason = "stop"
                return self._flush()
        if len(self.out_ids) >= p.max_new_tokens or self.pos + 1 >= self.max_len:
            self.finish_reason = "length"
            self._pending += self.decoder.flush()
            return self._flush()
        # hold back a tail that could be the start of a stop string
        hold = max((_overlap(self._pending, s) for s in p.stop), default=0)
        emit = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(emit) :]
        self.text += emit
        return emit

    def _flush(self) -> str:
        emit, self._pending = self._pending, ""
        self.text += emit
        return emit


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _sample_into(seqs, logits) -> list[str]:
    dists = _logprobs(seqs, logits)
    for s, row in zip(seqs, logits):  # in place: the logits are this forward's own
        if s.constraint is not None:
            s.constraint.mask(row)
    toks = sample(logits, [s.params for s in seqs], [s.history for s in seqs], [s.generator for s in seqs],
                  [s.out_ids for s in seqs], [s.end_ids if s.params.min_tokens else () for s in seqs]).tolist()
    # Up to here nothing of a sequence changed (a matcher moves only when its token is
    # appended), so a failed step can be re-run row by row. A row's own bookkeeping (grammar,
    # stop strings, detokenizing) failing ends that row alone.
    for b, (row, top) in dists.items():
        seqs[b].logprobs.append((row[toks[b]].item(), top))
    return [_append(s, t) for s, t in zip(seqs, toks)]


def _logprobs(seqs, logits) -> dict:
    """{row: (its log-softmax (V,), [(id, logprob)] of the top ones)} for the rows that asked,
    from the model's own distribution: raw logits, before grammar, penalties and temperature."""
    want = [b for b, s in enumerate(seqs) if s.params.logprobs is not None]
    if not want:
        return {}
    lp = logits[want].float().log_softmax(-1)
    out = {}
    for j, b in enumerate(want):
        k = min(seqs[b].params.logprobs, lp.shape[-1])
        top = lp[j].topk(k) if k else None
        out[b] = (lp[j], list(zip(top.indices.tolist(), top.values.tolist())) if k else [])
    return out


def _append(s: Sequence, token: int) -> str:
    try:
        return s.append(token)
    except Exception as e:
        s.error, s.finish_reason = e, "error"
        return ""


@torch.inference_mode()
def step(model, cache: KVCache, work: list[tuple[Sequence, int]], seams_for) -> list[str | None]:
    """One forward over `work`: (seq, n) feeds the next n prompt tokens of a prefilling
    sequence, or (seq, 1) the last token of a decoding one. Every row with its whole prompt in
    the cache after the forward samples a token; returns, in work's order, the text each
    sampled token makes visible, or None for a row still prefilling.

    The flat batch is every decode token, then every chunk (engine.layout.mixed); each token
    goes through its sequence's adapter: seams_for(one sequence per token) builds the routing.
    """
    dev = cache.k[0].device
    dec = [s for s, _ in work if not s.prefilling]
    pre = [(s, n) for s, n in work if s.prefilling]
    for s, n in pre:
        assert 0 < n <= len(s.prompt_ids) - s.prefilled, "a chunk lies within its prompt"
        if s.generator is None:
            s.generator = s.params.make_generator(dev)
        if s.params.repetition_penalty != 1.0 and s.history is None:
            s.history = torch.tensor(s.prompt_ids, device=dev)
    tokens = [s.out_ids[-1] for s in dec]
    owners, pick, sampled = list(dec), list(range(len(dec))), list(dec)
    for s, n in pre:
        tokens += s.prompt_ids[s.prefilled : s.prefilled + n]
        owners += [s] * n
        if s.prefilled + n == len(s.prompt_ids):  # its last prompt token: the first output follows
            pick.append(len(tokens) - 1)
            sampled.append(s)
    layout = mixed([(s.slot, s.pos) for s in dec], [(s.slot, s.pos, n) for s, n in pre], dev,
                   model.cfg.sliding_window)
    h = model.hidden(torch.tensor(tokens, device=dev)[:, None], layout.pos[:, None], cache,
                     seams=seams_for(owners), layout=layout)  # (N, 1, d)
    logits = model.lm_head(h[torch.tensor(pick, device=dev), 0]) if pick else None  # (K, V)
    scored = _prompt_logprobs(model, h, dec, pre)
    for s, n in pre:  # the chunks are in the cache now
        s.prefilled += n
    try:
        texts = _sample_into(sampled, logits) if pick else []
    except BaseException:
        for s, n in pre:  # nothing sampled: the step may be run again as it was
            s.prefilled -= n
        raise
    for s, entries in scored:
        s.prompt_logprobs += entries
    out = dict(zip(map(id, sampled), texts))
    return [out.get(id(s)) for s, _ in work]


def _prompt_logprobs(model, h, dec, pre) -> list[tuple[Sequence, list]]:
    """For the chunks whose sequence asked: each chunk token's logits score the prompt token
    after it (the last prompt token's score the first output, which is not a prompt token).
    h (N, 1, d) is the step's hidden states, decode tokens first, then the chunks in order."""
    out, at = [], len(dec)
    for s, n in pre:
        if s.params.prompt_logprobs:
            a = s.prefilled
            m = min(n, len(s.prompt_ids) - 1 - a)  # tokens here whose next token is in the prompt
            entries = [None] if a == 0 else []
            if m > 0:
                lp = model.lm_head(h[at : at + m, 0]).float().log_softmax(-1)  # (m, V)
                nxt = torch.tensor(s.prompt_ids[a + 1 : a + 1 + m], device=lp.device)
                chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
                k = min(s.params.logprobs or 0, lp.shape[-1])
                top = lp.topk(k) if k else None
                for j in range(m):
                    entries.append((chosen[j], list(zip(top.indices[j].tolist(), top.values[j].tolist())) if k else []))
            out.append((s, entries))
        at += n
    return out


def prefill(model, cache: KVCache, seqs: list[Sequence], seams_for) -> list[str]:
    """Feed every sequence's whole (remaining) prompt and sample its first token."""
    return step(model, cache, [(s, len(s.prompt_ids) - s.prefilled) for s in seqs], seams_for)


def decode(model, cache: KVCache, seqs: list[Sequence], seams_for) -> list[str]:
    """Feed each sequence's last token at its own position and sample the next one."""
    return step(model, cache, [(s, 1) for s in seqs], seams_for)
