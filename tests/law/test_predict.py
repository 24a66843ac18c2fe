"""law.json from sweep-shaped results: fitted, saved, loaded unchanged, used for
predictions with intervals, shown, plotted, reported; and the `distillgate law` commands on
it and on the committed sweep results."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from law.data import load_results
from law.findings import comparisons, retention_by_ratio
from law.fit import FitError
from law.predict import load_law, predict
from law.schema import Law, LawFileError
from tests.servers import cli


@pytest.fixture(scope="module")
def results_file(synthetic_results: Path) -> Path:
    return synthetic_results


@pytest.fixture(scope="module")
def law_file(synthetic_law: Path) -> Path:
    return synthetic_law


@pytest.mark.slow
def test_law_round_trips_and_predicts_with_intervals(law_file: Path) -> None:
    law = load_law(law_file)
    assert law.to_json() == law_file.read_text()  # loaded unchanged
    assert law.targets["in_domain"].selected in ("power", "logistic")
    assert law.data.rows == 32 and len(law.data.sha256) == 64
    near = predict(law, ratio=0.6, examples=1000)
    assert predict(json.loads(law_file.read_text()), ratio=0.6, examples=1000) == near
    far = predict(law, ratio=0.25, examples=250)
    for p in (near["in_domain"], far["in_domain"], near["general"]):
        assert 0 <= p["low"] <= p["value"] <= p["high"] <= 1
    truth = 0.9 - 0.06 * (1 / 0.6 - 1) ** 1.2 - 2.0 * 1000**-0.5
    assert abs(near["in_domain"]["value"] - truth) < 0.02
    assert far["in_domain"]["value"] < near["in_domain"]["value"]
    cot = predict(law, ratio=0.6, examples=1000, format="cot")
    assert cot["general"]["value"] > near["general"]["value"]  # the cot offset was fitted
    lora = predict(law, ratio=0.6, examples=1000, method="lora")
    assert lora["in_domain"]["extrapolated_offsets"] == ["method=lora"]  # never measured
    with pytest.raises(FitError, match="ratio in"):
        predict(law, ratio=1.5, examples=10)


def test_bad_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ratio": 0.5}\n')
    with pytest.raises(FitError, match=r"bad\.jsonl:1: missing examples"):
        load_results(bad)
    with pytest.raises(FitError, match="not a law file"):
        (tmp_path / "law.json").write_text("{}")
        load_law(tmp_path / "law.json")


SHIPPED = Path("docs/results/law.json")


def test_the_shipped_law_loads_typed() -> None:
    law = load_law(SHIPPED)
    assert isinstance(law, Law) and law.version == 1 and law.task == "finance-headlines"
    assert {t: f.selected for t, f in law.targets.items()} == {
        "in_domain": "logistic", "general": "logistic", "loss": "busbridge"}  # fmt: skip
    logistic = law.targets["in_domain"].forms["logistic"]
    assert list(logistic.parameters)[:4] == ["u", "w0", "w_r", "w_D"]  # the form's order
    assert len(logistic.samples) == 200 and len(logistic.samples[0]) == len(logistic.parameters)
    assert json.loads(law.to_json()) == json.loads(SHIPPED.read_text())


def _edited(tmp_path: Path, edit) -> Path:
    raw = json.loads(SHIPPED.read_text())
    edit(raw)
    path = tmp_path / "law.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda law: law["targets"]["in_domain"]["forms"]["power"].update(residual_sd="wide"),
         "targets.in_domain.forms.power.residual_sd: Input should be a valid number (got 'wide')"),
        (lambda law: law["targets"]["general"]["forms"]["logistic"]["errors"].pop("aic"),
         "targets.general.forms.logistic.errors.aic: Field required"),
        (lambda law: law["targets"]["loss"].update(selected=3),
         "targets.loss.selected: Input should be a valid string (got 3)"),
        (lambda law: law.update(colour="red"), "colour: Extra inputs are not permitted"),
        (lambda law: law.update(version=2), "not a law file of version 1 (version 2)"),
    ],
    ids=["string-for-float", "missing-key", "int-for-string", "unknown-key", "version"],
)  # fmt: skip
def test_a_malformed_law_names_its_path_and_field(tmp_path: Path, edit, problem: str) -> None:
    path = _edited(tmp_path, edit)
    with pytest.raises(LawFileError) as caught:
        load_law(path)
    assert str(path) in str(caught.value) and problem in str(caught.value)
    assert isinstance(caught.value, FitError)  # what the CLI and the router catch


def _cli(*args: str) -> subprocess.CompletedProcess:
    return cli(*args, timeout=300)


@pytest.mark.slow
def test_law_commands(results_file: Path, law_file: Path, tmp_path: Path) -> None:
    shown = _cli("law", "show", str(law_file))
    assert shown.returncode == 0 and "LOO median" in shown.stdout and "q_T" in shown.stdout
    out = _cli("law", "predict", str(law_file), "--ratio", "0.4", "--examples", "500", "--json")
    assert json.loads(out.stdout)["in_domain"]["value"] > 0.5
    plotted = _cli("law", "plot", str(results_file), str(law_file), "-o", str(tmp_path / "p"))
    assert plotted.returncode == 0, plotted.stderr
    for name in ("quality_vs_ratio.png", "predicted_vs_measured.png"):
        assert (tmp_path / "p" / name).read_bytes()[:4] == b"\x89PNG"
    refit = _cli("law", "fit", str(results_file), "-o", str(tmp_path / "l.json"),
                 "--resamples", "10", "--json")  # fmt: skip
    assert refit.returncode == 0 and set(json.loads(refit.stdout)) == {"in_domain", "general"}
    bad = _cli("law", "predict", str(law_file), "--ratio", "0", "--examples", "5")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "ratio in" in bad.stderr


def test_findings_compare_variants_with_the_baseline(results_file: Path) -> None:
    results = load_results(results_file)
    retention = retention_by_ratio(results)
    assert [e["target_ratio"] for e in retention] == [0.25, 0.4, 0.6, 0.8]
    assert all(e["examples"] == 1000 and e["seeds"] == 2 for e in retention)
    assert retention[0]["in_domain_retention"] < retention[-1]["in_domain_retention"] < 1
    cot = [c for c in comparisons(results) if c["target"] == "general"]
    assert {c["variant"] for c in cot} == {"cot supervision"} and len(cot) == 4
    for c in cot:  # generated with +0.03 general accuracy for cot, noise sd 0.01
        assert c["low"] < 0.03 < c["high"] and c["high"] - c["low"] < 0.08


@pytest.mark.slow
def test_cli_on_the_committed_results(tmp_path: Path) -> None:
    """The committed law shows, predicts and reports on the committed sweep results
    (refitting is test_law_commands' part: on these rows it takes minutes)."""
    committed, law = Path("docs/results/default.jsonl"), Path("docs/results/law.json")
    shown = _cli("law", "show", str(law))
    assert shown.returncode == 0 and f"students from {committed}" in shown.stdout
    out = _cli("law", "predict", str(law), "--ratio", "0.4", "--examples", "800", "--json")
    predicted = json.loads(out.stdout)
    assert 0 <= predicted["in_domain"]["low"] <= predicted["in_domain"]["high"] <= 1
    report = _cli("law", "report", str(committed), str(law))
    assert report.returncode == 0 and "| cot supervision | general |" in report.stdout
