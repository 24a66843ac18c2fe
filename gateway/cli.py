"""The `distillgate` command line: `serve` the gateway, manage the registry's `students`,
the factory's `tasks`, `teacher adapt`, `distill`, `eval` (gateway/factory_cli.py), and
`sweep` and `law` (gateway/law_cli.py).

Every command reports bad input as one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from gateway import factory_cli, law_cli
from gateway.factory_cli import CliError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"distillgate: error: {exc}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage stays in --help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distillgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the configured models over OpenAI's API")
    serve.add_argument("--config", type=Path, help="YAML config (default: the embedded teacher)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--store", type=Path, help="model store directory")
    serve.set_defaults(func=_serve)
    students = sub.add_parser("students", help="list, show or remove registered models")
    actions = students.add_subparsers(dest="action", required=True)
    for action, helptext in (
        ("list", "every registered model"),
        ("show", "one model's manifest: lineage and evaluation"),
        ("remove", "delete a model (refused while a running gateway serves it)"),
    ):
        cmd = actions.add_parser(action, help=helptext)
        if action != "list":
            cmd.add_argument("name")
        cmd.add_argument("--store", type=Path, help="model store directory")
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        cmd.set_defaults(func=_students)
    factory_cli.add_commands(sub)
    law_cli.add_commands(sub)
    return parser


def _settings(**overrides: object):
    from gateway.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _students(args: argparse.Namespace) -> int:
    from models.store import ModelStore, StoreError

    store = ModelStore(_settings(store=args.store).store)
    try:
        if args.action == "list":
            entries = store.entries()
            if args.json:
                print(json.dumps([m.model_dump() for m in entries], indent=2))
            for m in [] if args.json else entries:
                ratio = "-" if m.compression_ratio is None else f"{m.compression_ratio:.2f}"
                print(f"{m.name:32} {m.role:8} r={ratio:5} parent={m.parent or '-'}")
        elif args.action == "show":
            manifest = store.manifest(args.name)
            print(manifest.model_dump_json(indent=2))
        else:
            store.remove(args.name)
            print(json.dumps({"removed": args.name}) if args.json else f"removed {args.name}")
    except StoreError as exc:
        raise CliError(str(exc)) from None
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.config import ConfigError, load_config
    from models.store import ModelStore

    settings = _settings(config=args.config, host=args.host, port=args.port, store=args.store)
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    failed: list[str] = []

    def on_failure(reason: str) -> None:
        failed.append(reason)
        server.should_exit = True

    store = ModelStore(settings.store or config.store)
    app = create_app(config, store, on_failure=on_failure)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    if failed:
        print(f"distillgate: error: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
