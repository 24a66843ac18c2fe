"""Figures of the law (matplotlib, PNG): quality against r for each D and format with the
fitted curves and the measured points, in-domain and general side by side; and predicted
against measured with the held-out (leave-one-out) predictions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global figure state, no display

from law.data import Results
from law.forms import FORMS, OFFSETS, Features, offset_row
from law.schema import Law, as_law
from law.validate import held_out_predictions

TITLES = {"in_domain": "in-domain accuracy", "general": "general-knowledge accuracy"}


def _curve(law: Law, target: str, examples: float, fmt: str, r: np.ndarray):
    fitted = law.targets[target]
    selected = fitted.selected or ""
    entry = fitted.forms[selected]
    used = np.array([o in entry.used_offsets for o in OFFSETS])
    offsets = np.repeat(offset_row(fmt, "full", "one-shot")[None, :], len(r), axis=0)
    x = Features(r, np.full(len(r), examples), None, offsets, fitted.chance or 0.0)
    theta = np.array(list(entry.parameters.values()))
    return FORMS[selected].predict(theta, x, used)


def quality_against_ratio(results: Results, law: Law, out: Path) -> Path:
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    grid = np.linspace(min(r["ratio"] for r in results.rows) * 0.9, 1.0, 100)
    rows = [r for r in results.rows if r["method"] == "full" and r["schedule"] == "one-shot"]
    combos = sorted({(r["format"], r["examples"]) for r in rows})
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(1, len(combos))))
    for ax, target in zip(axes, ("in_domain", "general"), strict=True):
        for colour, (fmt, examples) in zip(colours, combos, strict=True):
            points = [r for r in rows if (r["format"], r["examples"]) == (fmt, examples)]
            ax.scatter([p["ratio"] for p in points], [p[target] for p in points], color=colour,
                       s=18, label=f"{fmt}, D={examples}")  # fmt: skip
            ax.plot(grid, _curve(law, target, examples, fmt, grid), color=colour, lw=1)
        teacher = getattr(law.teacher_quality, target)
        if teacher is not None:
            ax.axhline(teacher, color="black", ls="--", lw=0.8, label="teacher")
        fitted = law.targets[target]
        if fitted.chance is not None:
            ax.axhline(fitted.chance, color="grey", ls=":", lw=0.8, label="chance")
        ax.set(xlabel="compression ratio r (student / teacher non-embedding parameters)",
               title=f"{TITLES[target]} ({fitted.selected} form)")  # fmt: skip
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    path = out / "quality_vs_ratio.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def predicted_against_measured(results: Results, law: Law, out: Path) -> Path:
    fig = Figure(figsize=(9, 4.2))
    axes = fig.subplots(1, 2)
    for ax, target in zip(axes, ("in_domain", "general"), strict=True):
        x, y = results.features(target), results.target(target)
        form = law.targets[target].selected or ""
        loo = held_out_predictions(form, x, y, np.arange(len(y)))
        by_ratio = held_out_predictions(form, x, y, np.round(x.r, 3))
        ax.scatter(y, loo, s=14, alpha=0.7, label="leave one out")
        ax.scatter(y, by_ratio, s=14, alpha=0.7, marker="x", label="leave its ratio out")
        ends = [np.nanmin([y, loo, by_ratio]), np.nanmax([y, loo, by_ratio])]
        ax.plot(ends, ends, color="black", lw=0.8)
        med = np.nanmedian(np.abs(loo - y)) * 100
        ax.set(xlabel="measured", ylabel="predicted (held out)",
               title=f"{TITLES[target]}\nmedian LOO error {med:.1f} points")  # fmt: skip
        ax.legend(fontsize=7)
    path = out / "predicted_vs_measured.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_all(results: Results, law: Law | Mapping[str, Any], out: str | Path) -> list[Path]:
    law, out = as_law(law), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [quality_against_ratio(results, law, out), predicted_against_measured(results, law, out)]
