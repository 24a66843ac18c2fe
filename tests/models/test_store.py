"""The model store: the embedded teacher converted once into a plain HF directory, and
writes that are atomic (a crash leaves no half model and no debris)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.store import TEACHER_NAME, ModelStore, StoreError, default_root, teacher_gguf


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
