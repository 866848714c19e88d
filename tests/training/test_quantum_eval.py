"""qaa-eval --shots / --noise on the tiny model: every setting runs through the serving path."""

import json

import pytest

from adapters.files import save_dir
from adapters.qaa import QAAConfig
from engine.config import ModelConfig
from tests.adapters.cases import Case, make
from training.cli_eval import eval_main


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qeval")
    shape = ModelConfig.from_dir(tiny_dir).shape()
    ad = make(Case("q", "qaa", lambda: QAAConfig(circuit_layers=2)), shape, seed=4)
    for k in ad.tensors:  # a strong adapter, so that its circuit decides the tiny model's tokens
        if k.endswith("up.weight"):
            ad.tensors[k] = ad.tensors[k] * 30
    recs = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(60)]
    data = tmp / "d.json"
    data.write_text(json.dumps(recs))
    return save_dir(ad, tmp / "ad"), data, tmp


def test_shots_and_noise_sweep(setup, tiny_dir, capsys):
    """The table, the JSON and the plot; each setting changes the generated tokens as it should."""
    adapter, data, tmp = setup
    out = tmp / "sweep.json"
    rc = eval_main(["--adapter", str(adapter), "--data", str(data), "--model", str(tiny_dir), "--n", "3",
                    "--max-new-tokens", "8", "--device", "cpu", "--shots", "10",
                    "--noise", "depolarizing:0.3,depolarizing:0", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res) == ["base model", "exact", "10 shots", "depolarizing p=0.3", "depolarizing p=0"]
    table = capsys.readouterr().out
    assert all(f"| {k} |" in table for k in res)
    ids = {k: v["token_ids"] for k, v in res.items()}
    assert ids["exact"] != ids["base model"]  # the adapter is on
    assert ids["10 shots"] != ids["exact"]  # 10 shots per <Z> move the hidden states
    assert ids["depolarizing p=0"] == ids["exact"]  # p = 0 is the exact circuit
    assert ids["depolarizing p=0.3"] != ids["exact"]
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("args,message", [
    (["--shots", "0"], "qaa_shots must be an integer"),
    (["--shots", "ten"], "comma-separated integers"),
    (["--noise", "bitflip:0.1"], "depolarizing"),
])
def test_bad_sweep_options_are_one_line_errors(setup, tiny_dir, capsys, args, message):
    adapter, data, _ = setup
    rc = eval_main(["--adapter", str(adapter), "--data", str(data), "--model", str(tiny_dir), "--n", "2", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("qaa-eval: error:")
