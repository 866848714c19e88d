"""Every qaa-* command explains itself: help text for every option with its default shown,
--version, and a bad invocation answered with one line and exit status 2 before any heavy
work (for qaa-serve: a taken port, before the model loads)."""

import argparse
import re
import socket
import subprocess
import sys
import time
from importlib.metadata import version

import pytest

from engine.cli import parse_args as generate_args
from loadtest.cli import parse_args as loadtest_args
from server.cli import parse_args as serve_args
from training.cli import parse_args as train_args
from training.cli_eval import compare_main, eval_main
from training.cli_export import parse_args as export_args

COMMANDS = {  # name: (entry point taking argv, required arguments)
    "qaa-generate": (generate_args, ["--prompt", "x"]),
    "qaa-serve": (serve_args, []),
    "qaa-train": (train_args, ["--method", "lora", "--data", "d", "--out", "o"]),
    "qaa-eval": (eval_main, ["--data", "d"]),
    "qaa-compare": (compare_main, ["--data", "d", "--out", "o"]),
    "qaa-export": (export_args, ["--adapter", "a", "--format", "specs"]),
    "qaa-loadtest": (loadtest_args, ["--url", "http://127.0.0.1:1"]),
}


class Caught(Exception):
    pass


def parser_of(entry, monkeypatch) -> argparse.ArgumentParser:
    """The parser an entry point builds, caught as it starts parsing."""
    seen = []

    def grab(self, *a, **kw):
        seen.append(self)
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(Caught):
        entry([])
    monkeypatch.undo()
    return seen[0]


def blocks(help_text: str) -> dict[str, str]:
    """--help's option section as {'--opt': 'its whole entry'}."""
    out, cur = {}, None
    for line in help_text.splitlines():
        m = re.match(r"  (-\w, )?(--[\w-]+)", line)
        if m:
            cur = m.group(2)
            out[cur] = line
        elif cur and line.startswith("    "):
            out[cur] += " " + line.strip()
        else:
            cur = None
    return out


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_text_and_default_for_every_option(name, monkeypatch):
    entry, _ = COMMANDS[name]
    p = parser_of(entry, monkeypatch)
    assert p.prog == name
    text = blocks(p.format_help())
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 7
    for a in options:
        entry_text = text[a.option_strings[-1]]
        described = entry_text.split(None, 1 + (a.nargs != 0))[-1]
        assert a.help and len(described) > 10, entry_text
        d = a.default
        has_default = not (d is None or d is False or d is argparse.SUPPRESS or d == [] or d == "")
        if has_default and a.dest != "version":
            assert "(default: " in entry_text, entry_text
        if a.choices:
            assert all(str(c) in entry_text for c in a.choices), entry_text


@pytest.mark.parametrize("name", COMMANDS)
def test_version(name, capsys):
    entry, _ = COMMANDS[name]
    with pytest.raises(SystemExit) as e:
        entry(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"{name} {version('qaa-serve')}\n"


BAD = [  # command, arguments beyond the required ones, words the one line must hold
    ("qaa-serve", ["--max-running", "0"], ["--max-running", ">= 1"]),
    ("qaa-serve", ["--port", "70000"], ["--port", "65535"]),
    ("qaa-serve", ["--log-format", "xml"], ["--log-format", "xml", "json"]),
    ("qaa-serve", ["--max-upload-mb", "nan"], ["--max-upload-mb", "finite"]),
    ("qaa-serve", ["--stats-interval", "-1"], ["--stats-interval"]),
    ("qaa-serve", ["--host", "0.0.0.0"], ["--api-keys", "loopback", "0.0.0.0"]),
    ("qaa-generate", ["--max-new-tokens", "many"], ["--max-new-tokens", "'many'"]),
    ("qaa-train", ["--method", "bitfit"], ["unknown method 'bitfit'", "qaa"]),
    ("qaa-train", ["--qaa-rotation", "RZ"], ["--qaa-rotation", "RY"]),
    ("qaa-eval", ["--n", "0"], ["--n", ">= 1"]),
    ("qaa-compare", ["--methods", "lora,foo"], ["unknown method 'foo'"]),
    ("qaa-export", ["--format", "svg"], ["--format", "qasm"]),
    ("qaa-loadtest", ["--concurrency", "0"], ["--concurrency", "> 0"]),
    ("qaa-loadtest", ["--nope"], ["--nope"]),
]


@pytest.mark.parametrize("name,extra,words", BAD, ids=[f"{b[0]} {' '.join(b[1])}" for b in BAD])
def test_bad_invocation_is_one_line_and_exit_2(name, extra, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "--out o" must not appear
    entry, required = COMMANDS[name]
    with pytest.raises(SystemExit) as e:
        entry(required + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"{name}: error: "), err
    for w in words:
        assert w in err, err
    assert list(tmp_path.iterdir()) == []  # nothing created (qaa-compare used to make its --out first)


def test_a_taken_port_fails_in_under_2s_without_loading_the_model(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "server.cli", "--model", str(tiny_dir), "--port", str(port)],
                           capture_output=True, timeout=60)
        wall = time.monotonic() - t0
    err = r.stderr.decode()
    assert r.returncode == 2 and wall < 2, (r.returncode, wall, err)
    assert err.splitlines() == [f"qaa-serve: error: cannot listen on 127.0.0.1:{port} (--host/--port): "
                                "Address already in use"]
    assert "torch" not in err and r.stdout == b""  # no "loading" line: it stopped before the model
