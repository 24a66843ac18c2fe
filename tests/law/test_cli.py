"""The law's commands (law/cli.py): a real `distillgate law` process on the committed law
(the family's smoke test), and the law's command line free of torch, transformers and
fastapi even when run through the whole entry point. (The commands' behaviour is tested
in-process in test_predict.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import cli_process

LAW = Path("docs/results/law.json").resolve()


@pytest.mark.slow
def test_law_smoke_in_a_child_process(tmp_path: Path) -> None:
    shown = cli_process("law", "show", str(LAW), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("law v1 for finance-headlines") and "LOO median" in shown.stdout
    predicted = cli_process(
        "law", "predict", str(LAW), "--ratio", "0.4", "--examples", "800", "--json", cwd=tmp_path
    )
    assert predicted.returncode == 0, predicted.stderr
    assert 0 < json.loads(predicted.stdout)["in_domain"]["value"] <= 1
    missing = cli_process("law", "show", "nowhere.json", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "cannot read law file nowhere.json" in missing.stderr


def test_law_commands_import_no_torch_transformers_or_fastapi() -> None:
    law = str(LAW)
    code = (
        "import sys, contextlib, io\n"
        "from gateway.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['law', 'show', {law!r}]) == 0\n"
        f"    assert main(['law', 'predict', {law!r}, '--ratio', '.5', '--examples', '9']) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
