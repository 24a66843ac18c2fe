"""The import rule of ARCHITECTURE.md (gateway -> models -> law), checked on the source,
and the CPU path kept free of vLLM."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "law": {"torch", "transformers", "fastapi", "gateway", "models"},
    "models": {"gateway", "fastapi"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    bad = {
        str(f.relative_to(REPO)): sorted(_imports(f) & FORBIDDEN[package])
        for f in (REPO / package).rglob("*.py")
    }
    assert not {f: names for f, names in bad.items() if names}


def test_cpu_path_never_imports_vllm_or_torch_at_import_time() -> None:
    code = (
        "import sys, gateway.app, gateway.cli, gateway.state, models.backends.vllm, "
        "models.backends.openai_http\n"
        "from gateway.config import load_config\n"
        "gateway.app.create_app(load_config())\n"
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
