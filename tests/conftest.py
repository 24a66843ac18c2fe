"""Shared fixtures: the real teacher (converted once per machine) and a tiny random Llama
that uses the real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from models.store import ModelStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_worker() -> None:
    """Under pytest-xdist two workers share the two cores: two torch threads each would
    oversubscribe them (OpenMP threads spin while they wait), so each worker takes one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_store() -> ModelStore:
    """The test model store. Kept under var/ so the teacher is converted once per clone."""
    root = Path(os.environ.get("DISTILLGATE_TEST_STORE", REPO / "var" / "test-store"))
    return ModelStore(root)


@pytest.fixture(scope="session")
def teacher_dir(model_store: ModelStore) -> Path:
    """The real teacher, converted once per clone; pytest-xdist's workers share the store,
    so the first converts under a file lock and the others wait and reuse it."""
    model_store.root.mkdir(parents=True, exist_ok=True)
    with (model_store.root / ".convert.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return model_store.ensure_teacher()


@pytest.fixture(scope="session")
def synthetic_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/law/synthetic.py's rows as a results file."""
    from tests.law.synthetic import rows

    path = tmp_path_factory.mktemp("law") / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return path


@pytest.fixture(scope="session")
def synthetic_law(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A law fitted to the synthetic rows (30 bootstrap resamples) once per run: under
    pytest-xdist the first worker fits it under a lock in the run's shared base directory
    and the others read it."""
    from law.data import load_results
    from law.predict import fit_law, save_law
    from tests.law.synthetic import rows

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    path = shared / "synthetic-law.json"
    with (shared / "synthetic-law.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            results = shared / "synthetic-results.jsonl"
            results.write_text("".join(json.dumps(r) + "\n" for r in rows()))
            save_law(fit_law(load_results(results), resamples=30), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Llama with the teacher's tokenizer: fast, real code paths."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("chat_template.jinja",):
        if (teacher_dir / name).exists() and not (out / name).exists():
            shutil.copy(teacher_dir / name, out / name)
    return out
