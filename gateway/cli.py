"""`distillgate serve`: the command line. Later issues add students, distill, sweep, law."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distillgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the configured models over OpenAI's API")
    serve.add_argument("--config", type=Path, help="YAML config (default: the embedded teacher)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--store", type=Path, help="model store directory")
    args = parser.parse_args(argv)
    try:
        return _serve(args)
    except _CliError as exc:
        print(f"distillgate: error: {exc}", file=sys.stderr)
        return 2


class _CliError(Exception):
    pass


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.config import ConfigError, load_config
    from gateway.settings import Settings
    from models.store import ModelStore

    overrides = {k: v for k in ("config", "host", "port", "store") if (v := getattr(args, k))}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _CliError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        raise _CliError(str(exc)) from None
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
