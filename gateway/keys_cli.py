"""`distillgate keys create | list | revoke`: the gateway's API keys (gateway/auth.py), in
the traffic log's database: the SQLite file in the model store, or PostgreSQL with --dsn,
$DISTILLGATE_TRAFFIC_DSN or the config's traffic.dsn (what `serve` with that config uses).
A key is printed once, by `create`; the database keeps only its salted hash.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.adapt.traffic_cli import DSN_ENV, UNITS
from law.cli import CliError, emit, json_flag
from models.cli import STORE_ENV

if TYPE_CHECKING:
    from gateway.auth import ApiKey, KeyStore

NAME = re.compile(r"^[A-Za-z0-9][\w.:-]{0,127}$")


def add_commands(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke the gateway's API keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of:")
    create = actions.add_parser("create", help="make a key and print it (once)")
    create.add_argument("--name", required=True, help="the key's name (policies, metrics, logs)")
    create.add_argument("--class", dest="slo_class", help="its SLO class (routing of `auto`)")
    create.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    create.add_argument("--tpm", type=int, help="tokens per minute: prompt + max_tokens "
                        "reserved, corrected when a request ends (default: no limit)")  # fmt: skip
    create.add_argument("--expires", help="a duration from now (30d, 12h) or an ISO date/time")
    _db_flags(create)
    create.set_defaults(func=_create)
    listing = actions.add_parser("list", help="every key, without secrets")
    _db_flags(listing)
    listing.set_defaults(func=_list)
    revoke = actions.add_parser("revoke", help="revoke a key (gateways refuse it within "
                                "auth.refresh_s, 5 s by default)")  # fmt: skip
    revoke.add_argument("name", help="the key's name")
    _db_flags(revoke)
    revoke.set_defaults(func=_revoke)


def _db_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", type=Path, help="gateway config (its traffic.dsn, store, "
                     "policy); default $DISTILLGATE_CONFIG or the embedded one")  # fmt: skip
    cmd.add_argument(
        "--store",
        type=Path,
        help=f"model store holding traffic.db "
        f"(default ${STORE_ENV}, the config's, or ~/.cache/distillgate/models)",
    )
    cmd.add_argument("--dsn", help=f"PostgreSQL URL (default ${DSN_ENV} or the config's)")
    json_flag(cmd)


def parse_expiry(text: str, now: float) -> float:
    """`--expires` as Unix seconds: a duration from `now`, or an ISO date/time."""
    duration = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if duration:
        return now + float(duration[1]) * UNITS[duration[2]]
    try:
        at = datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise CliError(f"--expires {text!r} is neither a duration nor a date/time; use e.g. "
                       "30d, 12h or 2027-01-31") from None  # fmt: skip
    if at <= now:
        raise CliError(f"--expires {text!r} is in the past; give a later date or a duration")
    return at


def _config(args: argparse.Namespace):
    from gateway.config import ConfigError, load_config

    path = args.config or os.environ.get("DISTILLGATE_CONFIG") or None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(" ".join(str(exc).split())) from None


@contextlib.contextmanager
def opened(args: argparse.Namespace) -> Iterator[KeyStore]:
    """The key store that the flags, the environment and the config name."""
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.adapt.log import TrafficLogError, database_url
    from gateway.auth import KeyStore, KeyStoreError
    from models.store import ModelStore

    config = _config(args)
    dsn = args.dsn or os.environ.get(DSN_ENV) or config.traffic.dsn
    root = ModelStore(args.store or os.environ.get(STORE_ENV) or config.store).root
    try:
        store = KeyStore.open(database_url(dsn, root))
    except TrafficLogError as exc:
        raise CliError(f"{' '.join(str(exc).split())}; check --dsn (or ${DSN_ENV})") from None
    try:
        yield store
    except KeyStoreError as exc:
        raise CliError(str(exc)) from None
    except SQLAlchemyError as exc:
        raise CliError(f"the key store failed: {' '.join(str(exc).split())[:300]}") from None
    finally:
        store.close()


def _check_class(args: argparse.Namespace, slo_class: str) -> None:
    """A class the config's routing policy does not have would fail every auto request."""
    from gateway.routing.policy import PolicyError, load_policy

    policy_path = _config(args).routing.policy
    if policy_path is None:
        return
    try:
        classes = load_policy(policy_path).classes
    except PolicyError as exc:
        raise CliError(f"cannot check --class against the policy: {exc}") from None
    if slo_class not in classes:
        raise CliError(f"--class {slo_class!r} is not a class of {policy_path} (classes: "
                       f"{', '.join(sorted(classes))}); use one of them or --config")  # fmt: skip


def _create(args: argparse.Namespace) -> int:
    if not NAME.match(args.name) or args.name.startswith("dg-"):
        raise CliError(f"--name {args.name!r}: use letters, digits, '_', '.', ':', '-' (up to "
                       "128, not starting with 'dg-')")  # fmt: skip
    for flag in ("rpm", "tpm"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag} must be at least 1, got {value}")
    if args.slo_class is not None:
        _check_class(args, args.slo_class)
    now = time.time()
    expires = parse_expiry(args.expires, now) if args.expires else None
    with opened(args) as store:
        key, secret = store.create(args.name, args.slo_class, args.rpm, args.tpm, expires, now)
    shown = {"key": secret, **key.public()}
    return emit(
        args.json,
        shown,
        f"{secret}\n(key {key.name!r}: shown this once; the "
        "gateway keeps only its hash. Send it as `Authorization: Bearer <key>`.)",
    )


def _list(args: argparse.Namespace) -> int:
    with opened(args) as store:
        keys = store.all()
    return emit(args.json, [k.public() for k in keys], _table(keys))


def _revoke(args: argparse.Namespace) -> int:
    with opened(args) as store:
        key = store.revoke(args.name, time.time())
    return emit(args.json, key.public(), f"revoked {key.name} ({key.prefix}...)")


def _table(keys: list[ApiKey]) -> str:
    if not keys:
        return "no keys; make one with `distillgate keys create --name NAME`"
    rows = [("NAME", "PREFIX", "CLASS", "RPM", "TPM", "CREATED", "EXPIRES", "REVOKED")]
    for k in keys:
        p = k.public()
        rows.append(tuple(str(p[f] if p[f] is not None else "-") for f in (
            "name", "prefix", "class", "rpm", "tpm", "created", "expires", "revoked")))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip
