"""The import rule of ARCHITECTURE.md (gateway -> models -> law), checked on the source;
the CPU path kept free of vLLM; the wheel's package list complete; no path hacks."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
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


def test_the_wheel_lists_every_package() -> None:
    """pyproject.toml names its packages one by one (deploy/ is mapped to a package of
    another name, which `packages.find` cannot do): a new folder must be added there."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(d.relative_to(REPO).parts)
        for top in ("gateway", "models", "law")
        for d in [REPO / top, *(REPO / top).rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert on_disk <= set(setuptools["packages"])
    assert setuptools["package-dir"] == {"distillgate_deploy": "deploy"}


def test_no_path_hacks_or_repo_lookups() -> None:
    """Tests and benchmarks import installed packages (bench/ runs as `python -m bench...`
    from the repo root); shipped files are package data, never found through __file__."""
    hack = re.compile(r"sys\.path\s*(\.insert|\.append|\[|\+=|=)")
    offenders = [
        str(f.relative_to(REPO))
        for top in ("gateway", "models", "law", "deploy", "bench", "tests")
        for f in (REPO / top).rglob("*.py")
        if hack.search(f.read_text()) and f != Path(__file__).resolve()
    ]
    assert offenders == []
    product = [
        str(f.relative_to(REPO))
        for top in ("gateway", "models", "law", "deploy", "bench")
        for f in (REPO / top).rglob("*.py")
        if "__file__" in f.read_text()
    ]
    assert product == []
