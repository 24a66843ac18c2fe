"""Sweep results (one JSON object per student, written by models/sweep.py) as the law's
features and targets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from law.fit import FitError
from law.forms import Features, offset_row

REQUIRED = ("ratio", "examples", "format", "method", "schedule", "seed", "in_domain", "general")
TARGETS = {"in_domain": "in_domain", "general": "general", "loss": "heldout_ce"}


@dataclass(frozen=True)
class Results:
    rows: list[dict[str, Any]]
    path: str
    sha256: str

    def features(self, target: str) -> Features:
        r = np.array([row["ratio"] for row in self.rows], dtype=float)
        d = np.array([row["examples"] for row in self.rows], dtype=float)
        if target == "loss":
            d = np.array([row.get("train_tokens", row["examples"]) for row in self.rows], float)
        n = np.array([row.get("non_embedding_parameters") or np.nan for row in self.rows], float)
        offsets = np.array(
            [offset_row(row["format"], row["method"], row["schedule"]) for row in self.rows]
        )
        chance = float(self.rows[0]["chance"]) if target == "in_domain" else 0.25
        teacher_loss = self.rows[0].get("teacher_ce") if target == "loss" else None
        return Features(r, d, n, offsets, chance, teacher_loss)

    def target(self, target: str) -> np.ndarray:
        return np.array([row[TARGETS[target]] for row in self.rows], dtype=float)

    def keys(self) -> list[tuple]:
        """A student's configuration without its seed (for the seed-to-seed noise)."""
        return [
            (row["target_ratio"] if "target_ratio" in row else row["ratio"], row["examples"],
             row["format"], row["method"], row["schedule"])
            for row in self.rows
        ]  # fmt: skip


def load_results(path: str | Path) -> Results:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FitError(f"cannot read results {path}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(raw.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise FitError(f"{path}:{number}: not valid JSON") from None
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise FitError(f"{path}:{number}: missing {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise FitError(f"{path}: no results")
    tasks = {row.get("task") for row in rows}
    if len(tasks) > 1:
        raise FitError(f"{path}: results of several tasks {sorted(map(str, tasks))}; fit one")
    return Results(rows, str(path), hashlib.sha256(raw).hexdigest())
