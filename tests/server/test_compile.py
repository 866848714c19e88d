"""qaa-serve --compile: the scheduler's steps that only decode go through the captured step."""

import concurrent.futures as cf

from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, make
from tests.server.harness import ThreadServer, adapter_files, generate, upload


def test_requests_through_the_captured_step_get_what_they_get_alone(tiny_dir, tmp_path):
    """Eight concurrent requests over four KV slots (rows finish and join; prompts longer than
    the step's token budget, so prefill chunks share steps with decode rows), each with an
    adapter of the table or none: each gets the greedy completion it gets alone from an eager
    engine; the pure-decode steps ran captured (--compile-backend none: the static step itself,
    tests/engine/test_graph.py covers compiling it) and none fell back to the eager step."""
    local = Engine(tiny_dir, device="cpu", max_batch=1, max_seq_len=256, max_adapters=8)
    names = [c.name for c in CASES] + [None, None]
    prompts = [("tell me about item %d " % i) * (3 + i) for i in range(len(names))]
    with ThreadServer(tiny_dir, tmp_path, max_running=4, max_num_batched_tokens=24, compile=True,
                      compile_backend="none") as s:
        for i, case in enumerate(CASES):
            ad = make(case, local.shape, seed=i)
            local.load_adapter(case.name, ad)
            assert upload(s.url, case.name, adapter_files(ad)).status_code in (200, 201)
        params = dict(max_new_tokens=12, ignore_eos=True)
        with cf.ThreadPoolExecutor(len(names)) as pool:
            got = list(pool.map(lambda a: generate(s.url, a[0], **params, **({"adapter_id": a[1]} if a[1] else {})),
                                zip(prompts, names)))
        graph = s.state.engine.graph
        assert graph.steps and graph.fallbacks == 0
        assert "no torch.compile" in graph.describe()
    for r, p, name in zip(got, prompts, names):
        assert r.status_code == 200, r.text
        alone = local.generate([p], SamplingParams(**params), adapters=[name])[0].text
        assert r.json()["generated_text"] == alone, name
