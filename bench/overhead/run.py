"""The gateway's overhead: wrk against the instant server directly and through distillgate.

Starts the instant server (gateway/instant.py, on the port named in gateway.yaml's `url`)
and `distillgate serve --config bench/overhead/gateway.yaml` (one uvicorn worker, an
`openai` backend in front of the instant server), then runs wrk (chat.lua: one small chat
completion per request) at each concurrency, both targets side by side in every repeat, and
prints the medians over the repeats of p50, p99 and requests/s. Fails clearly if the gateway does
not come up.

    .venv/bin/python -m bench.overhead.run                    # both, 5 x 10 s
    .venv/bin/python -m bench.overhead.run --direct-only      # the instant server alone
    .venv/bin/python -m bench.overhead.run --traffic          # + a gateway with the log on

The gateway runs with its traffic log off (`gateway`); `--traffic` adds a second gateway
process, the same config with the log on (a SQLite file in a temporary directory; the
shipped policy logs content for the default class), measured in the same repeats
(`logged`).

(from the repo root: bench/ is a package of scripts, not part of the installed project)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.resources import as_file, files
from pathlib import Path

import yaml

# The instant server: an OpenAI-compatible server that answers at once (gateway/instant.py).
INSTANT = [sys.executable, "-m", "gateway.instant"]


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def process(name: str, argv: list[str], ready_url: str, timeout_s: float) -> Iterator[int]:
    """Run `argv` until `ready_url` answers 200; stop it afterwards."""
    with tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not answers_200(ready_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-3000:]
                state = (
                    f"exited with code {proc.returncode}"
                    if proc.poll() is not None
                    else (f"was not ready within {timeout_s:g} s")
                )
                raise BenchError(f"{name} ({' '.join(argv)}) {state}; log {log.name}:\n{tail}")
            time.sleep(0.1)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrk(url: str, model: str, connections: int, seconds: float) -> dict:
    """One wrk run; the RESULT line printed by chat.lua, parsed."""
    with as_file(files(__package__).joinpath("chat.lua")) as script:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
                "-s", str(script), url]  # fmt: skip
        env = {**os.environ, "MODEL": model}
        run = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    if result["errors"] or result["non2xx"]:
        raise BenchError(f"{url} at c={connections}: {result['errors']} socket errors, "
                         f"{result['non2xx']} non-2xx answers")  # fmt: skip
    return result


def median_row(runs: list[dict]) -> dict:
    row = {
        "p50_ms": statistics.median(r["p50_us"] for r in runs) / 1000,
        "p99_ms": statistics.median(r["p99_us"] for r in runs) / 1000,
        "rps": statistics.median(r["rps"] for r in runs),
        "runs": len(runs),
    }
    if all("cpu_us" in r for r in runs):
        row["cpu_us"] = statistics.median(r["cpu_us"] for r in runs)
    return row


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(targets: dict[str, tuple[str, str]], pids: dict[str, int], args) -> dict:
    """Every target at every concurrency, interleaved within each repeat. For the
    gateways, also their own CPU time per request (steadier than latency on a shared
    machine: what a feature costs shows there even when the noise hides it in p50)."""
    for url, model in targets.values():  # warm up connections, caches and JITs
        wrk(url, model, max(args.concurrency), 2)
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for c in args.concurrency:
            for name, (url, model) in targets.items():
                before = cpu_seconds(pids[name]) if name in pids else None
                result = wrk(url, model, c, args.duration)
                if before is not None:
                    spent = cpu_seconds(pids[name]) - before
                    result["cpu_us"] = spent / max(result["requests"], 1) * 1e6
                runs.setdefault((name, c), []).append(result)
                p50, p99, rps = result["p50_us"], result["p99_us"], result["rps"]
                print(f"  {repeat + 1} {name:8} c={c:<3} p50 {p50:>6} us p99 {p99:>6} us "
                      f"{rps:>8.0f} req/s", flush=True)  # fmt: skip
    return {f"{name} c={c}": median_row(r) for (name, c), r in runs.items()}


def report(rows: dict, concurrency: list[int]) -> str:
    lines = ["| target | concurrency | p50 ms | p99 ms | req/s | gateway CPU us/request |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in rows.items():
        name, c = key.split(" c=")
        cpu = f"{row['cpu_us']:.0f}" if "cpu_us" in row else "-"
        lines.append(f"| {name} | {c} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
                     f"{row['rps']:.0f} | {cpu} |")  # fmt: skip
    for c in concurrency:
        direct, gateway = rows.get(f"direct c={c}"), rows.get(f"gateway c={c}")
        if direct and gateway:
            lines.append(f"\nc={c}: the gateway adds {gateway['p50_ms'] - direct['p50_ms']:.3f} "
                         f"ms at p50 and serves {gateway['rps']:.0f} req/s")  # fmt: skip
        logged = rows.get(f"logged c={c}")
        if gateway and logged:
            added_us = (logged["p50_ms"] - gateway["p50_ms"]) * 1000
            ratio = logged["rps"] / gateway["rps"]
            cpu = logged["cpu_us"] - gateway["cpu_us"]
            lines.append(f"c={c}: the traffic log adds {added_us:.0f} us at p50 and {cpu:.0f} us "
                         f"of CPU per request; throughput {ratio:.3f} of the log off")  # fmt: skip
    return "\n".join(lines)


def gateway_configs(config: Path, scratch: Path, traffic: bool) -> dict[str, Path]:
    """The benchmark's config with the traffic log off, and (with `traffic`) on."""
    data = yaml.safe_load(config.read_text())
    variants = {"gateway": {**data, "traffic": {"enabled": False}}}
    if traffic:
        dsn = f"sqlite:///{scratch / 'traffic.db'}"
        variants["logged"] = {**data, "traffic": {"enabled": True, "dsn": dsn}}
    paths = {}
    for name, variant in variants.items():
        paths[name] = scratch / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(variant))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=files(__package__) / "gateway.yaml",
        help="gateway config: one openai model in front of the instant server",
    )
    parser.add_argument("--gateway-port", type=int, default=8100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--direct-only", action="store_true", help="skip the gateway")
    parser.add_argument(
        "--traffic", action="store_true", help="also a gateway with the traffic log on"
    )
    parser.add_argument("--out", type=Path, help="write the medians here as JSON")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed (apt-get install -y wrk)")
    backend = yaml.safe_load(args.config.read_text())["models"][0]
    instant_url, model = backend["url"].rstrip("/"), backend["name"]
    port = instant_url.rsplit(":", 1)[1]
    instant = [*INSTANT, "--port", port, "--model", backend.get("served_model") or model]
    targets = {"direct": (instant_url, backend.get("served_model") or model)}
    pids: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.enter_context(process("instant server", instant, f"{instant_url}/health", 30))
        configs = {} if args.direct_only else gateway_configs(args.config, scratch, args.traffic)
        for name, config in configs.items():
            port = args.gateway_port if name == "gateway" else free_port()
            url = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                    "--host", "127.0.0.1", "--port", str(port),
                    "--store", str(scratch / "store")]  # fmt: skip
            pids[name] = stack.enter_context(process(name, argv, f"{url}/ready", 120))
            targets[name] = (url, model)
        rows = measure(targets, pids, args)
    print(report(rows, args.concurrency))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench/overhead: error: {exc}", file=sys.stderr)
        sys.exit(1)
