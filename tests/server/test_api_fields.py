"""OpenAI/vLLM/TGI request fields and endpoints, through the clients users have: each field is
honoured (checked by behaviour) or refused with an error that names it."""

from __future__ import annotations

import httpx
import openai
import pytest

from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, make
from tests.server.harness import ThreadServer, adapter_files, sse_events, upload


@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    with ThreadServer(tiny_dir, tmp_path_factory.mktemp("store"), max_running=4) as s:
        assert upload(s.url, "fields-lora", adapter_files(make(CASES[0], s.state.engine.shape, seed=8))).status_code == 201
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("suffix", "end"), ("top_logprobs", 3)])
def test_unimplemented_or_inconsistent_fields_are_refused_by_name(srv, client, field, value):
    create = client.chat.completions.create if field in ("tools", "top_logprobs") \
        else client.completions.create
    kw = {"messages": [{"role": "user", "content": "hi"}]} if create == client.chat.completions.create \
        else {"prompt": "hi"}
    with pytest.raises(openai.BadRequestError) as e:
        create(model=srv.state.model_name, max_tokens=2, extra_body={field: value}, **kw)
    assert field in str(e.value)


def _text(client, srv, **kw):
    return client.completions.create(model=srv.state.model_name, prompt="Bias me", max_tokens=6, **GREEDY,
                                     **kw).choices[0].text


def test_logit_bias_forces_and_bans_tokens(srv, client, tiny_dir):
    z = httpx.post(srv.url + "/tokenize", json={"prompt": "Z", "add_special_tokens": False}).json()["tokens"]
    assert len(z) == 1
    assert _text(client, srv, logit_bias={str(z[0]): 100}) == "Z" * 6
    # the greedy first token, banned, is never drawn: the text changes from its first token
    from engine.engine import Engine

    local = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=256)  # the served model, run here
    first = local.generate(["Bias me"], SamplingParams(max_new_tokens=1))[0].token_ids[0]
    plain = _text(client, srv)
    banned = _text(client, srv, logit_bias={str(first): -100})
    assert banned != plain and _text(client, srv, logit_bias={str(first): 0}) == plain


def test_penalties_and_vllm_fields_reach_the_sampler(srv, client):
    m = srv.state.model_name
    plain = client.completions.create(model=m, prompt="aaaa", max_tokens=24, **GREEDY).choices[0].text
    pen = client.completions.create(model=m, prompt="aaaa", max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0,
                                    **GREEDY).choices[0].text
    assert pen != plain
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model=m, prompt="x", max_tokens=2, extra_body={"min_tokens": 5})
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=m, prompt="x", max_tokens=2, extra_body={"stop_token_ids": [10**6]})


def test_content_parts_and_roles(srv, client):
    m = srv.state.model_name

    def say(messages):
        return client.chat.completions.create(model=m, messages=messages, max_tokens=8, **GREEDY).choices[0].message.content

    whole = say([{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}])
    parts = say([{"role": "developer", "content": "be brief"},
                 {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    assert parts == whole
    assert say([{"role": "user", "content": "x"}, {"role": "assistant", "content": None},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    with pytest.raises(openai.BadRequestError, match="image_url"):
        say([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])


def test_chat_without_max_tokens_runs_to_the_context(srv, client):
    r = client.chat.completions.create(model=srv.state.model_name, messages=[{"role": "user", "content": "go on"}],
                                       **GREEDY)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == srv.state.engine.max_seq_len


def test_tgi_root_route_and_tokenize_endpoints(srv):
    body = {"inputs": "root route", "parameters": {"max_new_tokens": 5, "ignore_eos": True}}
    direct = httpx.post(srv.url + "/generate", json=body).json()
    assert httpx.post(srv.url + "/", json=body).json() == direct
    with httpx.stream("POST", srv.url + "/", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1]["generated_text"] == direct["generated_text"] and len(events) == 5
    tok = httpx.post(srv.url + "/tokenize", json={"prompt": "tokens, please"}).json()
    assert tok["tokens"] == srv.state.engine.encode_prompt("tokens, please") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == srv.state.engine.max_seq_len
    chat = httpx.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == srv.state.engine.encode_prompt([{"role": "user", "content": "hi"}], chat=True)
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": "round trip", "add_special_tokens": False}).json()["tokens"]
    assert httpx.post(srv.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": "round trip"}
    assert httpx.post(srv.url + "/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_model_card_version_and_request_id(srv, client):
    assert client.models.retrieve("fields-lora").id == "fields-lora"
    assert client.models.retrieve(srv.state.model_name).id == srv.state.model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody")
    assert httpx.get(srv.url + "/version").json()["version"] == srv.app.version
    r = httpx.get(srv.url + "/health", headers={"x-request-id": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    made = httpx.get(srv.url + "/nowhere", headers={"x-request-id": "bad id with spaces"})
    assert made.status_code == 404 and len(made.headers["x-request-id"]) == 32
    assert made.headers["x-request-id"] != httpx.get(srv.url + "/nowhere").headers["x-request-id"]


@pytest.fixture(scope="module")
def local(tiny_dir):
    from engine.engine import Engine

    return Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=256)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_log_softmax_of_the_models_logits(srv, client, local, stream):
    import torch

    ids = [40, 41, 42, 43, 44, 45]
    kw = dict(model=srv.state.model_name, prompt=ids, max_tokens=5, logprobs=3, **GREEDY)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs]
        tops = [t for c in chunks if c.logprobs for t in c.logprobs.top_logprobs]
    else:
        lp = client.completions.create(**kw).choices[0].logprobs
        tokens, tops = lp.token_logprobs, lp.top_logprobs
    assert len(tokens) == len(tops) == 5
    out = local.generate([ids], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        logits = local.model(torch.tensor([ids + out]))[0].float()  # (T, V), every position
    ref = logits.log_softmax(-1)[len(ids) - 1: len(ids) - 1 + 5]
    want = ref.gather(1, torch.tensor(out)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(tokens), want, atol=1e-4)
    for row, top in zip(ref, tops):
        k = row.topk(3)
        assert sorted(top.values(), reverse=True) == pytest.approx(k.values.tolist(), abs=1e-4)


def test_chat_logprobs_and_top_logprobs(srv, client):
    r = client.chat.completions.create(model=srv.state.model_name, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    # greedy: the drawn token is the most likely one
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)
    assert "".join(c.token for c in content) == r.choices[0].message.content


def test_n_with_a_seed_is_n_different_completions_repeatably(srv, client):
    kw = dict(model=srv.state.model_name, prompt="Once", max_tokens=12, n=3, seed=7, temperature=1.0,
              extra_body={"ignore_eos": True})
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b and len(set(a)) == 3
    streamed = {}
    for c in client.completions.create(stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[i] for i in range(3)] == a
    best = client.completions.create(best_of=3, **{**kw, "n": 1})
    assert best.choices[0].text in a and best.usage.completion_tokens == 36


def test_echo_returns_the_prompt_first(srv, client):
    m = srv.state.model_name
    plain = client.completions.create(model=m, prompt="Echo me", max_tokens=4, **GREEDY).choices[0].text
    echoed = client.completions.create(model=m, prompt="Echo me", max_tokens=4, echo=True, **GREEDY).choices[0].text
    assert echoed == "Echo me" + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=m, prompt="Echo me", max_tokens=4, echo=True, stream=True, **GREEDY))
    assert streamed == echoed


def test_echo_with_logprobs_scores_the_prompt_tokens(srv, client, tiny_dir):
    """OpenAI's legacy completions: with echo and logprobs, the logprobs cover the prompt's
    tokens first (the first without a logprob), each log p(token | the ones before) from the
    model's fp32 log-softmax, then the generated tokens as without echo; streamed, the echo
    chunk carries the prompt's part."""
    import torch

    from engine.engine import Engine

    m, prompt = srv.state.model_name, "Score my tokens"
    local = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=64)
    ids = local.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = local.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    plain = client.completions.create(model=m, prompt=prompt, max_tokens=3, logprobs=2, **GREEDY).choices[0]
    out = client.completions.create(model=m, prompt=prompt, max_tokens=3, logprobs=2, echo=True, **GREEDY).choices[0]
    lp, L = out.logprobs, len(ids)
    assert out.text == prompt + plain.text
    assert lp.tokens[:L] == [local.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, L):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        # keyed by text, as OpenAI's: two tokens of one text (byte pieces) share a key
        assert 1 <= len(lp.top_logprobs[i]) <= 2 and max(lp.top_logprobs[i].values()) == pytest.approx(
            ref[i - 1].max().item(), abs=1e-4)
    assert lp.tokens[L:] == plain.logprobs.tokens
    assert lp.token_logprobs[L:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-6)
    chunks = list(client.completions.create(model=m, prompt=prompt, max_tokens=3, logprobs=2, echo=True, stream=True,
                                            **GREEDY))
    assert chunks[0].choices[0].text == prompt
    assert chunks[0].choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:L], abs=1e-6)
    assert "".join(c.choices[0].text for c in chunks) == out.text


def test_vllm_runtime_lora_loading_only_under_its_root(tiny_dir, tmp_path, srv):
    from adapters.files import save_dir

    root = tmp_path / "loras"
    ad = make(CASES[0], srv.state.engine.shape, seed=21)
    save_dir(ad, root / "team" / "a1")
    (tmp_path / "outside").mkdir()
    # off by default, as in vLLM
    assert httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a1"}).status_code == 404
    with ThreadServer(tiny_dir, tmp_path / "store", lora_load_root=root) as s:
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "synced", "lora_path": "team/a1"})
        assert r.status_code == 200 and "synced" in r.text
        via_path = httpx.post(s.url + "/v1/completions", json={"model": "synced", "prompt": "hi", "max_tokens": 6,
                                                               "temperature": 0, "ignore_eos": True}).json()
        assert upload(s.url, "uploaded", adapter_files(ad)).status_code == 201
        via_upload = httpx.post(s.url + "/v1/completions", json={"model": "uploaded", "prompt": "hi", "max_tokens": 6,
                                                                 "temperature": 0, "ignore_eos": True}).json()
        assert via_path["choices"][0]["text"] == via_upload["choices"][0]["text"]
        for bad in ("../outside", str(tmp_path / "outside"), "team/../../outside", "missing"):
            r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": bad})
            assert r.status_code == 400 and "lora_path" in r.text, (bad, r.text)
        assert httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "synced"}).status_code == 200
        gone = httpx.post(s.url + "/v1/completions", json={"model": "synced", "prompt": "hi", "max_tokens": 2})
        assert gone.status_code == 404


def test_huggingface_hub_inference_client(srv, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # the suite runs offline; this client talks to the server on loopback only
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = InferenceClient(base_url=srv.url)
    direct = httpx.post(srv.url + "/generate", json={"inputs": "Hub", "parameters": {
        "max_new_tokens": 6, "ignore_eos": True}}).json()["generated_text"]
    out = hub.text_generation("Hub", max_new_tokens=6, details=True, top_n_tokens=2)
    assert out.details.generated_tokens == len(out.details.tokens) and out.details.finish_reason in ("length", "eos_token")
    assert "".join(t.text for t in out.details.tokens) == out.generated_text
    assert all(t.logprob <= 0 for t in out.details.tokens) and all(len(tt) == 2 for tt in out.details.top_tokens)
    streamed = list(hub.text_generation("Hub", max_new_tokens=6, details=True, stream=True))
    assert "".join(s.token.text for s in streamed) == streamed[-1].generated_text == out.generated_text
    assert streamed[-1].details.generated_tokens == len(streamed)
    if out.details.finish_reason == "length":
        assert out.generated_text == direct
    # chat through the hub client, with and without a model name
    answers = []
    for model in (None, srv.state.model_name, "fields-lora"):
        r = hub.chat_completion([{"role": "user", "content": "Hi"}], model=model, max_tokens=4, temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens <= 4
        answers.append(r.choices[0].message.content)
    assert answers[0] == answers[1]  # no model name: the base model, as TGI serves it


def test_tgi_decoder_input_details_are_the_prompt_tokens_logprobs(srv, tiny_dir, monkeypatch):
    """details.prefill: every prompt token, the first without a logprob, each other with
    log p(token | the ones before) from the model's fp32 log-softmax; refused when streaming."""
    import huggingface_hub.constants
    import torch
    from huggingface_hub import InferenceClient

    from engine.engine import Engine

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = InferenceClient(base_url=srv.url)
    prompt = "the prompt's own tokens, scored"
    out = hub.text_generation(prompt, max_new_tokens=2, details=True, decoder_input_details=True)
    local = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=64)
    ids = local.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = local.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    pre = out.details.prefill
    assert [t.id for t in pre] == ids and pre[0].logprob is None
    assert "".join(t.text for t in pre) == local.tokenizer.decode(ids, skip_special_tokens=False)
    for i in range(1, len(ids)):
        assert pre[i].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
    plain = hub.text_generation(prompt, max_new_tokens=2, details=True)
    assert plain.details.prefill == [] and plain.generated_text == out.generated_text
    r = httpx.post(srv.url + "/generate_stream", json={"inputs": prompt, "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422 and "decoder_input_details" in r.json()["error"]


def test_tgi_best_of_returns_the_most_likely_of_its_seeded_sequences(srv, monkeypatch):
    """best_of=3 with seed s: the three sequences are exactly those of seeds s, s+1, s+2 asked
    one by one; the answer is the one with the highest logprob sum, the others follow in
    details.best_of_sequences. Greedy or streamed best_of is refused by name."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = InferenceClient(base_url=srv.url)
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, details=True)
    out = hub.text_generation("Pick one", best_of=3, seed=40, **kw)
    singles = {hub.text_generation("Pick one", seed=40 + i, **kw).generated_text: i for i in range(3)}
    seqs = [(out.generated_text, out.details.tokens), *((b.generated_text, b.tokens) for b in out.details.best_of_sequences)]
    assert len(seqs) == 3 and sorted(singles[text] for text, _ in seqs) == [0, 1, 2]
    sums = [sum(t.logprob for t in tokens) for _, tokens in seqs]
    assert sums == sorted(sums, reverse=True) and len(set(singles)) > 1
    assert hub.text_generation("Pick one", best_of=3, seed=40, **kw).generated_text == out.generated_text
    greedy = httpx.post(srv.url + "/generate", json={"inputs": "x", "parameters": {"best_of": 2}})
    streamed = httpx.post(srv.url + "/generate_stream", json={"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})
    assert greedy.status_code == streamed.status_code == 422
    assert "best_of" in greedy.json()["error"] and "best_of" in streamed.json()["error"]


@pytest.mark.parametrize("param,value", [("typical_p", 0.5), ("watermark", True),
                                         ("grammar", {"type": "regex", "value": "a+"}),
                                         ("no_such_parameter", 1)])
def test_tgi_parameters_not_implemented_are_refused_by_name(srv, param, value):
    r = httpx.post(srv.url + "/generate", json={"inputs": "x", "parameters": {param: value}})
    assert r.status_code == 422 and param in r.json()["error"]


def test_tgi_full_text_and_truncate(srv):
    body = {"inputs": "abcdefgh", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}
    plain = httpx.post(srv.url + "/generate", json=body).json()["generated_text"]
    full = httpx.post(srv.url + "/generate", json={**body, "parameters": {**body["parameters"],
                                                                          "return_full_text": True}}).json()
    assert full["generated_text"] == "abcdefgh" + plain
    cut = httpx.post(srv.url + "/generate", json={**body, "parameters": {**body["parameters"], "truncate": 3}}).json()
    assert cut["details"]["prompt_tokens"] == 3
    same = httpx.post(srv.url + "/generate", json={"inputs": "fgh", "parameters": {"max_new_tokens": 4, "ignore_eos": True}})
    # the tiny tokenizer is one token per byte: the last 3 tokens of the prompt are "fgh"
    assert cut["generated_text"] == same.json()["generated_text"]
