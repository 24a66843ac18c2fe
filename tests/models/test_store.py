"""The model store: the embedded teacher converted once into a plain HF directory, writes
that are atomic (a crash leaves no half model and no debris), and typed manifests (today's
files load; a malformed one is refused naming its path and field)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.store import (
    TEACHER_NAME,
    Manifest,
    ModelStore,
    StoreError,
    default_root,
    teacher_gguf,
)


def test_teacher_is_a_plain_hf_directory(teacher_dir: Path, model_store: ModelStore) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (teacher_dir / name).is_file(), name
    config = json.loads((teacher_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert "quantization_config" not in config
    manifest = json.loads((teacher_dir / "distillgate.json").read_text())
    assert manifest["role"] == "teacher" and manifest["source"].endswith(".gguf")
    assert model_store.resolve(TEACHER_NAME) == teacher_dir


def test_teacher_is_converted_only_once(teacher_dir: Path, model_store: ModelStore) -> None:
    before = (teacher_dir / "model.safetensors").stat().st_mtime_ns
    assert model_store.ensure_teacher() == teacher_dir
    assert (teacher_dir / "model.safetensors").stat().st_mtime_ns == before


def test_teacher_gguf_comes_from_the_wheel() -> None:
    assert teacher_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(RuntimeError), store.staging("half") as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    assert not store.has("half")


def test_successful_write_appears_whole(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with store.staging("whole") as tmp:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
            (tmp / name).write_text("x")
        assert not (tmp_path / "whole").exists()
    assert store.has("whole") and [p.name for p in tmp_path.iterdir()] == ["whole"]


def test_unknown_and_invalid_names(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="'nope' is not in the store"):
        store.resolve("nope")
    for bad in ("", "../etc", ".hidden", "a/b"):
        with pytest.raises(StoreError, match="invalid model name"):
            store.path_for(bad)


def test_default_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_root() == tmp_path / "distillgate" / "models"


# -- the registry ------------------------------------------------------------------------


def _writer(source: Path, fail_after: int | None = None):
    """Copies a model directory file by file; `fail_after` files in, it 'crashes'."""

    def write(out: Path) -> None:
        for i, f in enumerate(sorted(source.iterdir())):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt("killed mid-registration")
            if f.is_file():
                shutil.copy(f, out / f.name)

    return write


def _student(name: str, **kw) -> Manifest:
    return Manifest(
        name=name,
        parent=TEACHER_NAME,
        task="finance-headlines",
        compression_ratio=0.5,
        pruning={"method": "depth", "schedule": "one-shot"},
        examples=1000,
        supervision="logits",
        method="full",
        seed=0,
        **kw,
    )


def test_register_list_show_update(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStore(tmp_path)
    path = store.register(_student("s1"), _writer(tiny_model_dir))
    assert path == tmp_path / "s1" and store.has("s1")
    assert [m.name for m in store.entries()] == ["s1"]
    got = store.manifest("s1")
    assert (got.parent, got.compression_ratio, got.supervision, got.pruning["method"]) == (
        TEACHER_NAME,
        0.5,
        "logits",
        "depth",
    )
    latency = {"ttft_ms": 12.5, "ms_per_token_b1": 30.0, "ms_per_token_b8": 9.0}
    store.update("s1", evaluation={"latency": latency, "extra": {"note": "by hand"}})
    evaluation = store.manifest("s1").evaluation
    assert evaluation.latency.ttft_ms == 12.5 and evaluation.extra == {"note": "by hand"}
    with pytest.raises(StoreError, match="already registered"):
        store.register(_student("s1"), _writer(tiny_model_dir))


def test_crash_mid_registration_leaves_listing_unchanged(tmp_path: Path, tiny_model_dir) -> None:
    store = ModelStore(tmp_path)
    store.register(_student("kept"), _writer(tiny_model_dir))
    before = [m.model_dump() for m in store.entries()]
    with pytest.raises(KeyboardInterrupt):
        store.register(_student("half"), _writer(tiny_model_dir, fail_after=2))
    assert [m.model_dump() for m in store.entries()] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_incomplete_model_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="not written whole"):
        store.register(_student("bad"), lambda out: (out / "config.json").write_text("{}"))
    assert store.entries() == [] and list(tmp_path.iterdir()) == []


def test_remove_is_refused_while_a_gateway_serves_the_model(tmp_path, tiny_model_dir) -> None:
    store = ModelStore(tmp_path)
    store.register(_student("busy"), _writer(tiny_model_dir))
    store.lease(["busy"])
    with pytest.raises(StoreError, match="served by a running gateway"):
        store.remove("busy")
    store.release()
    store.remove("busy")
    assert store.entries() == [] and not (tmp_path / "busy").exists()


def test_leases_of_dead_processes_are_ignored(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStore(tmp_path)
    store.register(_student("orphan"), _writer(tiny_model_dir))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.lease(["orphan"], pid=dead.pid)
    assert store.leases() == {}
    store.remove("orphan")


@pytest.mark.slow
def test_students_cli(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStore(tmp_path)
    store.register(_student("s2"), _writer(tiny_model_dir))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "students", *args, "--store", str(tmp_path)],
            capture_output=True,
            text=True,
        )

    listed = cli("list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["name"] == "s2"
    shown = cli("show", "s2")
    assert json.loads(shown.stdout)["supervision"] == "logits"
    missing = cli("show", "nope")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "not in the store" in missing.stderr
    assert cli("remove", "s2").returncode == 0 and store.entries() == []


# -- typed manifests -----------------------------------------------------------------------

# A student's manifest as `distillgate eval` writes it today (models/evaluate.py), with the
# factory's `training` record beside the evaluation.
TODAYS_MANIFEST = {
    "name": "finance-headlines-depth0.5-logits-full-one-shot-d1000-s0",
    "role": "student", "created": 1796109290, "source": None, "parent": TEACHER_NAME,
    "task": "finance-headlines", "compression_ratio": 0.5123,
    "pruning": {"method": "depth", "schedule": "one-shot", "target_ratio": 0.5, "steps": []},
    "examples": 1000, "supervision": "logits", "method": "full", "seed": 0,
    "training": {"epochs": 1.0, "phases": [{"target_tokens": 5120}]},
    "evaluation": {
        "in_domain": {"finance-headlines": {
            "n": 300, "accuracy": {"value": 0.62, "low": 0.56, "high": 0.67},
            "chance": 0.07692307692307693,
            "agreement": {"value": 0.8, "low": 0.75, "high": 0.84},
            "reference_accuracy": 0.69, "retention": 0.9,
        }},
        "heldout": {"finance-headlines": {"kl": 0.41, "cross_entropy": 0.9, "tokens": 1800}},
        "general_knowledge": {
            "n": 247, "accuracy": {"value": 0.3, "low": 0.24, "high": 0.36}, "chance": 0.25,
            "retention": 0.12,
        },
        "non_embedding_parameters": 53084736,
        "latency": {"ttft_ms": 40.1, "ms_per_token_b1": 41.0, "ms_per_token_b8": 12.2},
        "reference": TEACHER_NAME,
        "evaluated": 1796109999,
    },
}  # fmt: skip


def _on_disk(root: Path, manifest: dict) -> ModelStore:
    """A store holding one model whose manifest is `manifest`, written as a file."""
    model = root / manifest["name"]
    model.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        (model / name).write_text("x")
    (model / "distillgate.json").write_text(json.dumps(manifest, indent=2))
    return ModelStore(root)


def test_todays_manifests_load_typed(tmp_path: Path) -> None:
    store = _on_disk(tmp_path, TODAYS_MANIFEST)
    manifest = store.manifest(TODAYS_MANIFEST["name"])
    ev = manifest.evaluation
    domain = ev.in_domain["finance-headlines"]
    assert (domain.n, domain.accuracy.low, domain.agreement.value) == (300, 0.56, 0.8)
    assert ev.heldout["finance-headlines"].tokens == 1800 and ev.general_knowledge.n == 247
    assert ev.latency.ms_per_token_b8 == 12.2 and ev.non_embedding_parameters == 53084736
    assert manifest.training["phases"][0]["target_tokens"] == 5120  # top-level extras kept
    # rewritten through the store, it reads back the same
    store.update(manifest.name, seed=1)
    again = store.manifest(manifest.name)
    assert again.evaluation == ev and again.seed == 1 and again.training == manifest.training
    teacher = _on_disk(tmp_path / "t", {"name": "t", "role": "teacher", "evaluation": {
        "general_knowledge": TODAYS_MANIFEST["evaluation"]["general_knowledge"]}})  # fmt: skip
    assert teacher.manifest("t").evaluation.in_domain == {}  # every part is optional


def _broken(**evaluation) -> dict:
    return {**TODAYS_MANIFEST, "evaluation": {**TODAYS_MANIFEST["evaluation"], **evaluation}}


@pytest.mark.parametrize(
    ("manifest", "field", "found"),
    [
        (_broken(non_embedding_parameters="53M"), "evaluation.non_embedding_parameters", "'53M'"),
        (_broken(general_knowledge={"n": 247, "accuracy": {"value": 0.3, "low": 0.2}}),
         "evaluation.general_knowledge.accuracy.high: Field required", ""),
        (_broken(latency={"ttft_ms": "fast", "ms_per_token_b1": 1.0, "ms_per_token_b8": 1.0}),
         "evaluation.latency.ttft_ms: Input should be a valid number", "'fast'"),
        (_broken(in_domain={"finance-headlines": {"n": 3, "accuracy": 0.6}}),
         "evaluation.in_domain.finance-headlines.accuracy", "0.6"),
        (_broken(colour="red"), "evaluation.colour: Extra inputs are not permitted", "'red'"),
        ({**TODAYS_MANIFEST, "evaluation": None}, "evaluation", "None"),
    ],
    ids=["string-for-int", "missing-key", "string-for-float", "number-for-interval",
         "unknown-key", "null"],
)  # fmt: skip
def test_a_malformed_manifest_names_its_path_and_field(
    tmp_path: Path, manifest: dict, field: str, found: str
) -> None:
    store = _on_disk(tmp_path, manifest)
    with pytest.raises(StoreError) as caught:
        store.manifest(manifest["name"])
    message = str(caught.value)
    assert str(tmp_path / manifest["name"] / "distillgate.json") in message
    assert field in message and found in message and "\n" not in message
    with pytest.raises(StoreError, match="is not a valid manifest"):
        store.entries()


def test_an_invalid_update_is_refused_and_leaves_the_file(tmp_path: Path) -> None:
    store = _on_disk(tmp_path, TODAYS_MANIFEST)
    name = TODAYS_MANIFEST["name"]
    before = (tmp_path / name / "distillgate.json").read_bytes()
    with pytest.raises(StoreError, match=r"evaluation\.in_domain\.finance-headlines\.n"):
        store.update(name, evaluation={"in_domain": {"finance-headlines": {"accuracy": {
            "value": 1.0, "low": 1.0, "high": 1.0}}}})  # fmt: skip
    assert (tmp_path / name / "distillgate.json").read_bytes() == before
    assert [p.name for p in (tmp_path / name).iterdir() if p.name.startswith(".")] == []
