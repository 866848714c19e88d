"""Schemathesis fuzzes every operation of the server's OpenAPI schema, statelessly and in
sequences (its stateful phase): no input gives a 5xx, and every response matches the schema
(errors included: the Error body is declared for every 4xx and 5xx)."""

import shutil
import subprocess
import sys
from pathlib import Path


from tests.server.harness import ThreadServer


def test_openapi_fuzzing_finds_no_server_errors(tiny_dir, tmp_path):
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        exe = shutil.which("schemathesis")
    assert exe, "schemathesis is a test dependency (pip install -e .[dev])"
    with ThreadServer(tiny_dir, tmp_path / "store", max_new_tokens=16, max_waiting=512) as s:
        r = subprocess.run([str(exe), "run", s.url + "/openapi.json", "--checks", "not_a_server_error,response_schema_conformance",
                            "--max-examples", "30", "--seed", "1", "--request-timeout", "60",
                            "--phases", "examples,coverage,fuzzing,stateful", "--no-color"],
                           capture_output=True, text=True, timeout=900)
    tail = r.stdout[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail.split("SUMMARY")[-1], tail
