"""`distillgate adapt run | once | status | promote | rollback | retire | name`: the
adaptation loop as a process (gateway/adapt/process.py) and an operator's view of it and
hands on it. Every command reads the same gateway config as `serve` (models, traffic log,
routing policy and law, `adapt:` settings)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.adapt.traffic_cli import DSN_ENV
from law.cli import CliError, emit, json_flag
from models.cli import STORE_ENV

if TYPE_CHECKING:
    from gateway.adapt.job import Context
    from gateway.config import GatewayConfig

log = logging.getLogger("distillgate")


def add_loop_commands(actions: argparse._SubParsersAction) -> None:
    for name, helptext in (
        ("run", "run the adaptation loop until stopped (detect, distil, gate, roll out)"),
        ("once", "run one cycle of the loop (jobs run to their end) and exit: for cron"),
    ):
        cmd = actions.add_parser(name, help=helptext)
        _common(cmd)
        cmd.add_argument(
            "--metrics-port", type=int,
            help="serve the loop's metrics on this port (default adapt.metrics_port)",
        )  # fmt: skip
        cmd.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "run":
            cmd.add_argument("--interval", type=float,
                             help="seconds between cycles (default adapt.interval_s)")  # fmt: skip
        cmd.set_defaults(func=_run_loop, once=name == "once")
    status = actions.add_parser("status", help="jobs, students' rollout stages and transitions")
    _common(status)
    json_flag(status)
    status.set_defaults(func=_run_status)
    for action, helptext in (
        ("promote", "move a student one rollout step up (shadow -> canary -> live)"),
        ("rollback", "send a student back to shadow"),
        ("retire", "take a student out of routing for good (the gateway unloads it)"),
    ):
        cmd = actions.add_parser(action, help=helptext)
        _common(cmd)
        cmd.add_argument("student", help="the student's name (see `adapt status`)")
        json_flag(cmd)
        cmd.set_defaults(func=_run_manual, action_name=action)
    rename = actions.add_parser("name", help="give a new traffic's task a name of your own")
    _common(rename)
    rename.add_argument("job", help="the job's id, fingerprint or current name")
    rename.add_argument("new_name", metavar="NAME", help="letters, digits, '-', '_', '.'")
    json_flag(rename)
    rename.set_defaults(func=_run_name)


def _common(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", type=Path, help="the gateway's YAML config (default: embedded)")
    cmd.add_argument(
        "--store", type=Path,
        help=f"model store (default the config's, ${STORE_ENV}, or ~/.cache/distillgate/models)",
    )  # fmt: skip
    cmd.add_argument("--dsn", help="PostgreSQL URL of the traffic log (default the config's)")


def _config(args: argparse.Namespace) -> GatewayConfig:
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(" ".join(str(exc).split())) from None
    return config.with_traffic_dsn(args.dsn or os.environ.get(DSN_ENV))


@contextlib.contextmanager
def context(
    args: argparse.Namespace, progress: bool = False, create: bool = False
) -> Iterator[Context]:
    """The loop's context for one command: config, store, log, state, law, policy. Only
    the loop itself (`create`) makes a SQLite log that is not there yet."""
    from gateway.adapt.job import Context
    from gateway.adapt.log import TrafficLog, TrafficLogError, database_url, sqlite_path
    from gateway.adapt.state import AdaptState
    from gateway.routing.policy import PolicyError, PolicyFile
    from models.store import ModelStore

    config = _config(args)
    store = ModelStore(args.store or config.store or os.environ.get(STORE_ENV) or None)
    if not create and config.traffic.dsn is None and not sqlite_path(store.root).is_file():
        raise CliError(
            f"no traffic log at {sqlite_path(store.root)}; start `distillgate serve` (or "
            "`adapt run`) on this store first, or pass --store / --dsn"
        )
    try:
        log_ = TrafficLog.open(database_url(config.traffic.dsn, store.root))
    except TrafficLogError as exc:
        raise CliError(" ".join(str(exc).split())) from None
    try:
        policy = PolicyFile.open(config.routing.policy) if config.routing.policy else None
        law = None
        if config.routing.law is not None:
            from law.predict import load_law

            law = load_law(config.routing.law)
    except (PolicyError, OSError, ValueError) as exc:
        log_.close()
        raise CliError(" ".join(str(exc).split())) from None
    try:
        yield Context(config, store, log_, AdaptState(log_.engine), law, policy, progress)
    finally:
        log_.close()


def _run_loop(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from gateway.adapt.process import AdaptMetrics, AdaptProcess, lower_priority, single

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with context(args, progress=not args.no_progress, create=True) as ctx:
        adapt = ctx.config.adapt
        interval = getattr(args, "interval", None) or adapt.interval_s
        if interval <= 0:
            raise CliError(f"--interval must be positive, got {interval:g}")
        lower_priority(adapt.nice, adapt.threads)
        port = args.metrics_port if args.metrics_port is not None else adapt.metrics_port
        metrics = AdaptMetrics()
        if port is not None:
            try:
                start_http_server(port, registry=metrics.registry)
            except OSError as exc:
                raise CliError(f"--metrics-port {port}: {exc.strerror}") from None
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(single(ctx.store.root))
        except RuntimeError as exc:
            raise CliError(str(exc)) from None
        process = AdaptProcess(ctx, metrics)
        if args.once:
            with lock:
                process.cycle(inline=True)
                process.close()
            return 0
        stopping: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f: stopping.append(s))
        log.info("adapt: running (cycle every %g s, metrics on %s)", interval, port)
        process.run(interval, (bool(stopping) for _ in itertools.count()))
        log.info("adapt: stopping")
        # a job still training is resumed by the next start (its row stays `running`)
        process.close()
        os._exit(0)  # the worker thread may be inside a training step: do not wait for it


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def status_data(ctx: Context) -> dict[str, Any]:
    state = ctx.state
    jobs = [
        {"id": j.id, "name": j.name, "fingerprint": j.fingerprint, "status": j.status,
         "attempt": j.attempt, "student": j.student, "reason": j.reason,
         "updated": j.updated, "plan": j.record.get("plan"), "rows": j.record.get("rows"),
         "attempts": j.record.get("attempts", [])}
        for j in state.jobs()
    ]  # fmt: skip
    rollouts = [
        {"student": r.student, "domain": r.domain, "stage": r.stage, "share": r.share,
         "target": r.target, "since": r.since_ts, "reason": r.reason,
         "evidence": ctx.log.evidence(r.student, r.since_id).__dict__}
        for r in state.rollouts().values()
    ]  # fmt: skip
    transitions = [
        {"ts": s.ts, "student": s.transition.student, "from": s.transition.before,
         "to": s.transition.after, "share": s.transition.share, "reason": s.transition.reason,
         "evidence": s.transition.evidence}
        for s in state.transitions(limit=20)
    ]  # fmt: skip
    return {"jobs": jobs, "rollouts": rollouts, "transitions": transitions}


def format_status(data: dict[str, Any]) -> str:
    lines = ["jobs:" if data["jobs"] else "jobs: none (no new traffic found yet)"]
    for j in data["jobs"]:
        lines.append(f"  {j['id']:>3} {j['name']:<22} {j['status']:<10} {j['reason']}")
    lines.append("students:" if data["rollouts"] else "students: none in rollout")
    for r in data["rollouts"]:
        ev = r["evidence"]
        agree = f"{ev['agreeing'] / ev['pairs']:.3f} over {ev['pairs']} pairs" if ev["pairs"] \
            else "no pairs yet"  # fmt: skip
        lines.append(f"  {r['student']:<34} {r['stage']:<7} share {r['share']:<4g} target "
                     f"{r['target']:g}; agreement {agree}")  # fmt: skip
    if data["transitions"]:
        lines.append("transitions:")
    for t in data["transitions"]:
        lines.append(f"  {_when(t['ts'])} {t['student']} {t['from']} -> {t['to']}: {t['reason']}")
    return "\n".join(lines)


def _run_status(args: argparse.Namespace) -> int:
    with context(args) as ctx:
        data = status_data(ctx)
    return emit(args.json, data, format_status(data))


def _run_manual(args: argparse.Namespace) -> int:
    from gateway.adapt.rollout import manual

    with context(args) as ctx:
        rollout = ctx.state.rollout(args.student)
        if rollout is None:
            known = ", ".join(ctx.state.rollouts()) or "none"
            raise CliError(f"no student {args.student!r} in rollout; students: {known}")
        try:
            transition = manual(rollout, args.action_name, ctx.config.adapt.rollout)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        ctx.state.apply(rollout, transition, time.time(), ctx.log.last_id())
    data = {"student": args.student, "from": transition.before, "to": transition.after,
            "share": transition.share, "reason": transition.reason}  # fmt: skip
    text = f"{args.student}: {transition.before} -> {transition.after} (share {transition.share:g})"
    return emit(args.json, data, text)


def _run_name(args: argparse.Namespace) -> int:
    import re

    from gateway.adapt.dataset import rename_task

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,63}", args.new_name):
        raise CliError(f"name {args.new_name!r}: use up to 64 letters, digits, '-', '_', '.'")
    with context(args) as ctx:
        job = ctx.state.job(args.job)
        if job is None:
            raise CliError(f"no job {args.job!r}; see `distillgate adapt status`")
        task = job.record.get("task")
        if task and Path(task).is_file():
            rename_task(Path(task), args.new_name)
        ctx.state.update_job(job.id, name=args.new_name)
    data = {"job": job.id, "from": job.name, "to": args.new_name}
    return emit(args.json, data, f"job {job.id}: {job.name} -> {args.new_name}")
