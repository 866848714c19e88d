"""qaa-loadtest against a real qaa-serve process on loopback (tiny model)."""

import json
from collections import Counter

import httpx
import pytest

from loadtest.cli import main
from loadtest.workload import Workload, specs
from tests.server.harness import ProcServer


def server_total(url, name) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_short_run_and_sweep_complete_with_a_well_formed_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "report"
    with ProcServer(tiny_dir, tmp_path / "store", max_device_adapters=3, max_host_adapters=5) as srv:
        finished_before = server_total(srv.url, "qaa_requests_total")
        argv = ["--url", srv.url, "--sweep-adapters", "1,8", "--types", "qaa:2,lora,sora,prefix", "--requests", "24",
                "--concurrency", "6", "--input-len", "4:24", "--output-len", "2:12", "--baseline", "--seed", "4",
                "--out", str(out), "--quiet"]
        assert main(argv) == 0
        served = server_total(srv.url, "qaa_requests_total") - finished_before
        left = httpx.get(srv.url + "/v1/adapters").json()["data"]
    assert left == []  # what the run uploaded, it removed
    report = json.loads((out / "report.json").read_text())
    runs = {r["label"]: r for r in report["runs"]}
    assert list(runs) == ["baseline", "adapters=1", "adapters=8"]
    asked = [s.output_len for s in specs(Workload(requests=24, input_len=(4, 24), output_len=(2, 12), seed=4))]
    for r in runs.values():
        assert r["errors"] == 0 and r["completed"] == r["requests"] == 24
        assert r["output_tokens"] == sum(asked)  # ignore_eos: exactly what the workload asked for
        assert r["output_throughput"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p90"] <= r["ttft_s"]["p99"] <= r["e2e_s"]["p99"]
        assert r["slo_attainment"] == 1.0
    assert served == 3 * 24 + 1  # and the server counted each of them (plus the warm-up)
    assert runs["baseline"]["requests_by_type"] == {"base": 24}
    mix = runs["adapters=8"]["requests_by_type"]
    assert set(mix) <= {"qaa", "lora", "sora", "prefix"} and sum(mix.values()) == 24
    assert runs["adapters=1"]["distinct_adapters_used"] == 1 and runs["adapters=8"]["distinct_adapters_used"] > 3
    # 8 adapters over 3 device slots: the server loaded adapters during the run
    assert runs["adapters=8"]["adapter_loads"]["loads"]["device"] >= 4
    assert runs["baseline"]["adapter_loads"]["loads"] == {"device": 0, "host": 0}
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert Counter(x["run"] for x in lines) == {"baseline": 24, "adapters=1": 24, "adapters=8": 24}
    assert all(x["output_tokens"] == x["output_len"] and x["sent"] <= x["first_token"] <= x["end"] for x in lines)
    # one gap per token chunk after the first (the server sends no chunk for a token whose text
    # is still incomplete, as vLLM), spanning first token to the last one
    assert all(len(x["itl"]) <= x["output_tokens"] - 1 and sum(x["itl"]) <= x["end"] - x["first_token"] + 1e-6
               for x in lines)
    gaps = sorted(g for x in lines if x["run"] == "baseline" for g in x["itl"])
    assert runs["baseline"]["itl_s"]["p50"] == pytest.approx((gaps[(len(gaps) - 1) // 2] + gaps[len(gaps) // 2]) / 2)
    md = (out / "report.md").read_text()
    assert md.count("\n| adapters=") == 2 and "![latency_cdf](latency_cdf.png)" in md and "![sweep](sweep.png)" in md
    for png in ("latency_cdf.png", "sweep.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| baseline | 0 | 24/24 |" in capsys.readouterr().out


def test_server_errors_are_counted_not_fatal(tiny_dir, tmp_path):
    """A server with a tiny queue and a low max_new_tokens: 429s and 422s are tallied by kind
    and the run finishes."""
    out = tmp_path / "report"
    w = Workload(rate=400.0, requests=40, input_len=(4, 8), output_len=(4, 16), seed=2)
    too_long = sum(s.output_len > 10 for s in specs(w))
    with ProcServer(tiny_dir, tmp_path / "store", max_running=1, max_waiting=1, max_new_tokens=10) as srv:
        argv = ["--url", srv.url, "--adapters", "0", "--rate", "400", "--requests", "40", "--input-len", "4:8",
                "--output-len", "4:16", "--seed", "2", "--out", str(out), "--quiet"]
        assert main(argv) == 0
    run = json.loads((out / "report.json").read_text())["runs"][0]
    kinds = run["errors_by_kind"]
    assert kinds["http_400_validation"] == too_long  # OpenAI's status for bad input, our error code
    assert kinds.get("http_429_overloaded", 0) > 0 and set(kinds) == {"http_400_validation", "http_429_overloaded"}
    assert run["completed"] + run["errors"] == run["requests"] == 40 and run["completed"] > 0
    assert run["slo_attainment"] <= run["completed"] / 40


def test_bad_target_or_arguments_exit_2_with_one_line(tmp_path, capsys):
    from tests.server.harness import free_port

    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--requests", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qaa-loadtest: error: cannot reach") and "\n" not in err
    for argv in (["--url", "x://nope"], ["--url", "http://h", "--rate", "2", "--concurrency", "2"],
                 ["--url", "http://h", "--types", "qaa,dora"], ["--url", "http://h", "--input-len", "a:b"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
