"""The model store: the embedded teacher converted once into a plain HF directory, and
writes that are atomic (a crash leaves no half model and no debris)."""

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
    store.update("s1", evaluation={"accuracy": 0.9})
    assert store.manifest("s1").evaluation == {"accuracy": 0.9}
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
