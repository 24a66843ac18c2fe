"""Slow end to end: `distillgate distill` makes a small student of the real teacher (a few
training steps), `distillgate eval` measures it, and a real gateway serves it to the
`openai` SDK next to the teacher."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import openai
import pytest

from models.store import TEACHER_NAME, ModelStore
from tests.servers import cli, gateway

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return cli(*args, timeout=900)


def test_distil_evaluate_and_serve_a_student(teacher_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    (store.root / TEACHER_NAME).mkdir(parents=True)
    for file in teacher_dir.iterdir():  # hard links: the real teacher without a copy
        os.link(file, store.root / TEACHER_NAME / file.name)
    made = _cli(
        "distill", "--task", "finance-headlines", "--ratio", "0.5", "--examples", "16",
        "--epochs", "1", "--name", "fin-student", "--store", str(store.root), "--json",
        "--no-progress", "--force",  # the unadapted teacher is below the accuracy check
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads(made.stdout)
    assert manifest["parent"] == TEACHER_NAME and manifest["supervision"] == "logits"
    assert manifest["pruning"]["steps"][0]["num_hidden_layers"] == 15

    scored = _cli(
        "eval", "fin-student", "--test-examples", "16", "--heldout-examples", "16",
        "--general-examples", "40", "--no-latency", "--store", str(store.root), "--json",
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    evaluation = json.loads(scored.stdout)["evaluation"]
    domain = evaluation["in_domain"]["finance-headlines"]
    assert domain["n"] == 16 and 0 <= domain["accuracy"]["value"] <= 1
    assert 0 <= domain["agreement"]["value"] <= 1
    assert evaluation["heldout"]["finance-headlines"]["kl"] > 0
    assert evaluation["general_knowledge"]["n"] == 40
    assert evaluation["general_knowledge"]["retention"] is not None
    assert store.manifest(TEACHER_NAME).evaluation.general_knowledge is None  # subset: not kept

    config = {
        "models": [
            {"name": TEACHER_NAME, "backend": "local", "role": "teacher"},
            {"name": "fin-student", "backend": "local"},
        ]
    }
    with (
        gateway(config, tmp_path, store=store.root) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as sdk,
    ):
        served = {m.id for m in sdk.models.list().data if m.model_extra["role"] != "router"}
        assert served == {TEACHER_NAME, "fin-student"}
        prompt = "Classify the event in this headline: Acme beats Q3 estimates."
        reply = sdk.chat.completions.create(
            model="fin-student", messages=[{"role": "user", "content": prompt}], max_tokens=8
        )
        assert reply.model == "fin-student" and reply.usage.completion_tokens >= 1
