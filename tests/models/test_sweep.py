"""The sweep: grids load (the shipped ones included) or are refused by name; every student
of a grid appears once; a sweep writes one complete row per student and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distillgate_deploy import shipped
from models.store import Manifest, ModelStore
from models.sweep import SweepError, done, load_grid, run_sweep, specs


@pytest.mark.parametrize("path", sorted(shipped("sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_grids_load(path: Path) -> None:
    grid = load_grid(path)
    students = list(specs(grid))
    assert len({s.name for s in students}) == len(students)
    # the main format (logits, full, one-shot), over all blocks: the minimum grid
    main = [
        s for s in students if (s.format, s.method, s.schedule) == ("logits", "full", "one-shot")
    ]
    ratios = {s.ratio for s in main}
    assert len(ratios) >= 4 and min(ratios) <= 0.2
    seeded = {s.examples for s in main if s.seed == 1}  # example counts with a second seed
    assert len({s.examples for s in main}) >= 3 and len(seeded) >= 2


def test_bad_grids_name_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "g.yaml"
    bad.write_text("task: t\nteacher: T\nblocks:\n  - {ratios: [0, 0.5], examples: [10],"
                   " formats: [words]}\nextra: 1\n")  # fmt: skip
    with pytest.raises(SweepError) as info:
        load_grid(bad)
    message = str(info.value)
    assert "blocks.0.ratios" in message and "blocks.0.formats" in message and "extra" in message
    with pytest.raises(SweepError, match="cannot read grid"):
        load_grid(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_a_sweep_writes_rows_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStore(tmp_path / "store")
    copy = lambda out: shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)  # noqa: E731
    store.register(Manifest(name="tiny", role="teacher"), copy)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        "task: support-tickets\nteacher: tiny\nepochs: 1\ntest_examples: 4\n"
        "heldout_examples: 4\nblocks:\n  - {ratios: [0.5, 1.0], examples: [16]}\n"
    )
    grid = load_grid(grid_file)
    results = tmp_path / "results.jsonl"
    results.write_text('{"name": "sweep-torn", "ratio"\n')  # a torn line from a kill
    assert run_sweep(store, grid, results, progress=False) == 2
    rows = [json.loads(line) for line in results.read_text().splitlines()[1:]]
    assert [r["ratio"] for r in rows] == [pytest.approx(0.5, abs=0.01), 1.0]
    for row in rows:
        assert row["examples"] == 16 and row["format"] == "logits" and row["in_domain_n"] == 4
        assert 0 <= row["in_domain"] <= 1 and row["general_n"] > 200
        assert row["heldout_ce"] > 0 and row["versions"]["torch"].startswith("2.13")
    assert [m.name for m in store.entries()] == ["tiny"]  # measured students are removed
    assert run_sweep(store, grid, results, progress=False) == 0  # resumed: nothing left
    assert len(done(results)) == 2
