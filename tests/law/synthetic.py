"""Sweep-shaped rows with a known truth (in-domain falls with compression and rises with
examples; cot adds general accuracy), shared by the law's tests and the router's."""

from __future__ import annotations

import numpy as np


def rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for ratio in (0.25, 0.4, 0.6, 0.8):
        for examples in (250, 500, 1000):
            for seed in (0, 1):
                for fmt in ("logits", "cot") if examples == 1000 else ("logits",):
                    inner = 0.9 - 0.06 * (1 / ratio - 1) ** 1.2 - 2.0 * examples**-0.5
                    general = 0.25 + 0.3 * ratio**2 + (0.03 if fmt == "cot" else 0)
                    rows.append({
                        "name": f"s-{ratio}-{examples}-{seed}-{fmt}", "task": "finance-headlines",
                        "teacher": "T", "ratio": ratio, "target_ratio": ratio,
                        "examples": examples, "format": fmt, "method": "full",
                        "schedule": "one-shot", "seed": seed, "chance": 1 / 13,
                        "in_domain": inner + rng.normal(0, 0.01),
                        "general": general + rng.normal(0, 0.01),
                        "teacher_in_domain": 0.9, "teacher_general": 0.55,
                    })  # fmt: skip
    return rows
