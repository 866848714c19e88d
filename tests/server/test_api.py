"""The HTTP API against a real uvicorn server on loopback (tiny model)."""

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest

from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, make
from tests.server.harness import ThreadServer, adapter_files, generate, metrics, sse_events, upload


@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    with ThreadServer(tiny_dir, tmp_path_factory.mktemp("store"), max_running=8, max_waiting=64,
                      max_device_adapters=4) as s:
        yield s


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The same model, run directly: what each request should get when run alone."""
    return Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=256, max_adapters=1)


def alone(local, ad, prompt, n):
    if ad is not None:
        local.load_adapter("x", ad)
    out = local.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True), adapters=["x" if ad else None])[0]
    if ad is not None:
        local.adapters.unload("x")
    return out.text


def test_concurrent_mixed_adapters_equal_each_alone(srv, local):
    """N concurrent requests, N different adapters of every type (more than the device slots
    per type, so adapters are loaded and evicted while others run) == each run alone. Their
    lengths differ, so rows finish mid-batch and the others' KV moves down (compaction)."""
    ads = {}
    for i, case in enumerate(CASES * 2):
        ads[f"mix-{i}"] = make(case, srv.state.engine.shape, seed=100 + i)
        assert upload(srv.url, f"mix-{i}", adapter_files(ads[f"mix-{i}"])).status_code == 201
    names = list(ads) + [None]
    prompts = [f"prompt number {i} " + "ab" * i for i in range(len(names))]
    lengths = [4 + (7 * i) % 13 for i in range(len(names))]
    with cf.ThreadPoolExecutor(len(names)) as pool:
        futs = [pool.submit(generate, srv.url, p, adapter_id=n, max_new_tokens=k, ignore_eos=True)
                for p, n, k in zip(prompts, names, lengths)]
        got = [f.result() for f in futs]
    for r, p, n, k in zip(got, prompts, names, lengths):
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == alone(local, ads.get(n), p, k), n
        assert r.json()["details"]["generated_tokens"] == k


def test_request_arriving_mid_decode_is_admitted_before_others_finish(srv):
    finished = {}

    def run(name, n):
        generate(srv.url, "long or short", max_new_tokens=n, ignore_eos=True)
        finished[name] = time.monotonic()

    long = threading.Thread(target=run, args=("long", 200))
    long.start()
    t0 = time.monotonic()
    while srv.state.scheduler.running == [] and time.monotonic() - t0 < 30:
        time.sleep(0.005)
    assert srv.state.scheduler.running, "the long request never started"
    run("short", 3)
    long.join()
    assert finished["short"] < finished["long"]


def test_upload_use_replace_delete(srv, local):
    shape = srv.state.engine.shape
    v1, v2 = make(CASES[0], shape, seed=1), make(CASES[0], shape, seed=2)
    r = upload(srv.url, "life", adapter_files(v1))
    assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["type"] == "lora"
    text1 = generate(srv.url, "hello", adapter_id="life", max_new_tokens=10, ignore_eos=True).json()["generated_text"]
    assert text1 == alone(local, v1, "hello", 10)
    r = upload(srv.url, "life", adapter_files(v2))
    assert r.status_code == 200 and r.json()["version"] == 2
    text2 = generate(srv.url, "hello", adapter_id="life", max_new_tokens=10, ignore_eos=True).json()["generated_text"]
    assert text2 == alone(local, v2, "hello", 10) != text1
    listed = {a["id"]: a for a in httpx.get(srv.url + "/v1/adapters").json()["data"]}
    assert listed["life"]["version"] == 2 and listed["life"]["size_bytes"] > 0
    assert listed["life"]["residency"] in ("device", "host")
    assert httpx.delete(srv.url + "/v1/adapters/life").status_code == 200
    assert generate(srv.url, "hello", adapter_id="life").status_code == 404
    assert httpx.get(srv.url + "/v1/adapters/life").status_code == 404


def test_replacement_while_running_finishes_on_old_version(srv, local):
    shape = srv.state.engine.shape
    old, new = make(CASES[4], shape, seed=3), make(CASES[4], shape, seed=4)
    upload(srv.url, "swap", adapter_files(old))
    with httpx.stream("POST", srv.url + "/generate_stream", timeout=60,
                      json={"inputs": "swap me", "parameters": {"adapter_id": "swap", "max_new_tokens": 60, "ignore_eos": True}}) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # running now
        assert upload(srv.url, "swap", adapter_files(new)).status_code == 200
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data:")]
    assert rest[-1]["generated_text"] == alone(local, old, "swap me", 60)
    after = generate(srv.url, "swap me", adapter_id="swap", max_new_tokens=60, ignore_eos=True).json()
    assert after["generated_text"] == alone(local, new, "swap me", 60)


def test_malformed_uploads_change_nothing(srv):
    from adapters.files import CONFIG_NAME, WEIGHTS_NAME

    shape = srv.state.engine.shape
    good = adapter_files(make(CASES[2], shape, seed=5))
    assert upload(srv.url, "keep", good).status_code == 201
    before = generate(srv.url, "x y z", adapter_id="keep", max_new_tokens=8, ignore_eos=True).json()
    store_root = srv.state.store.root
    files_before = sorted(str(p.relative_to(store_root)) for p in store_root.rglob("*"))
    bad = [
        ("not json", {CONFIG_NAME: b"{nope", WEIGHTS_NAME: good[WEIGHTS_NAME]}, 422),
        ("truncated", {CONFIG_NAME: good[CONFIG_NAME], WEIGHTS_NAME: good[WEIGHTS_NAME][:-50]}, 422),
        ("missing part", {CONFIG_NAME: good[CONFIG_NAME]}, 422),
        ("other model", {CONFIG_NAME: json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4,
                                                   "num_layers": 30}).encode(), WEIGHTS_NAME: good[WEIGHTS_NAME]}, 422),
    ]
    for name, files, status in bad:
        for target in ("keep", "fresh"):
            r = upload(srv.url, target, files)
            assert r.status_code == status, (name, r.text)
            assert set(r.json()) == {"error", "error_type"}
    r = upload(srv.url, "../escape", good)
    assert r.status_code in (404, 422)
    assert sorted(str(p.relative_to(store_root)) for p in store_root.rglob("*")) == files_before
    assert generate(srv.url, "x y z", adapter_id="keep", max_new_tokens=8, ignore_eos=True).json() == before
    assert httpx.get(srv.url + "/v1/adapters/fresh").status_code == 404


def test_streaming_and_disconnect(srv):
    body = {"inputs": "stream", "parameters": {"max_new_tokens": 20, "ignore_eos": True}}
    with httpx.stream("POST", srv.url + "/generate_stream", json=body, timeout=60) as resp:
        events = sse_events(resp)
    # TGI's shape: one event per token, the last one carrying generated_text and details
    assert len(events) == 20 and events[-1]["details"]["generated_tokens"] == 20
    assert all(e["generated_text"] is None for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]

    m = srv.state.metrics.requests.labels(outcome="cancelled", adapter_type="base")
    cancelled_before = m._value.get()
    body["parameters"]["max_new_tokens"] = 200
    with httpx.stream("POST", srv.url + "/generate_stream", json=body, timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 3:
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while m._value.get() == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m._value.get() == cancelled_before + 1
    assert not srv.state.scheduler.running and srv.state.engine.cache.n_free == srv.state.engine.cache.n_slots


def test_limits_and_errors(srv):
    r = generate(srv.url, "x", max_new_tokens=10_000)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = generate(srv.url, "x" * 300, max_new_tokens=5)
    assert r.status_code == 422 and "prompt tokens" in r.json()["error"]
    r = generate(srv.url, "", max_new_tokens=5)
    assert r.status_code == 422 and "empty" in r.json()["error"]
    r = generate(srv.url, "x", adapter_id="never-uploaded")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = generate(srv.url, "x", temperature=-1)
    assert r.status_code == 422
    r = httpx.post(srv.url + "/generate", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and set(r.json()) == {"error", "error_type"}


def test_openai_client(srv):
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    model = srv.state.model_name
    assert model in [m.id for m in client.models.list().data]
    c = client.completions.create(model=model, prompt="Once upon", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8
    direct = generate(srv.url, "Once upon", max_new_tokens=8, ignore_eos=True).json()["generated_text"]
    assert c.choices[0].text == direct
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=model, prompt="Once upon", max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == direct
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}],
                                          max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}],
                                                 max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    # token-id prompts and stream_options.include_usage, as benchmark clients send them
    ids = [40, 41, 42, 43, 44]
    chunks = list(client.completions.create(model=model, prompt=ids, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 5
    assert chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    whole = client.completions.create(model=model, prompt=ids, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text


def test_info_describes_the_served_model(srv, tiny_dir):
    from engine.config import ModelConfig
    from engine.engine import cpu_bf16

    info = httpx.get(srv.url + "/info").json()
    hf = json.loads((tiny_dir / "config.json").read_text())
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads"):
        assert info["model_config"][k] == hf[k], k
    assert info["model_config"]["head_dim"] == ModelConfig.from_dir(tiny_dir).head_dim
    assert info["model_id"] == srv.state.model_name and info["max_total_tokens"] == 256
    assert info["max_concurrent_requests"] == 8 and set(info["adapter_types"]) == {"lora", "sora", "prefix", "qaa"}
    # the suite's servers run fp32 ($QAA_DTYPE); cpu_bf16 reports what this host's CPU has
    assert info["model_dtype"] == "float32" and info["cpu_bf16"] == cpu_bf16()


def test_metrics_parse_and_count(srv):
    key = 'qaa_e2e_request_latency_seconds_count{"adapter_type": "base"}'
    before = metrics(srv.url)
    for _ in range(3):
        assert generate(srv.url, "count me", max_new_tokens=4, ignore_eos=True).status_code == 200
    after = metrics(srv.url)
    assert after[key] - before.get(key, 0) == 3
    ttft = 'qaa_time_to_first_token_seconds_count{"adapter_type": "base"}'
    assert after[ttft] - before.get(ttft, 0) == 3
    itl = 'qaa_inter_token_latency_seconds_count{"adapter_type": "base"}'
    assert after[itl] - before.get(itl, 0) == 9
    gen = "qaa_generation_tokens_total{}"
    assert after[gen] - before[gen] == 12
    names = {k.split("{")[0] for k in after}
    for expected in ("qaa_queue_time_seconds_bucket", "qaa_adapter_load_seconds_bucket", "qaa_adapter_cache_hits_total",
                     "qaa_requests_running", "qaa_requests_waiting", "qaa_kv_cache_usage_ratio", "qaa_prompt_tokens_total"):
        assert expected in names
    # label values never carry adapter ids: cardinality stays bounded
    assert not any("mix-" in k or "life" in k for k in after)


def test_an_adapter_with_an_invalid_config_is_left_out_of_the_listing_and_can_be_deleted(srv):
    """Its current version's config does not parse here (written by a newer server during a
    rolling upgrade): the listing still answers with the others, the adapter itself is 404,
    and DELETE removes it."""
    files = adapter_files(make(CASES[0], srv.state.engine.shape, seed=5))
    for name in ("fine", "broken"):
        assert upload(srv.url, name, files).status_code == 201
    adir = srv.state.store.root / "default" / "broken"
    (adir / ".claim-v2").touch()  # v2 as a newer server sharing the store would write it
    (adir / ".v2").mkdir()
    (adir / ".v2" / "adapter_config.json").write_text(json.dumps({"peft_type": "FROM_THE_FUTURE"}))
    (adir / ".v2" / "adapter_model.safetensors").write_bytes(files["adapter_model.safetensors"])
    (adir / ".v2").rename(adir / "v2")
    time.sleep(1.05)  # the listing's staleness bound: Store.refresh_seconds, 1 s by default
    for path in ("/v1/adapters", "/v1/models"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 200 and "fine" in [a["id"] for a in r.json()["data"]], r.text
        assert "broken" not in [a["id"] for a in r.json()["data"]]
    assert httpx.get(srv.url + "/v1/adapters/broken").status_code == 404
    assert generate(srv.url, "hi", adapter_id="broken").status_code == 404
    assert httpx.delete(srv.url + "/v1/adapters/broken").status_code == 200
    assert not adir.exists()
    assert httpx.delete(srv.url + "/v1/adapters/broken").status_code == 404
    assert httpx.delete(srv.url + "/v1/adapters/fine").status_code == 200
