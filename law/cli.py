"""The law's commands, `law fit | predict | plot | report | show`, and what every package's
commands share: `CliError` (bad input: one line on stderr, exit code 2) and `emit`.

Both live here because law/ is the lowest layer: models/ and gateway/ may import it, and
it imports neither, nor torch, transformers or fastapi, not even when its commands run.
gateway/cli.py composes these commands with the others into `distillgate`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FORMATS = ("answers", "logits", "cot")
METHODS = ("full", "lora")


class CliError(Exception):
    """Bad input to a command: printed as one line, exit code 2."""


def emit(as_json: bool, data: Any, text: str) -> int:
    """Print `data` as JSON (for `--json`) or `text`; stdout carries nothing else."""
    print(json.dumps(data, indent=2) if as_json else text)
    return 0


def json_flag(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def add_commands(sub: argparse._SubParsersAction) -> None:
    law = sub.add_parser("law", help="fit, inspect and use the scaling law")
    actions = law.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of:")
    _fit(actions)
    _predict(actions)
    plot = actions.add_parser("plot", help="PNG figures of the fit")
    plot.add_argument("results", type=Path, help="sweep results (JSONL) the law was fitted to")
    plot.add_argument("law", type=Path, help="law.json written by `law fit`")
    plot.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("plots"),
        help="directory for the figures (default plots/)",
    )
    json_flag(plot)
    plot.set_defaults(func=_run_plot)
    report = actions.add_parser("report", help="the findings as Markdown tables")
    report.add_argument("results", type=Path, help="sweep results (JSONL)")
    report.add_argument("law", type=Path, help="law.json written by `law fit`")
    json_flag(report)
    report.set_defaults(func=_run_report)
    show = actions.add_parser("show", help="forms, parameters and errors as a table")
    show.add_argument("law", type=Path, help="law.json written by `law fit`")
    json_flag(show)
    show.set_defaults(func=_run_show)


def _fit(actions: argparse._SubParsersAction) -> None:
    fit = actions.add_parser("fit", help="fit every form to sweep results, write law.json")
    fit.add_argument("results", type=Path, help="sweep results (JSONL, `distillgate sweep`)")
    fit.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("law.json"),
        help="where to write the law (default law.json)",
    )
    fit.add_argument(
        "--resamples",
        type=int,
        default=200,
        help="bootstrap resamples for the intervals (at least 10; default 200)",
    )
    json_flag(fit)
    fit.set_defaults(func=_run_fit)


def _predict(actions: argparse._SubParsersAction) -> None:
    predict = actions.add_parser("predict", help="predicted quality of a candidate student")
    predict.add_argument("law", type=Path, help="law.json written by `law fit`")
    predict.add_argument(
        "--ratio",
        type=float,
        required=True,
        help="compression ratio in (0, 1]: student / teacher parameters",
    )
    predict.add_argument(
        "--examples", type=float, required=True, help="distillation examples (train items)"
    )
    predict.add_argument(
        "--format",
        choices=FORMATS,
        default="logits",
        help="supervision: answers, logits or cot (default logits)",
    )
    predict.add_argument(
        "--method", choices=METHODS, default="full", help="full fine-tuning or lora (default full)"
    )
    predict.add_argument(
        "--schedule", default="one-shot", help="pruning schedule: one-shot or iterative:k"
    )
    predict.add_argument("--parameters", type=float, help="non-embedding parameters (loss law)")
    predict.add_argument("--form", help="a form other than the selected one")
    json_flag(predict)
    predict.set_defaults(func=_run_predict)


def _law_errors() -> type[Exception]:
    from law.fit import FitError

    return FitError


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
    selected = {name: target.selected for name, target in law.targets.items()}
    return emit(args.json, selected, f"wrote {args.output}; selected forms: {selected}")


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
    lines = [f"{target:10} {p['value']:.3f}  [{p['low']:.3f}, {p['high']:.3f}]  ({p['form']})"
             for target, p in out.items()]  # fmt: skip
    return emit(args.json, out, "\n".join(lines))


def _run_plot(args: argparse.Namespace) -> int:
    from law.data import load_results
    from law.plot import plot_all
    from law.predict import load_law

    try:
        paths = plot_all(load_results(args.results), load_law(args.law), args.output)
    except _law_errors() as exc:
        raise CliError(str(exc)) from None
    return emit(args.json, [str(p) for p in paths], "\n".join(map(str, paths)))


def _run_report(args: argparse.Namespace) -> int:
    from law.data import load_results
    from law.findings import comparisons, configurations, report, retention_by_ratio
    from law.predict import load_law

    try:
        results, law = load_results(args.results), load_law(args.law)
        text = report(results, law)
    except _law_errors() as exc:
        raise CliError(str(exc)) from None
    data = {
        "configurations": configurations(results),
        "retention_by_ratio": retention_by_ratio(results),
        "comparisons": comparisons(results),
        "markdown": text,
    }
    return emit(args.json, data, text)


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
        law = load_law(args.law).model_dump()
    except _law_errors() as exc:
        raise CliError(str(exc)) from None
    # json.dumps, not pydantic's serializer: a NaN error (an unfittable leave-one-out) stays
    # NaN, as law.json itself writes it.
    return emit(args.json, law, _table(law))
