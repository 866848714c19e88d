"""Chunked prefill through the server: a small token budget per step splits long prompts
into chunks that run beside other requests' decode tokens, and changes no output."""

import concurrent.futures as cf

import pytest

from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, make
from tests.server.harness import ThreadServer, adapter_files, generate, upload

BUDGET = 13  # tokens per step: 8 decode rows at most, so chunks of 5 or more tokens


@pytest.fixture(scope="module")
def srv(tiny_dir, tmp_path_factory):
    with ThreadServer(tiny_dir, tmp_path_factory.mktemp("store"), max_running=8, max_device_adapters=8,
                      max_num_batched_tokens=BUDGET) as s:
        yield s


def test_long_prompts_in_chunks_beside_decoding_rows_equal_each_alone(srv, tiny_dir):
    shape = srv.state.engine.shape
    ads = {f"c-{c.name}": make(c, shape, seed=70 + i) for i, c in enumerate(CASES)}
    for name, ad in ads.items():
        assert upload(srv.url, name, adapter_files(ad)).status_code == 201
    names = [*ads, None, *ads]
    prompts = [f"request {i}: " + "lorem ipsum dolor sit amet " * (2 + i % 5) for i in range(len(names))]
    lengths = [3 + (5 * i) % 11 for i in range(len(names))]
    sch, plans = srv.state.scheduler, []
    plan = sch._plan

    def recorded():  # (still prefilling?, prompt tokens, tokens fed) of each row of each step
        work = plan()
        plans.append([(r.seq.prefilling, len(r.seq.prompt_ids), n) for r, n in work])
        return work

    sch._plan = recorded
    try:
        with cf.ThreadPoolExecutor(len(names)) as pool:
            got = list(pool.map(lambda a: generate(srv.url, a[0], adapter_id=a[1], max_new_tokens=a[2], ignore_eos=True),
                                zip(prompts, names, lengths)))
    finally:
        del sch._plan
    local = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=256, max_adapters=1)
    for r, p, n, k in zip(got, prompts, names, lengths):
        assert r.status_code == 200, r.text
        if n is not None:
            local.load_adapter("x", ads[n])
        alone = local.generate([p], SamplingParams(max_new_tokens=k, ignore_eos=True), adapters=["x" if n else None])[0]
        if n is not None:
            local.adapters.unload("x")
        assert r.json()["generated_text"] == alone.text, n
    steps = [p for p in plans if p]
    assert all(sum(n for *_, n in p) <= BUDGET for p in steps)
    # prompts (about 40-120 tokens) went in several chunks, some while other rows decoded
    assert any(pre and n < total for p in steps for pre, total, n in p)
    assert any(any(pre for pre, *_ in p) and any(not pre for pre, *_ in p) for p in steps)


def test_budget_not_above_the_running_limit_is_refused(tiny_dir, tmp_path):
    from server.cli import build, parse_args
    from tests.server.harness import server_args

    with pytest.raises(SystemExit, match="--max-num-batched-tokens"):
        build(parse_args(server_args(tiny_dir, tmp_path, 0, max_running=8, max_num_batched_tokens=8)))
