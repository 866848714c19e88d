"""The direction of imports that DESIGN.md fixes: adapters <- engine <- {server, training};
loadtest speaks only HTTP (no first-party imports)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "engine", "server", "training", "loadtest")
ALLOWED = {"adapters": set(), "engine": {"adapters"}, "server": {"adapters", "engine"},
           "training": {"adapters", "engine"}, "loadtest": set()}


def first_party_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out |= {n.split(".")[0] for n in names} & set(PACKAGES)
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package):
    files = sorted((ROOT / package).glob("*.py"))
    assert files
    for f in files:
        bad = first_party_imports(f) - ALLOWED[package] - {package}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"
