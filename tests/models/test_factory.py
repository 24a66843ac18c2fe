"""The student factory end to end on a tiny random teacher: every format and method makes
a registered, loadable student with its lineage; bad specs fail before any work and leave
the registry as it was; training without registering, then registering; learning a task's
own answers; a base model given as a directory; teacher adaptation registers an adapted
teacher; evaluation records its results in the manifest. The real teacher runs in one
slow test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.distill.factory import (
    FactoryError,
    StudentSpec,
    adapt_teacher,
    make_student,
    register_student,
    train_student,
    validate,
)
from models.store import Manifest, ModelStore

TEACHER = "tiny-teacher"


@pytest.fixture
def store(tmp_path: Path, tiny_model_dir: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")

    def write(out: Path) -> None:
        shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)

    store.register(Manifest(name=TEACHER, role="teacher"), write)
    return store


def _spec(**overrides) -> StudentSpec:
    base = dict(
        task="finance-headlines", ratio=0.5, examples=16, teacher=TEACHER, top_k=8, epochs=1.0
    )
    return StudentSpec(**{**base, **overrides})


@pytest.mark.parametrize(
    "fmt,method,schedule",
    [
        ("logits", "full", "one-shot"),
        ("answers", "lora", "one-shot"),
        ("cot", "lora", "iterative:2"),
    ],
)
def test_make_student_registers_a_loadable_student(store, fmt, method, schedule) -> None:
    manifest = make_student(
        store, _spec(format=fmt, method=method, schedule=schedule), progress=False
    )
    assert manifest.parent == TEACHER and manifest.task == "finance-headlines"
    assert manifest.supervision == fmt and manifest.method == method and manifest.examples == 16
    assert manifest.pruning["schedule"] == schedule
    assert len(manifest.pruning["steps"]) == (2 if schedule == "iterative:2" else 1)
    assert manifest.compression_ratio == pytest.approx(0.5, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(store.resolve(manifest.name))
    assert model.config.num_hidden_layers == 1
    assert [m.name for m in store.entries()] == sorted([TEACHER, manifest.name])
    assert not (store.root / ".work" / manifest.name).exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"ratio": 0.0}, "ratio must be in (0, 1]"),
        ({"ratio": 1.5}, "ratio must be in (0, 1]"),
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"task": "general-knowledge"}, "no training split"),
        ({"examples": 3}, "examples must be at least 16"),
        ({"schedule": "iterative:0"}, "schedule must be"),
        ({"teacher": "ghost"}, "teacher 'ghost' is not in the store"),
    ],
)
def test_bad_specs_fail_before_any_work(store, overrides, message) -> None:
    before = [m.name for m in store.entries()]
    with pytest.raises(FactoryError) as info:
        make_student(store, _spec(**overrides), progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert [m.name for m in store.entries()] == before
    assert not (store.root / ".work").exists() and not (store.root / ".cache").exists()


def test_a_name_already_taken_is_refused(store) -> None:
    with pytest.raises(FactoryError, match="already registered"):
        make_student(store, _spec(name=TEACHER), progress=False)


def test_train_student_registers_nothing_until_asked(store) -> None:
    spec = _spec(format="answers", method="full")
    trained = train_student(store, spec, progress=False)
    assert [m.name for m in store.entries()] == [TEACHER]
    assert trained.manifest.name == spec.model_name() and trained.manifest.parent == TEACHER
    assert trained.work == store.root / ".work" / spec.model_name() and trained.work.is_dir()
    assert trained.model.config.num_hidden_layers == 1
    # killed before registering: a rerun of the same spec returns the finished student
    # (marked here, so that training it again would show)
    kept = trained.work / "trained" / "manifest.json"
    kept.write_text(trained.manifest.model_copy(update={"source": "kept"}).model_dump_json())
    again = train_student(store, spec, progress=False)
    assert again.manifest == trained.manifest.model_copy(update={"source": "kept"})
    for mine, kept in zip(trained.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(mine, kept)
    manifest = register_student(store, again)
    assert manifest.name == spec.model_name() and manifest.training == trained.manifest.training
    assert [m.name for m in store.entries()] == sorted([TEACHER, manifest.name])
    assert not trained.work.exists()
    loaded = AutoModelForCausalLM.from_pretrained(store.resolve(manifest.name))
    assert loaded.config.num_hidden_layers == 1


def _jsonl(path: Path, answers: list[str | None]) -> Path:
    rows = [{"task": {"name": "logged", "description": "from the log"}}] + [
        {"id": f"q{i}", "prompt": f"Ticket {i}: my card was declined", "answer": a,
         "split": "train"}
        for i, a in enumerate(answers)
    ] + [{"id": "t0", "prompt": "Ticket: refund", "answer": "zebra", "split": "test"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reference_targets_train_on_the_task_answers(store, tmp_path: Path) -> None:
    # answers a random teacher would never generate: seen in the training sequences only
    # when they come from the task itself
    answers = ["zebra crossing" if i % 2 else "aardvark" for i in range(16)]
    task = _jsonl(tmp_path / "logged.jsonl", answers)
    spec = _spec(task=str(task), format="answers", targets="reference", name=None)
    assert spec.model_name().startswith("logged-depth0.5-answers")
    trained = train_student(store, spec, progress=False)
    assert trained.manifest.task == "logged" and trained.manifest.training["targets"] == "reference"
    (cached,) = (store.root / ".cache" / "teacher").glob("logged-train-answers-*.pt")
    tokenizer = AutoTokenizer.from_pretrained(store.resolve(TEACHER))
    targets = [
        tokenizer.decode(row["ids"][row["start"] :], skip_special_tokens=True)
        for row in torch.load(cached, weights_only=True)
    ]
    assert targets == answers
    assert [m.name for m in store.entries()] == [TEACHER]


def test_reference_targets_need_every_answer(store, tmp_path: Path) -> None:
    task = _jsonl(tmp_path / "partial.jsonl", ["yes"] * 15 + [None])
    with pytest.raises(FactoryError, match="'q15' of task 'logged' has none"):
        train_student(store, _spec(task=str(task), format="answers", targets="reference"))
    assert validate(store, _spec(task=str(task))).name == "logged"  # the teacher's need none


def test_a_base_outside_the_store_is_named_by_its_directory(
    store, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "my-base"
    shutil.copytree(tiny_model_dir, base)
    manifest = make_student(
        store, _spec(teacher=str(base), format="answers", method="lora"), progress=False
    )
    assert manifest.parent == "my-base" and manifest.pruning["base"] == str(base.resolve())
    assert store.has(manifest.name) and not store.has("my-base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FactoryError, match=r"not a Hugging Face model directory: no config\.json"):
        train_student(store, _spec(teacher=str(tmp_path / "empty")))


def test_adapt_teacher_registers_its_lineage(store) -> None:
    manifest = adapt_teacher(
        store, "support-tickets", method="lora", examples=16, teacher=TEACHER, progress=False
    )
    assert manifest.role == "teacher" and manifest.parent == TEACHER
    assert manifest.name == f"{TEACHER}-support-tickets-lora"
    assert manifest.supervision == "reference" and manifest.compression_ratio == 1.0
    with pytest.raises(FactoryError, match="already registered"):
        adapt_teacher(store, "support-tickets", examples=16, teacher=TEACHER, progress=False)


@pytest.mark.slow
def test_evaluation_is_recorded_in_the_manifest(store) -> None:
    from models.evaluate import evaluate_entry

    made = make_student(store, _spec(), progress=False)
    manifest = evaluate_entry(store, made.name, test_examples=8, heldout_examples=8)
    ev = manifest.evaluation
    domain = ev.in_domain["finance-headlines"]
    assert domain.n == 8 and domain.accuracy.low <= domain.accuracy.value
    assert 0 <= domain.agreement.value <= 1 and domain.chance == pytest.approx(1 / 13, rel=0.3)
    assert ev.heldout["finance-headlines"].kl >= 0
    assert ev.heldout["finance-headlines"].tokens > 0
    assert ev.general_knowledge.n >= 200 and ev.general_knowledge.retention is not None
    assert ev.non_embedding_parameters > 0 and ev.reference == TEACHER
    assert ev.latency.ttft_ms > 0 and ev.latency.ms_per_token_b8 > 0
    assert store.manifest(made.name).evaluation == ev  # written, not just returned
    # the parent's own general-knowledge score was measured once and kept
    assert store.manifest(TEACHER).evaluation.general_knowledge is not None
