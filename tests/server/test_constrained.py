"""JSON-constrained decoding: response_format json_schema / json_object and TGI's grammar. Rows
with different schemas, adapters of different types and no constraint at all share steps; every
constrained output parses and validates against its own schema, greedy and sampled."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import jsonschema
import pytest

from tests.adapters.cases import CASES, make
from tests.server.harness import ThreadServer, adapter_files, upload

ENUM = {"enum": ["red", "green", "blue"]}
SMALL = {"type": "integer", "minimum": -9, "maximum": 99}
WORD = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "boolean"}, ENUM, WORD, SMALL, {"type": "null"}, {"const": "fixed"},
    {"type": "array", "items": ENUM, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": ENUM, "n": SMALL}, "required": ["color", "n"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": WORD, "tags": {"type": "array", "items": WORD, "maxItems": 2}},
     "required": ["name", "tags"], "additionalProperties": False},
    {"anyOf": [{"type": "boolean"}, SMALL]},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"v": ENUM}, "required": ["v"],
                                                "additionalProperties": False}},
     "required": ["inner"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": SMALL}, "required": ["k"],
                                "additionalProperties": False}, "minItems": 1, "maxItems": 2},
    {"enum": [1, 2, 3, "four"]},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"const": 7}},
     "required": ["a", "b", "c"], "additionalProperties": False},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "array", "prefixItems": [ENUM, {"type": "boolean"}], "items": False},
    {"type": "object", "properties": {"id": SMALL, "label": WORD, "on": {"type": "boolean"}},
     "required": ["id", "label", "on"], "additionalProperties": False},
]
ADAPTERS = {"c-lora": CASES[0], "c-prefix": CASES[3], "c-qaa": CASES[4]}


@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    with ThreadServer(tiny_dir, tmp_path_factory.mktemp("store"), max_running=16, max_waiting=256) as s:
        for i, (name, case) in enumerate(ADAPTERS.items()):
            assert upload(s.url, name, adapter_files(make(case, s.state.engine.shape, seed=60 + i))).status_code == 201
        yield s


def _chat(url, model, schema, temperature, seed):
    return httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 80,
        "temperature": temperature, "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_every_row_follows_its_own_schema_in_one_mixed_batch(srv, temperature):
    jobs = [(model, schema, i) for i, schema in enumerate(SCHEMAS) for model in ADAPTERS]
    with cf.ThreadPoolExecutor(24) as pool:
        free = pool.submit(httpx.post, srv.url + "/v1/completions", timeout=120, json={
            "model": srv.state.model_name, "prompt": "free text beside them", "max_tokens": 40,
            "temperature": temperature, "ignore_eos": True})
        results = list(pool.map(lambda j: _chat(srv.url, j[0], j[1], temperature, j[2]), jobs))
    for (model, schema, _), r in zip(jobs, results):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", (model, schema, choice)
        try:
            out = json.loads(choice["message"]["content"])
        except ValueError:
            raise AssertionError((model, schema, choice["message"]["content"]))
        jsonschema.validate(out, schema)
    assert free.result().json()["usage"]["completion_tokens"] == 40  # the unconstrained row ran free


def test_json_object_and_tgi_grammar(srv):
    r = httpx.post(srv.url + "/v1/completions", json={
        "model": "c-qaa", "prompt": "JSON:", "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_object", "value": SCHEMAS[9]}}).json()  # huggingface_hub's shape
    jsonschema.validate(json.loads(r["choices"][0]["text"]), SCHEMAS[9])
    t = httpx.post(srv.url + "/generate", json={"inputs": "JSON:", "parameters": {
        "adapter_id": "c-lora", "max_new_tokens": 60, "grammar": {"type": "json", "value": SCHEMAS[10]}}}).json()
    jsonschema.validate(json.loads(t["generated_text"]), SCHEMAS[10])


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}},
    {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 1000] * 100}}}, {"type": "xml"}])
def test_unusable_formats_are_refused(srv, fmt):
    r = httpx.post(srv.url + "/v1/completions", json={"model": srv.state.model_name, "prompt": "x", "max_tokens": 4,
                                                      "response_format": fmt})
    assert r.status_code == 400 and r.json()["error"]["message"]
