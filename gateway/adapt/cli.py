"""`distillgate adapt watch | events`: the shift detectors run alone over the traffic log
(printing each event as it is found, storing it in the log's database and counting it on
an optional metrics port), and the events found so far."""

from __future__ import annotations

import argparse
import contextlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.adapt.records import EVENT_KINDS, ShiftEvent
from gateway.adapt.traffic_cli import log_flags, reading, since_of
from law.cli import CliError, emit, json_flag


def add_commands(sub: argparse._SubParsersAction) -> None:
    from gateway.adapt.commands import add_loop_commands

    adapt = sub.add_parser("adapt", help="the adaptation loop: detect new traffic, distil a "
                           "student for it, roll it out")  # fmt: skip
    actions = adapt.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of:")
    add_loop_commands(actions)
    watch = actions.add_parser(
        "watch",
        help="run the shift detectors over the traffic log and print each event found",
        description="Without --since the detectors are first warmed on the most recent "
        "rows (nothing reported), then follow new rows; with --since they replay from "
        "then and report everything.",
    )
    log_flags(watch)
    watch.add_argument(
        "--config", type=Path, help="gateway config whose adapt.detect thresholds apply "
        "(default: the built-in thresholds)",
    )  # fmt: skip
    watch.add_argument("--once", action="store_true", help="stop once caught up")
    watch.add_argument(
        "--interval", type=float, default=1.0, help="seconds between reads (default 1)"
    )
    watch.add_argument(
        "--metrics-port", type=int, help="serve distillgate_shift_events_total on this port"
    )
    watch.add_argument(
        "--dry-run", action="store_true", help="print events without storing them in the log"
    )
    watch.add_argument("--json", action="store_true", help="one JSON object per event line")
    watch.set_defaults(func=_run_watch)
    events = actions.add_parser("events", help="list the shift events stored in the log")
    log_flags(events)
    events.add_argument("--kind", choices=EVENT_KINDS, help="only events of this kind")
    events.add_argument(
        "--limit", type=int, default=100, help="the most recent N events (default 100)"
    )
    json_flag(events)
    events.set_defaults(func=_run_events)


def _detector_config(path: Path | None):
    from gateway.adapt.detectors import DetectorConfig
    from gateway.config import ConfigError, load_config

    if path is None:
        return DetectorConfig()
    try:
        return load_config(path).adapt.detect
    except ConfigError as exc:
        raise CliError(str(exc).replace("\n", " ")) from None


def _run_watch(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from gateway.adapt.detectors import Detectors
    from gateway.adapt.watch import Watcher, WatchMetrics

    if args.interval <= 0:
        raise CliError(f"--interval must be positive, got {args.interval:g}")
    config = _detector_config(args.config)
    since = since_of(args)
    metrics = WatchMetrics()
    if args.metrics_port is not None:
        try:
            start_http_server(args.metrics_port, registry=metrics.registry)
        except OSError as exc:
            raise CliError(f"--metrics-port {args.metrics_port}: {exc.strerror}") from None
    with reading(args) as log:
        watcher = Watcher(log, Detectors(config), metrics, store_events=not args.dry_run)
        if since is None:
            watcher.warm_up(config.window * 4)
        else:
            watcher.replay_from(since)
        report = (lambda e: _print_json(e)) if args.json else (lambda e: print(describe(e)))
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a watch cleanly
            watcher.follow(report, args.interval, once=args.once)
    return 0


def _run_events(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")
    since = since_of(args)
    with reading(args) as log:
        found = log.events(since=since, kind=args.kind, limit=args.limit)
    data = [{"id": i, **_as_dict(e)} for i, e in found]
    text = "\n".join(describe(e) for _, e in found) or "no shift events"
    return emit(args.json, data, text)


def _as_dict(event: ShiftEvent) -> dict[str, Any]:
    return {"kind": event.kind, "key": event.key, "ts": event.ts, "at_id": event.at_id,
            "evidence": event.evidence}  # fmt: skip


def _print_json(event: ShiftEvent) -> None:
    print(json.dumps(_as_dict(event)), flush=True)


def describe(event: ShiftEvent) -> str:
    """One line: when, what, which key, and the evidence's numbers."""
    when = datetime.fromtimestamp(event.ts).isoformat(timespec="seconds")
    figures = " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in event.evidence.items()
        if isinstance(v, int | float | str)
    )
    return f"{when} {event.kind} {event.key} {figures}".rstrip()
