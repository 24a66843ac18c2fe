"""What a sweep says about the paper's claims, as numbers with intervals: the measured
configurations averaged over seeds, retention against the teacher by compression ratio
(in-domain quality relative to the teacher's, general knowledge chance-normalised), and
paired comparisons of a variant (cot or answers supervision, LoRA, iterative pruning)
with the baseline student of the same ratio and example count.

A comparison's 95% interval is +-1.96 sqrt(s^2/k_v + s^2/k_b) with s the seed-to-seed sd
of the target (`noise_floor`) and k the seeds on each side: every student is scored on the
same test items, so the spread that separates two configurations is the training noise
the seeds show, not the test items' binomial noise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from law.data import Results
from law.forms import BASELINE
from law.schema import Law, as_law
from law.validate import noise_floor

GENERAL_CHANCE = 0.25  # four options per general-knowledge question
VARIANTS = {
    "cot supervision": {"format": "cot"},
    "answers supervision": {"format": "answers"},
    "LoRA distillation": {"method": "lora"},
    "iterative pruning": {"schedule": "iterative"},
}


def _kind(row: dict[str, Any]) -> dict[str, str]:
    schedule = "iterative" if row["schedule"].startswith("iterative") else row["schedule"]
    return {"format": row["format"], "method": row["method"], "schedule": schedule}


def configurations(results: Results) -> list[dict[str, Any]]:
    """One entry per configuration: seeds averaged, with the spread between them."""
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in results.rows:
        kind = _kind(row)
        key = (row.get("target_ratio", row["ratio"]), row["examples"], *kind.values())
        grouped[key].append(row)
    out = []
    for (target_ratio, examples, fmt, method, schedule), rows in sorted(grouped.items()):
        entry: dict[str, Any] = {
            "target_ratio": target_ratio, "ratio": rows[0]["ratio"], "examples": examples,
            "format": fmt, "method": method, "schedule": schedule, "seeds": len(rows),
        }  # fmt: skip
        for target in ("in_domain", "general"):
            values = np.array([r[target] for r in rows], float)
            entry[target] = float(values.mean())
            entry[f"{target}_range"] = (float(values.min()), float(values.max()))
        teacher_q, teacher_g = rows[0]["teacher_in_domain"], rows[0]["teacher_general"]
        entry["in_domain_retention"] = entry["in_domain"] / teacher_q
        entry["general_retention"] = (entry["general"] - GENERAL_CHANCE) / (
            teacher_g - GENERAL_CHANCE
        )
        out.append(entry)
    return out


def _is_baseline(entry: dict[str, Any]) -> bool:
    return all(entry[k] == v for k, v in BASELINE.items())


def retention_by_ratio(results: Results) -> list[dict[str, Any]]:
    """Claims (a) and (b): baseline students at the largest example count, by ratio."""
    base = [e for e in configurations(results) if _is_baseline(e)]
    if not base:
        return []
    most = max(e["examples"] for e in base)
    keys = ("target_ratio", "ratio", "examples", "seeds", "in_domain", "general",
            "in_domain_retention", "general_retention")  # fmt: skip
    return [{k: e[k] for k in keys} for e in base if e["examples"] == most]


def comparisons(results: Results) -> list[dict[str, Any]]:
    """Claims (c) and (d): every variant configuration against the baseline configuration
    of the same ratio and example count, per target, with a 95% interval."""
    entries = configurations(results)
    baseline = {(e["target_ratio"], e["examples"]): e for e in entries if _is_baseline(e)}
    floors = {t: noise_floor(results.keys(), results.target(t)) for t in ("in_domain", "general")}
    out = []
    for label, change in VARIANTS.items():
        for e in entries:
            if any(e[k] != v for k, v in change.items()) or _is_baseline(e):
                continue
            base = baseline.get((e["target_ratio"], e["examples"]))
            if base is None:
                continue
            for target, floor in floors.items():
                difference = e[target] - base[target]
                half = 1.96 * floor * np.sqrt(1 / e["seeds"] + 1 / base["seeds"])
                out.append({
                    "variant": label, "target": target, "target_ratio": e["target_ratio"],
                    "examples": e["examples"], "variant_value": e[target],
                    "baseline_value": base[target], "difference": difference,
                    "low": difference - half, "high": difference + half,
                })  # fmt: skip
    return out


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def report(results: Results, law: Law | Mapping[str, Any]) -> str:
    """The findings as Markdown tables (what `distillgate law report` prints)."""
    law = as_law(law)
    lines = ["### Fit and held-out errors (accuracy points)", "",
             "| target | form | selected | LOO median | LOO mean | leave-ratio-out median | "
             "in-sample RMSE | AIC | BIC | seed noise sd |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for target in ("in_domain", "general"):
        fitted = law.targets[target]
        for name, entry in fitted.forms.items():
            e = entry.errors
            lines.append(
                f"| {target} | {name} | {'yes' if name == fitted.selected else ''} | "
                f"{_pct(e.loo_median_abs)} | {_pct(e.loo_mean_abs)} | "
                f"{_pct(e.loro_median_abs)} | {_pct(e.in_sample_rmse)} | "
                f"{e.aic:.1f} | {e.bic:.1f} | {_pct(fitted.noise_floor or float('nan'))} |"
            )
    loss = law.targets.get("loss")
    for name, entry in (loss.forms if loss else {}).items():
        e = entry.errors
        lines += ["", "### Held-out cross-entropy law (nats per answer token)", "",
                  "| form | LOO median | LOO mean | leave-ratio-out median | AIC | BIC |",
                  "|---|---|---|---|---|---|",
                  f"| {name} | {e.loo_median_abs:.4f} | {e.loo_mean_abs:.4f} | "
                  f"{e.loro_median_abs:.4f} | {e.aic:.1f} | {e.bic:.1f} |"]  # fmt: skip
    for name, reason in (loss.skipped if loss else {}).items():
        lines += ["", f"The {name} loss law was not fitted: {reason}"]
    lines += ["", "### Retention by compression ratio (baseline students, most examples)", "",
              "| target r | r | D | seeds | in-domain | retention | general | "
              "chance-normalised retention |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in retention_by_ratio(results):
        lines.append(
            f"| {e['target_ratio']} | {e['ratio']:.3f} | {e['examples']} | {e['seeds']} | "
            f"{e['in_domain']:.3f} | {e['in_domain_retention']:.2f} | {e['general']:.3f} | "
            f"{e['general_retention']:.2f} |"
        )
    lines += ["", "### Variants against the baseline (logits, full, one-shot), points", "",
              "| variant | target | target r | D | variant | baseline | difference [95%] |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in comparisons(results):
        lines.append(
            f"| {c['variant']} | {c['target']} | {c['target_ratio']} | {c['examples']} | "
            f"{c['variant_value']:.3f} | {c['baseline_value']:.3f} | {_pct(c['difference'])} "
            f"[{_pct(c['low'])}, {_pct(c['high'])}] |"
        )
    lines += [
        "",
        "### Offsets in the fitted law (selected form, bootstrap 95%; accuracy for the "
        "power form, log-odds for the logistic)",
        "",
        "| target | form | offset | value [95%] |",
        "|---|---|---|---|",
    ]
    for target in ("in_domain", "general"):
        fitted = law.targets[target]
        entry = fitted.forms[fitted.selected or ""]
        for name, value in entry.parameters.items():
            if name.startswith("delta["):
                lo, hi = entry.intervals[name]
                lines.append(f"| {target} | {fitted.selected} | {name[6:-1]} | "
                             f"{value:.3f} [{lo:.3f}, {hi:.3f}] |")  # fmt: skip
    return "\n".join(lines)
