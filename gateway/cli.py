"""The `distillgate` command line. One entry point composes each package's commands: the
gateway's `serve` (here), the factory's `tasks`, `teacher`, `distill`, `eval`, `sweep` and
`students` (models/cli.py), `law` (law/cli.py), and the adaptation loop's `traffic`
(gateway/adapt/traffic_cli.py) and `adapt` (gateway/adapt/cli.py).

Every command reports bad input as one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from gateway import keys_cli
from gateway.adapt import cli as adapt_cli
from gateway.adapt import traffic_cli
from law import cli as law_cli
from law.cli import CliError
from models import cli as models_cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if argv is None and getattr(args, "no_progress", False) and "tqdm" not in sys.modules:
        # This process is the command. tqdm reads its TQDM_* defaults once, when imported:
        # set now, the variable also silences bars we cannot reach (the GGUF conversion's).
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.func(args)
    except CliError as exc:
        print(f"distillgate: error: {exc}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage stays in --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    """The whole command tree, every package's commands under one root."""
    root = _Parser(prog="distillgate", description=__doc__.split("\n\n")[0])
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    serve = sub.add_parser("serve", help="serve the configured models over OpenAI's API")
    serve.add_argument("--config", type=Path, help="YAML config (default: the embedded teacher)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--store", type=Path, help="model store directory")
    serve.add_argument(
        "--workers", type=int, help="worker processes sharing the port, each a whole gateway "
        "(default: server.workers in the config, else 1; see README)",
    )  # fmt: skip
    serve.add_argument(
        "--adapt", action="store_true", help="also run the adaptation loop (`distillgate "
        "adapt run`) as a supervised child process, restarted if it dies",
    )  # fmt: skip
    serve.set_defaults(func=_serve)
    models_cli.add_commands(sub)
    law_cli.add_commands(sub)
    traffic_cli.add_commands(sub)
    adapt_cli.add_commands(sub)
    keys_cli.add_commands(sub)
    return root


def _settings(**overrides: object):
    from gateway.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.auth import exposure
    from gateway.config import ConfigError, load_config
    from models.store import ModelStore

    settings = _settings(config=args.config, host=args.host, port=args.port, store=args.store,
                         workers=args.workers)  # fmt: skip
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    config = config.with_traffic_dsn(settings.traffic_dsn)
    exposed = exposure(config.auth.mode, settings.host)  # no keys on a public address
    if exposed is not None and exposed[0] == "error":
        raise CliError(exposed[1])
    if exposed is not None:
        print(f"distillgate: warning: {exposed[1]}", file=sys.stderr)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    failed: list[str] = []

    def on_failure(reason: str) -> None:
        failed.append(reason)
        server.should_exit = True

    store = ModelStore(settings.store or config.store)
    workers = settings.workers or config.server.workers
    if workers > 1:  # N processes on one socket, each a whole gateway (gateway/workers.py)
        from gateway.workers import serve_workers

        return serve_workers(config, store.root, settings, workers, adapt=args.adapt)
    app = create_app(config, store, on_failure=on_failure)
    from gateway.admission import GracefulServer, mark_draining

    server = GracefulServer(  # SIGTERM: drain, finish in-flight requests, exit 0
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=config.server.shutdown_timeout_s,
        ),
        drain_s=config.server.drain_s,
        on_drain=lambda: mark_draining(app),
    )
    supervisor = None
    if args.adapt:
        from gateway.adapt.supervisor import Supervisor

        child_args = [f"--{k}={v}" for k, v in (("config", settings.config),
                      ("store", store.root)) if v is not None]  # fmt: skip
        supervisor = Supervisor(child_args)
        supervisor.start()
    try:
        server.run()
    finally:
        if supervisor is not None:
            supervisor.stop()
    if failed:
        print(f"distillgate: error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
