"""The hostile-input table: what a tenant can send, by mistake or on purpose, that must get a
4xx naming the problem and change nothing for anyone else. Each case is (name, statuses,
send), where send(url, key) makes one HTTP call; adapters are built in memory for the tiny
model's shape. Used by test_hostile.py against a real server while another tenant generates.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Callable

import httpx
import torch
from safetensors.torch import save as st_save

from adapters.files import CONFIG_NAME, WEIGHTS_NAME, to_bytes
from adapters.lora import LoraConfig
from adapters.prefix import PrefixConfig
from adapters.qaa import QAAConfig
from adapters.sora import SoraConfig
from tests.adapters.cases import Case, make

TIMEOUT = 30


@dataclass
class Hostile:
    name: str
    statuses: tuple[int, ...]
    send: Callable[[str, str], httpx.Response]


def _hdr(key, extra=None):
    return {"authorization": f"Bearer {key}", **(extra or {})}


def post_raw(path: str, body: bytes | str, ctype="application/json"):
    data = body.encode() if isinstance(body, str) else body
    return lambda url, key: httpx.post(url + path, content=data, headers=_hdr(key, {"content-type": ctype}),
                                       timeout=TIMEOUT)


def post_json(path: str, obj):
    return post_raw(path, json.dumps(obj))


def tgi(**params):
    return post_json("/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 4, **params}})


def completion(**fields):
    return post_json("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 4, **fields})


def chat(**fields):
    return post_json("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 4, **fields})


def put_files(adapter_id: str, parts: list[tuple[str, bytes]]):
    def send(url, key):
        files = [(name, (name, io.BytesIO(data), "application/octet-stream")) for name, data in parts]
        return httpx.put(f"{url}/v1/adapters/{adapter_id}", files=files, headers=_hdr(key), timeout=TIMEOUT)
    return send


def put_adapter(config: bytes, weights: bytes, adapter_id="evil"):
    return put_files(adapter_id, [(CONFIG_NAME, config), (WEIGHTS_NAME, weights)])


def built(kind: str, make_config, edit_config=None, edit_tensors=None, shape=None):
    """Upload parts of a real adapter of this shape, its config and tensors then edited."""
    ad = make(Case("hostile", kind, make_config), shape, seed=3)
    if edit_tensors:
        edit_tensors(ad.tensors)
    config, weights = to_bytes(ad)
    if edit_config:
        d = json.loads(config)
        edit_config(d)
        config = json.dumps(d).encode()
    return config, weights


def _raw_config(edit):
    """A LoRA config edited at the JSON text level (NaN, Infinity)."""
    return lambda d: d.update(edit)


def cases(shape, upload_limit: int) -> list[Hostile]:
    out: list[Hostile] = []
    add = lambda name, statuses, send: out.append(Hostile(name, statuses, send))  # noqa: E731
    V = (422,)

    # --- TGI parameters: numbers out of range, wrong types --------------------------------
    bad_tgi = {
        "max_new_tokens": [0, -1, 2**31, 10**30, 1.5, "ten", 100_000],
        "temperature": [0, -1, 101, 1e308, "hot"],
        "top_p": [0, -0.1, 1.5],
        "top_k": [-1, 2**31, 1e10],
        "repetition_penalty": [0, -1, 1e9],
        "seed": [2**64, 18446744073709551616 * 7, -1, 10**30, "seed", 1.5],
        "stop": [["x"] * 10_000, ["x"] * 17, ["a" * 300], [""], "stop", [1, 2]],
        "adapter_id": ["a" * 10_000, ["a"], {"id": 1}],
        "do_sample": [{"yes": 1}], "details": [[1]], "ignore_eos": ["maybe"],
    }
    for p, values in bad_tgi.items():
        for v in values:
            add(f"tgi {p}={str(v)[:24]}", V, tgi(**{p: v}))
    for p in ("temperature", "repetition_penalty", "top_p"):
        for const in ("Infinity", "-Infinity", "NaN"):
            body = '{"inputs": "hello", "parameters": {"max_new_tokens": 4, "%s": %s}}' % (p, const)
            add(f"tgi {p}={const}", V, post_raw("/generate", body))
    add("tgi stream seed 2^64", V, post_json("/generate_stream", {"inputs": "x", "parameters": {
        "max_new_tokens": 2, "seed": 18446744073709551616}}))
    for i in range(4):  # four of them used to hold every KV slot of a --max-running 4 server
        add(f"tgi seed 2^64 #{i}", V, post_json("/generate", {"inputs": "x", "parameters": {
            "max_new_tokens": 2, "seed": 18446744073709551616}}))

    # --- TGI bodies: sizes and shapes ------------------------------------------------------
    add("inputs 8 MB", (413,), post_json("/generate", {"inputs": "x" * 8_000_000}))
    add("inputs longer than any context", V, post_json("/generate", {"inputs": "word " * 300_000}))
    add("inputs over the context", V, post_json("/generate", {"inputs": "x" * 400}))
    add("inputs empty", V, post_json("/generate", {"inputs": ""}))
    add("inputs a number", V, post_json("/generate", {"inputs": 5}))
    add("inputs a list", V, post_json("/generate", {"inputs": ["a", "b"]}))
    add("inputs missing", V, post_json("/generate", {"parameters": {}}))
    add("parameters a string", V, post_json("/generate", {"inputs": "x", "parameters": "fast"}))
    add("body not JSON", (400, 422), post_raw("/generate", "{not json"))
    add("body JSON array", V, post_raw("/generate", "[]"))
    add("body JSON null", V, post_raw("/generate", "null"))
    add("body nested 100k deep", (400, 422), post_raw("/generate", "[" * 100_000 + "]" * 100_000))
    add("body huge integer", (400, 422), post_raw("/generate", '{"inputs": "x", "parameters": {"seed": 1%s}}'
                                                  % ("0" * 5000)))
    add("body empty", (400, 422), post_raw("/generate", b""))
    add("body text/plain", (400, 422), post_raw("/generate", "inputs=x", "text/plain"))
    add("body invalid UTF-8", (400, 422), post_raw("/generate", b'{"inputs": "\xff\xfe"}'))

    # --- OpenAI completions and chat --------------------------------------------------------
    bad_oai = {
        "seed": [-9223372036854775809, 2**63, 2**64, "s"],
        "temperature": [-0.1, 2.1],
        "top_p": [0, 1.1],
        "top_k": [-2, 2**31],
        "max_tokens": [0, -5, 2**31, 5000],
        "n": [17, 0, 100],
        "logprobs": [21, -1, 10**6],
        "best_of": [17, 0],
        "repetition_penalty": [0, 101],
        "stop": [["s"] * 17, ["s"] * 10_000, "x" * 300, [""], [3]],
        "model": ["m" * 1000, ["tiny"]],
        "user": ["u" * 1000],
        "stream_options": ["yes"],
    }
    O = (400,)  # noqa: E741 - OpenAI's routes answer bad input with 400, as OpenAI does
    for p, values in bad_oai.items():
        for v in values:
            add(f"completions {p}={str(v)[:24]}", O, completion(**{p: v}))
    for p in ("seed", "max_tokens", "temperature", "stop"):
        add(f"chat {p} out of range", O, chat(**{p: bad_oai[p][0]}))
    for const in ("Infinity", "NaN"):
        body = '{"model": "tiny", "prompt": "x", "temperature": %s}' % const
        add(f"completions temperature={const}", O, post_raw("/v1/completions", body))
        body = '{"model": "tiny", "prompt": "x", "repetition_penalty": %s}' % const
        add(f"completions repetition_penalty={const}", O, post_raw("/v1/completions", body))
    for field, v in [("presence_penalty", 2.5), ("frequency_penalty", -3), ("logit_bias", {"5": 101}),
                     ("logit_bias", {"x": 1}), ("logit_bias", {str(i): 1 for i in range(2000)}),
                     ("logit_bias", {"999999": 1}), ("min_tokens", -1), ("min_tokens", 10),
                     ("stop_token_ids", [-1]), ("stop_token_ids", list(range(2000))), ("response_format", {"type": "xml"}),
                     ("response_format", {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 5000] * 20}}}),
                     ("tools", [{"type": "function"}]), ("suffix", "x")]:
        add(f"completions {field}={str(v)[:20]}", O, completion(**{field: v}))
    for name, prompt in [("empty list", []), ("nested lists", [[1, 2]]), ("negative id", [-1]),
                         ("id outside vocab", [10**6]), ("empty string in list", [""]), ("two prompts", ["a", "b"]),
                         ("null", None), ("number", 5), ("object", {"x": 1}), ("ids over the context", [5] * 300)]:
        add(f"completions prompt {name}", O, completion(prompt=prompt))
    add("completions unknown model", (404,), completion(model="no-such-adapter"))
    add("completions another tenant's adapter", (404,), completion(model="good-lora"))
    for name, msgs in [("none", []), ("unknown role", [{"role": "robot", "content": "x"}]),
                       ("no content", [{"role": "user"}]), ("content a number", [{"role": "user", "content": 5}]),
                       ("5000 messages", [{"role": "user", "content": "x"}] * 5000),
                       ("content 3 MB", [{"role": "user", "content": "x" * 3_000_000}]),
                       ("content too long for any context", [{"role": "user", "content": "y " * 400_000}])]:
        add(f"chat messages {name}", (413,) if "MB" in name else O, chat(messages=msgs))
    add("chat max_completion_tokens 0", O, chat(max_completion_tokens=0))
    add("chat top_logprobs without logprobs", O, chat(top_logprobs=2))
    add("chat top_logprobs 21", O, chat(logprobs=True, top_logprobs=21))
    add("completions best_of below n", O, completion(n=3, best_of=2))
    add("completions best_of streamed", O, completion(n=1, best_of=2, stream=True))
    add("chat image content part", O, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]))

    # --- adapters: resource bombs and malformed files of every type -------------------------
    lora = lambda **kw: (lambda: LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **kw}))  # noqa: E731
    for r in (65, 2000):
        add(f"lora rank {r}", V, put_adapter(*built("lora", lora(r=r), shape=shape)))
    add("lora rank_pattern 65", V, put_adapter(*built("lora", lora(rank_pattern={"q_proj": 65}), shape=shape)))
    add("sora rank 65", V, put_adapter(*built("sora", lambda: SoraConfig(r=65, target_modules=["q_proj"]),
                                               shape=shape)))
    cfg_only = lambda edit: put_adapter(*built("lora", lora(), edit_config=edit, shape=shape))  # noqa: E731
    for name, tm in [("backtracking regex", "(.|.)*X"), ("exponential regex", r"(.|.)*\d\d\d\d"),
                     ("nested quantifier regex", r"((.|.)*(.|.)*)*(?!.)[^z]"), ("list of ints", [1]),
                     ("unbalanced regex", "("), ("empty list", []), ("regex 1000 chars", "q" * 1000),
                     ("5000 names", ["q_proj"] * 5000), ("object", {"a": 1}), ("unknown module", ["lm_head"])]:
        add(f"lora target_modules {name}", V, cfg_only(lambda d, tm=tm: d.update(target_modules=tm)))
    add("lora rank_pattern backtracking key", V, cfg_only(lambda d: d.update(rank_pattern={r"(.|.)*\d\d\d\d": 2})))
    add("lora alpha_pattern negative", V, cfg_only(lambda d: d.update(alpha_pattern={"q_proj": -1})))
    for name, v in [("negative", -1), ("zero", 0), ("a string", "big")]:
        add(f"lora lora_alpha {name}", V, cfg_only(lambda d, v=v: d.update(lora_alpha=v)))
    for const in ("NaN", "Infinity"):
        config, weights = built("lora", lora(), shape=shape)
        text = config.decode().replace('"lora_alpha": 8', f'"lora_alpha": {const}')
        add(f"lora lora_alpha {const}", V, put_adapter(text.encode(), weights))
    for name, v in [("99", [99]), ("-1", [-1]), ("a string", "all")]:
        add(f"lora layers_to_transform {name}", V, cfg_only(lambda d, v=v: d.update(layers_to_transform=v)))
    add("lora use_dora", V, cfg_only(lambda d: d.update(use_dora=True)))
    add("lora task_type", V, cfg_only(lambda d: d.update(task_type="SEQ_CLS")))

    qaa = lambda **kw: (lambda: QAAConfig(**{"circuit_layers": 2, **kw}))  # noqa: E731
    n = max(1, (shape.dim - 1).bit_length())

    def deep(d):  # 10^6 layers, with angle tensors to match (the original 40 MB case)
        d["circuit_layers"] = 1_000_000

    def deep_tensors(t):
        for k in list(t):
            if k.endswith("angles"):
                t[k] = torch.zeros(1_000_000, n)
    bomb = built("qaa", qaa(layers_to_transform=[0], placement=["attn"]), deep, deep_tensors, shape)
    assert len(bomb[1]) < upload_limit
    add("qaa circuit_layers 1e6 (24 MB)", V, put_adapter(*bomb))
    add("qaa circuit_layers 65", V, put_adapter(*built("qaa", qaa(circuit_layers=65), shape=shape)))
    qcfg = lambda edit: put_adapter(*built("qaa", qaa(), edit_config=edit, shape=shape))  # noqa: E731
    for name, edit in [("rotation RZ", {"rotation": "RZ"}), ("placement x", {"placement": ["x"]}),
                       ("circuit_layers 0", {"circuit_layers": 0}), ("circuit_layers 1.5", {"circuit_layers": 1.5}),
                       ("circuit_layers a string", {"circuit_layers": "2"}), ("hidden_size wrong", {"hidden_size": 7}),
                       ("gradient unknown", {"gradient": "magic"}), ("unknown field", {"qubits": 40})]:
        add(f"qaa {name}", V, qcfg(lambda d, e=edit: d.update(e)))
    pre = lambda **kw: (lambda: PrefixConfig(**{"num_virtual_tokens": 4, **kw}))  # noqa: E731
    for p in (129, 255, 1_000_000):
        add(f"prefix num_virtual_tokens {p}", V, put_adapter(
            *built("prefix", pre(), edit_config=lambda d, p=p: d.update(num_virtual_tokens=p), shape=shape)))
    add("prefix 200 real virtual tokens", V, put_adapter(*built("prefix", pre(num_virtual_tokens=200), shape=shape)))
    add("sora sparse_lambda negative", V, put_adapter(*built(
        "sora", lambda: SoraConfig(r=4, target_modules=["q_proj"]), lambda d: d.update(sparse_lambda=-1), shape=shape)))

    good_cfg, good_weights = built("lora", lora(), shape=shape)
    first = lambda t: next(iter(t))  # noqa: E731
    for name, edit in [("NaN", lambda t: t[first(t)].fill_(float("nan"))),
                       ("Inf", lambda t: t[first(t)].fill_(float("inf"))),
                       ("wrong shape", lambda t: t.__setitem__(first(t), torch.zeros(3, 3))),
                       ("missing tensor", lambda t: t.pop(first(t))),
                       ("extra tensor", lambda t: t.__setitem__("extra.weight", torch.zeros(2))),
                       ("int dtype", lambda t: t.__setitem__(first(t), t[first(t)].to(torch.int32)))]:
        add(f"lora tensors {name}", V, put_adapter(*built("lora", lora(), edit_tensors=edit, shape=shape)))
    bogus_header = struct.pack("<Q", 2**60) + b"{}"
    for name, weights in [("pickle", b"\x80\x04\x95" + b"\x00" * 64), ("zip", b"PK\x03\x04" + b"\x00" * 64),
                          ("truncated", good_weights[: len(good_weights) // 2]), ("garbage", b"\x13\x37" * 100),
                          ("header length 2^60", bogus_header), ("empty", b""),
                          ("no tensors", st_save({"x": torch.zeros(1)}))]:
        add(f"weights {name}", V, put_adapter(good_cfg, weights))
    for name, config in [("not JSON", b"{nope"), ("a list", b"[]"), ("no peft_type", b"{}"),
                         ("unknown peft_type", b'{"peft_type": "IA3"}'), ("nested 100k deep", b"[" * 100_000),
                         ("not UTF-8", b"\xff\xfe\x00"), ("2 MB of names", json.dumps(
                             {"peft_type": "LORA", "r": 4, "target_modules": ["q"] * 400_000}).encode())]:
        add(f"config {name}", V, put_adapter(config, good_weights))

    # --- uploads: framing, sizes, ids ------------------------------------------------------
    F = (400, 422)  # multipart framing: the parser's 400 or our 422, each naming the problem
    add("upload config sent twice", F, put_files("evil", [(CONFIG_NAME, good_cfg), (CONFIG_NAME, good_cfg),
                                                         (WEIGHTS_NAME, good_weights)]))
    add("upload weights sent twice", F, put_files("evil", [(CONFIG_NAME, good_cfg), (WEIGHTS_NAME, good_weights),
                                                          (WEIGHTS_NAME, good_weights)]))
    add("upload unknown field", F, put_files("evil", [(CONFIG_NAME, good_cfg), (WEIGHTS_NAME, good_weights),
                                                     ("adapter_model.bin", b"x")]))
    add("upload weights missing", F, put_files("evil", [(CONFIG_NAME, good_cfg)]))
    add("upload no files", F, put_files("evil", []))
    add("upload as JSON", F, lambda url, key: httpx.put(url + "/v1/adapters/evil", json={"x": 1}, headers=_hdr(key),
                                                        timeout=TIMEOUT))
    over = b"\x00" * (upload_limit + 2**20 + 1)
    add("upload over the limit", (413,), put_adapter(good_cfg, over))

    def chunked(url, key):  # no content-length: the limit is enforced while the body streams in
        def body():
            yield (f'--x\r\nContent-Disposition: form-data; name="{WEIGHTS_NAME}"; filename="w"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n").encode()
            for _ in range(upload_limit // 2**20 + 3):
                yield b"\x00" * 2**20
        return httpx.put(url + "/v1/adapters/evil", content=body(), timeout=TIMEOUT,
                         headers=_hdr(key, {"content-type": "multipart/form-data; boundary=x"}))
    add("upload over the limit, chunked", (413,), chunked)
    for name, aid in [("dot-dot", ".."), ("too long", "a" * 100), ("leading dash", "-x"), ("space", "x%20y"),
                      ("unicode", "%C3%A9vil"), ("another tenant's path", "good/good-lora"), ("control char", "a%00b")]:
        add(f"upload id {name}", (404, 405, 422), put_adapter(good_cfg, good_weights, adapter_id=aid))
    add("generate with another tenant's adapter", (404,), tgi(adapter_id="good-lora"))
    add("generate with an admin-style id", (404,), tgi(adapter_id="good/good-lora"))
    add("read another tenant's adapter", (404,), lambda url, key: httpx.get(
        url + "/v1/adapters/good-lora", headers=_hdr(key), timeout=TIMEOUT))
    add("delete another tenant's adapter", (404,), lambda url, key: httpx.delete(
        url + "/v1/adapters/good-lora", headers=_hdr(key), timeout=TIMEOUT))
    add("delete through the admin path", (404,), lambda url, key: httpx.delete(
        url + "/v1/adapters/good%2Fgood-lora", headers=_hdr(key), timeout=TIMEOUT))

    # --- auth and routing -------------------------------------------------------------------
    add("no key", (401,), lambda url, key: httpx.post(url + "/generate", json={"inputs": "x"}, timeout=TIMEOUT))
    add("wrong key", (401,), lambda url, key: httpx.post(url + "/generate", json={"inputs": "x"},
                                                         headers=_hdr("sk-guess"), timeout=TIMEOUT))
    add("unknown route", (404,), lambda url, key: httpx.get(url + "/v2/nothing", timeout=TIMEOUT))
    add("wrong method", (405,), lambda url, key: httpx.delete(url + "/generate", timeout=TIMEOUT))
    return out
