"""The gateway's overhead: wrk against the instant server directly, through distillgate (with
auth, rate limits and the traffic log off or on) and, optionally, through LiteLLM's proxy.

Starts the instant server (gateway/instant.py, on the port named in gateway.yaml's `url`)
and `distillgate serve --config bench/overhead/gateway.yaml` (an `openai` backend in front
of the instant server; one worker unless --workers), then runs wrk (chat.lua: one small chat
completion per request) at each concurrency, every target side by side in every repeat, and
prints the medians over the repeats of p50, p99, req/s and each proxy's own CPU time per
request, then what each proxy adds: p50 and p99 minus the direct backend's, and latency and
throughput as ratios to the direct backend and to LiteLLM. Fails clearly if a server does
not come up.

    .venv/bin/python -m bench.overhead.run                    # direct + gateway, 5 x 10 s
    .venv/bin/python -m bench.overhead.run --full --litellm   # + everything on, + LiteLLM
    .venv/bin/python -m bench.overhead.run --direct-only      # the instant server alone

Targets (each a process of its own, measured in the same repeats):
  gateway           traffic log off, auth none
  gateway+log       --traffic: the traffic log on (a SQLite file in a temporary directory;
                    the shipped policy logs content for the default class)
  gateway+auth      --auth: `auth: {mode: keys}`, one key made by `distillgate keys create`
                    with rpm and tpm limits (far above what wrk reaches: checked, never hit)
  gateway+auth+log  --full: keys, limits and the log all on: the figure to quote
                    (with --workers N > 1 the keyed gateways share the limits through Redis:
                    --redis-url, else a throwaway redis-server the benchmark starts)
  litellm           --litellm: LiteLLM's proxy (bench/overhead/litellm_proxy.py), one worker,
                    in its own virtualenv (--litellm-venv, made on first use)

(from the repo root: bench/ is a package of scripts, not part of the installed project)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path

import yaml

from bench.overhead import litellm_proxy
from bench.overhead.procs import BenchError, cpu_seconds, free_port, process, redis_server
from bench.overhead.table import DIRECT, GATEWAY, LITELLM, Row, document, median_row, report

BASELINE = "gateway@base"

__all__ = ["INSTANT", "BenchError", "free_port", "main", "process"]

# The instant server: an OpenAI-compatible server that answers at once (gateway/instant.py).
INSTANT = [sys.executable, "-m", "gateway.instant"]
# The key's limits: real limits, checked on every request, that wrk never reaches
# (3,000 req/s for a minute is 180,000 requests, ~5M tokens).
KEY_RPM, KEY_TPM = 10_000_000, 1_000_000_000
# name -> (auth with the key's limits, traffic log), in the order they are measured
VARIANTS = {
    GATEWAY: (False, False),
    "gateway+log": (False, True),
    "gateway+auth": (True, False),
    "gateway+auth+log": (True, True),
}


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    key: str | None = None  # sent as `Authorization: Bearer`
    pid: int | None = None  # whose process tree's CPU time is read


def variants(traffic: bool, auth: bool, full: bool) -> list[str]:
    """The distillgate targets the flags ask for; the plain gateway always (the baseline
    of what each feature costs)."""
    wanted = {GATEWAY: True, "gateway+log": traffic, "gateway+auth": auth,
              "gateway+auth+log": full}  # fmt: skip
    return [name for name in VARIANTS if wanted[name]]


def variant_config(data: dict, name: str, dsn: str, redis_url: str | None = None) -> dict:
    """The benchmark's config for one variant. Keys live in the traffic log's database, so
    every variant names the same one (`dsn`) even with the log off. With `redis_url` the
    keys' limits are shared through it (what several workers need)."""
    auth, log = VARIANTS[name]
    out = {**data, "traffic": {"enabled": log, "dsn": dsn}}
    if auth:
        out["auth"] = {"mode": "keys"}
        if redis_url:
            out["limits"] = {**data.get("limits", {}), "redis_url": redis_url}
    return out


def describe(
    names: list[str], workers: int, litellm_workers: int, pin: str, redis: bool = False
) -> dict[str, str]:
    """What each target is, printed above the table and kept in the JSON."""
    proc = f"distillgate serve, {workers} worker{'s' if workers > 1 else ''}"
    keys = f"auth keys, rpm {KEY_RPM:,} and tpm {KEY_TPM:,} on the key" + (
        " (limits shared through Redis)" if redis else ""
    )
    text = {
        DIRECT: "the instant server (gateway/instant.py), no proxy",
        GATEWAY: f"{proc}; traffic log off, auth none",
        "gateway+log": f"{proc}; traffic log on (SQLite), auth none",
        "gateway+auth": f"{proc}; {keys}; traffic log off",
        "gateway+auth+log": f"{proc}; {keys}; traffic log on (SQLite)",
        BASELINE: "as gateway, 1 worker, served from the --baseline checkout",
        LITELLM: f"LiteLLM proxy ({pin}), {litellm_workers} uvicorn worker(s) with uvloop, "
        "master key, no database, no callbacks, spend/error logs off, LITELLM_LOG=ERROR",
    }
    return {name: text[name] for name in names}


def serve_argv(config: Path, port: int, store: Path, workers: int) -> list[str]:
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--store", str(store)]  # fmt: skip
    return [*argv, "--workers", str(workers)] if workers > 1 else argv


def wrk(target: Target, connections: int, seconds: float) -> dict:
    """One wrk run; the RESULT line printed by chat.lua, parsed."""
    with as_file(files(__package__).joinpath("chat.lua")) as script:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
                "-s", str(script), target.url]  # fmt: skip
        env = {**os.environ, "MODEL": target.model, "API_KEY": target.key or ""}
        run = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    if result["errors"] or result["non2xx"]:
        raise BenchError(f"{target.name} ({target.url}) at c={connections}: {result['errors']} "
                         f"socket errors, {result['non2xx']} non-2xx answers")  # fmt: skip
    return result


def measured(target: Target, connections: int, seconds: float) -> dict:
    """wrk against `target`, with the CPU its processes spent per request (steadier than
    latency on a shared machine: what a feature costs shows there even when the noise hides
    it in p50)."""
    before = cpu_seconds(target.pid) if target.pid else None
    result = wrk(target, connections, seconds)
    if before is not None:
        spent = cpu_seconds(target.pid) - before
        result["cpu_us"] = spent / max(result["requests"], 1) * 1e6
    return result


def measure(targets: list[Target], args: argparse.Namespace) -> list[Row]:
    """Every target at every concurrency, interleaved within each repeat."""
    for target in targets:  # warm up connections, caches, lazy imports (LiteLLM's features)
        wrk(target, max(args.concurrency), args.warmup)
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for c in args.concurrency:
            for target in targets:
                result = measured(target, c, args.duration)
                runs.setdefault((target.name, c), []).append(result)
                p50, p99, rps = result["p50_us"], result["p99_us"], result["rps"]
                print(f"  {repeat + 1} {target.name:16} c={c:<3} p50 {p50:>7} us p99 {p99:>7} "
                      f"us {rps:>8.0f} req/s", file=sys.stderr, flush=True)  # fmt: skip
    return [median_row(name, c, r) for (name, c), r in runs.items()]


def create_key(config: Path, dsn: str, store: Path) -> str:
    """A key with the benchmark's limits, made the way a user makes one."""
    argv = [sys.executable, "-m", "gateway.cli", "keys", "create", "--name", "bench-overhead",
            "--rpm", str(KEY_RPM), "--tpm", str(KEY_TPM), "--config", str(config),
            "--dsn", dsn, "--store", str(store), "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"distillgate keys create failed ({done.returncode}): {done.stderr}")
    return json.loads(done.stdout)["key"]


def start_gateways(
    stack: contextlib.ExitStack, args: argparse.Namespace, scratch: Path, names: list[str]
) -> list[Target]:
    data = yaml.safe_load(args.config.read_text())
    model, dsn = data["models"][0]["name"], f"sqlite:///{scratch / 'traffic.db'}"
    store = scratch / "store"
    needs_key = any(VARIANTS[name][0] for name in names)
    key = create_key(args.config, dsn, store) if needs_key else None
    redis_url = args.redis_url
    if needs_key and args.workers > 1 and not redis_url:  # each worker would limit alone
        redis_url = stack.enter_context(redis_server(scratch))
    targets = []
    for name in names:
        path = scratch / f"{name}.yaml"
        path.write_text(yaml.safe_dump(variant_config(data, name, dsn, redis_url)))
        port = args.gateway_port if name == GATEWAY else free_port()
        url = f"http://127.0.0.1:{port}"
        argv = serve_argv(path, port, store, args.workers)
        pid = stack.enter_context(process(name, argv, f"{url}/ready", 120))
        targets.append(Target(name, url, model, key if VARIANTS[name][0] else None, pid))
    if args.baseline is not None:  # the plain gateway's config, served by older code
        url = f"http://127.0.0.1:{(port := free_port())}"
        argv = serve_argv(scratch / f"{GATEWAY}.yaml", port, store, 1)
        env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
        pid = stack.enter_context(process(BASELINE, argv, f"{url}/ready", 120, env=env,
                                          cwd=args.baseline))  # fmt: skip
        targets.append(Target(BASELINE, url, model, None, pid))
    return targets


def start_litellm(
    stack: contextlib.ExitStack, args: argparse.Namespace, scratch: Path, instant: str, model: str
) -> Target:
    exe = litellm_proxy.ensure_venv(args.litellm_venv, args.litellm_pin)
    master_key = f"sk-{secrets.token_hex(16)}"
    path = scratch / "litellm.yaml"
    path.write_text(yaml.safe_dump(litellm_proxy.config(instant, model, master_key)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = litellm_proxy.argv(exe, path, port, args.litellm_workers)
    env = litellm_proxy.environment(dict(os.environ))
    ready = f"{url}/health/liveliness"
    pid = stack.enter_context(process(LITELLM, argv, ready, 300, env=env, cwd=scratch))
    return Target(LITELLM, url, model, master_key, pid)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config = files(__package__) / "gateway.yaml"
    p.add_argument("--config", type=Path, default=config, help="gateway config: one openai model "
                   "in front of the instant server")  # fmt: skip
    p.add_argument("--gateway-port", type=int, default=8100)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of wrk per target first")
    p.add_argument("--direct-only", action="store_true", help="skip every proxy")
    p.add_argument("--traffic", action="store_true", help="+ gateway+log (traffic log on)")
    p.add_argument("--auth", action="store_true", help="+ gateway+auth (keys with limits)")
    p.add_argument("--full", action="store_true", help="+ gateway+auth+log (keys, limits "
                   "and the log on): the one to quote")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="distillgate serve --workers N")
    p.add_argument("--redis-url", help="share the keys' limits through this Redis (default: "
                   "none with one worker; a throwaway redis-server with several)")  # fmt: skip
    p.add_argument("--litellm", action="store_true", help="+ LiteLLM's proxy")
    p.add_argument("--litellm-venv", type=Path, default=litellm_proxy.DEFAULT_VENV,
                   help="LiteLLM's own virtualenv, made on first use (%(default)s)")  # fmt: skip
    p.add_argument("--litellm-pin", default=litellm_proxy.PIN, help="default %(default)s")
    p.add_argument("--litellm-workers", type=int, default=1, help="its --num_workers")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="SRC",
        help="+ gateway@base: the plain "
        "gateway served from another checkout (e.g. a `git worktree` of an older "
        "commit), measured in the same repeats",
    )
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    args = p.parse_args(argv)
    for flag in ("repeats", "workers", "litellm_workers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if min(args.concurrency) < 1 or args.duration <= 0 or args.warmup <= 0:
        p.error("--concurrency values, --duration and --warmup must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed (apt-get install -y wrk)")
    backend = yaml.safe_load(args.config.read_text())["models"][0]
    instant_url, served = backend["url"].rstrip("/"), backend.get("served_model") or backend["name"]
    instant = [*INSTANT, "--port", instant_url.rsplit(":", 1)[1], "--model", served]
    names = [] if args.direct_only else variants(args.traffic, args.auth, args.full)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.enter_context(process("instant server", instant, f"{instant_url}/health", 30))
        targets = [Target(DIRECT, instant_url, served)]
        targets += start_gateways(stack, args, scratch, names)
        if args.litellm and not args.direct_only:
            targets.append(start_litellm(stack, args, scratch, instant_url, served))
        rows = measure(targets, args)
    redis = bool(args.redis_url) or args.workers > 1
    described = describe(
        [t.name for t in targets], args.workers, args.litellm_workers, args.litellm_pin, redis
    )
    settings = {k: getattr(args, k) for k in ("concurrency", "repeats", "duration", "warmup",
                                              "workers", "redis_url")}  # fmt: skip
    if args.litellm:
        settings |= {"litellm_pin": args.litellm_pin, "litellm_workers": args.litellm_workers}
    doc = document(rows, described, settings)
    print(json.dumps(doc, indent=2) if args.json else report(rows, described))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench/overhead: error: {exc}", file=sys.stderr)
        sys.exit(1)
