"""The law's commands: `sweep` (make and measure a grid of students) and `law fit |
predict | plot | report | show`. Bad input is one line and exit code 2 (CliError)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gateway.factory_cli import CliError


def add_commands(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="make and measure a grid of students (resumable)")
    sweep.add_argument("--grid", type=Path, required=True, help="grid YAML (see deploy/)")
    sweep.add_argument("--out", type=Path, required=True, help="results JSONL (appended)")
    sweep.add_argument("--store", type=Path, help="model store directory")
    sweep.add_argument("--keep", action="store_true", help="keep the students in the store")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(func=_run_sweep)
    law = sub.add_parser("law", help="fit, inspect and use the scaling law")
    actions = law.add_subparsers(dest="action", required=True)
    fit = actions.add_parser("fit", help="fit every form to sweep results, write law.json")
    fit.add_argument("results", type=Path)
    fit.add_argument("-o", "--output", type=Path, default=Path("law.json"))
    fit.add_argument("--resamples", type=int, default=200, help="bootstrap resamples")
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(func=_run_fit)
    predict = actions.add_parser("predict", help="predicted quality of a candidate student")
    predict.add_argument("law", type=Path)
    predict.add_argument("--ratio", type=float, required=True)
    predict.add_argument("--examples", type=float, required=True)
    predict.add_argument("--format", choices=("answers", "logits", "cot"), default="logits")
    predict.add_argument("--method", choices=("full", "lora"), default="full")
    predict.add_argument("--schedule", default="one-shot")
    predict.add_argument("--parameters", type=float, help="non-embedding parameters (loss law)")
    predict.add_argument("--form", help="a form other than the selected one")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=_run_predict)
    plot = actions.add_parser("plot", help="PNG figures of the fit")
    plot.add_argument("results", type=Path)
    plot.add_argument("law", type=Path)
    plot.add_argument("-o", "--output", type=Path, default=Path("plots"))
    plot.set_defaults(func=_run_plot)
    report = actions.add_parser("report", help="the findings as Markdown tables")
    report.add_argument("results", type=Path)
    report.add_argument("law", type=Path)
    report.set_defaults(func=_run_report)
    show = actions.add_parser("show", help="forms, parameters and errors as a table")
    show.add_argument("law", type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_run_show)


def _law_errors():
    from law.fit import FitError

    return FitError


def _run_sweep(args: argparse.Namespace) -> int:
    from gateway.settings import Settings
    from models.distill.factory import FactoryError
    from models.store import ModelStore, StoreError
    from models.sweep import SweepError, load_grid, run_sweep

    try:
        grid = load_grid(args.grid)
        store = ModelStore(args.store or Settings().store)
        store.resolve(grid.teacher)
        made = run_sweep(store, grid, args.out, keep=args.keep, progress=not args.no_progress)
    except (SweepError, FactoryError, StoreError) as exc:
        raise CliError(str(exc)) from None
    print(f"{made} students measured; results in {args.out}")
    return 0


def _run_fit(args: argparse.Namespace) -> int:
    from law.data import load_results
    from law.predict import fit_law, save_law

    if args.resamples < 10:
        raise CliError(f"--resamples must be at least 10, got {args.resamples}")
    try:
        law = fit_law(load_results(args.results), resamples=args.resamples)
    except _law_errors() as exc:
        raise CliError(str(exc)) from None
    save_law(law, args.output)
    brief = {t: v.get("selected") for t, v in law["targets"].items()}
    print(json.dumps(brief) if args.json else f"wrote {args.output}; selected forms: {brief}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from law.predict import load_law, predict

    try:
        out = predict(
            load_law(args.law), ratio=args.ratio, examples=args.examples, format=args.format,
            method=args.method, schedule=args.schedule, parameters=args.parameters,
            form=args.form,
        )  # fmt: skip
    except _law_errors() as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for target, p in out.items():
        print(f"{target:10} {p['value']:.3f}  [{p['low']:.3f}, {p['high']:.3f}]  ({p['form']})")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from law.data import load_results
    from law.plot import plot_all
    from law.predict import load_law

    try:
        paths = plot_all(load_results(args.results), load_law(args.law), args.output)
    except _law_errors() as exc:
        raise CliError(str(exc)) from None
    print("\n".join(map(str, paths)))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from law.data import load_results
    from law.findings import report
    from law.predict import load_law

    try:
        print(report(load_results(args.results), load_law(args.law)))
    except _law_errors() as exc:
        raise CliError(str(exc)) from None
    return 0


def _table(law: dict[str, Any]) -> str:
    lines = [f"law v{law['version']} for {law['task']} (teacher {law['teacher']}), "
             f"{law['data']['rows']} students from {law['data']['path']}"]  # fmt: skip
    for target, fitted in law["targets"].items():
        for name, entry in fitted.get("forms", {}).items():
            mark = "*" if name == fitted.get("selected") else " "
            e = entry["errors"]
            lines.append(
                f"{mark} {target:9} {name:9} LOO median {e['loo_median_abs']:.4f}  "
                f"leave-ratio-out median {e['loro_median_abs']:.4f}  AIC {e['aic']:.1f}  "
                f"BIC {e['bic']:.1f}  noise floor {fitted['noise_floor']:.4f}"
            )
            for param, value in entry["parameters"].items():
                lo, hi = entry["intervals"][param]
                lines.append(f"      {param:24} {value:10.4f}  [{lo:.4f}, {hi:.4f}]")
        for name, reason in fitted.get("skipped", {}).items():
            lines.append(f"  {target:9} {name:9} not fitted: {reason}")
    return "\n".join(lines)


def _run_show(args: argparse.Namespace) -> int:
    from law.predict import load_law

    try:
        law = load_law(args.law)
    except _law_errors() as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(law, indent=1) if args.json else _table(law))
    return 0
