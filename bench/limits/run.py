"""Rate-limit accuracy: how many requests (or tokens) a key gets through in one window,
against its limit, with 4 concurrent clients, through one gateway (the limiter in the
process) and through two gateway processes sharing one Redis.

Starts the instant server (gateway/instant.py), a redis-server (Debian's `redis-server`)
when a case needs one, and `distillgate serve` processes (an `openai` backend in front of
the instant server, `auth.mode: keys`, the key table in a shared SQLite file); makes a key
with the case's limit; then 4 client threads (httpx, keep-alive, each on gateway i mod n)
send small chat completions as fast as they are answered (pausing `--pause-ms` after a
429) for 1.5 windows. It reports, from the clients' send times, what was admitted in the
first window (from the first request) and in the fullest window of the run, over the limit.

    .venv/bin/python -m bench.limits.run                          # rpm=120 and tpm, 60 s windows
    .venv/bin/python -m bench.limits.run --window 10 --repeats 3  # quicker: the limit per 10 s

`--window` sets the gateways' `limits.rate_window_s`: the key's rpm and tpm then count per
that window (the limits scale with it). Tokens are what the instant server reports (words).

(from the repo root: bench/ is a package of scripts, not part of the installed project)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from bench.overhead.run import INSTANT, BenchError, free_port, process

CLIENTS = 4
BODY = {"model": "instant", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16}  # fmt: skip


@dataclass(frozen=True)
class Case:
    kind: str  # requests | tokens
    limit: int  # per window
    gateways: int  # 1: local limiter; 2: through Redis
    window_s: float


@dataclass(frozen=True)
class Sent:
    t: float
    status: int
    tokens: int


def serve_argv(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--host",
            "127.0.0.1", "--port", str(port)]  # fmt: skip


@contextlib.contextmanager
def redis(work: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found (apt-get install redis-server)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(work)]  # fmt: skip
    with _plain_process(argv, port):  # redis speaks its own protocol, not HTTP: wait for the port
        yield f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def _plain_process(argv: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{argv[0]} did not start")
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_key(db_url: str, case: Case) -> str:
    from gateway.auth import KeyStore

    store = KeyStore.open(db_url)
    try:
        rpm, tpm = (case.limit, None) if case.kind == "requests" else (None, case.limit)
        name = f"bench-{time.monotonic_ns()}"
        return store.create(name, None, rpm, tpm, None, time.time())[1]
    finally:
        store.close()


def hammer(urls: list[str], key: str, seconds: float, pause_s: float) -> list[Sent]:
    """CLIENTS threads sending until `seconds` have passed; every request's send time,
    status and tokens used."""
    sent: list[Sent] = []
    lock = threading.Lock()
    start = time.monotonic()

    def client(i: int) -> None:
        url = f"{urls[i % len(urls)]}/v1/chat/completions"
        mine: list[Sent] = []
        with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=10) as http:
            while (t := time.monotonic()) - start < seconds:
                answer = http.post(url, json=BODY)
                used = answer.json()["usage"]["total_tokens"] if answer.status_code == 200 else 0
                mine.append(Sent(t, answer.status_code, used))
                if answer.status_code == 429:
                    time.sleep(pause_s)
                elif answer.status_code != 200:
                    raise BenchError(f"unexpected {answer.status_code}: {answer.text[:300]}")
        with lock:
            sent.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(sent, key=lambda s: s.t)


def accuracy(sent: list[Sent], kind: str, limit: int, window_s: float) -> dict:
    """Admitted (requests, or tokens used) in the first window and in the fullest one."""
    ok = [s for s in sent if s.status == 200]
    amount = (lambda s: 1) if kind == "requests" else (lambda s: s.tokens)
    t0 = sent[0].t

    def within(start: float) -> int:
        return sum(amount(s) for s in ok if start <= s.t < start + window_s)

    fullest = max((within(s.t) for s in ok), default=0)
    first = within(t0)
    return {"first_window": first, "first_ratio": first / limit, "fullest_window": fullest,
            "fullest_ratio": fullest / limit, "requests": len(sent), "admitted": len(ok),
            "refused": sum(1 for s in sent if s.status == 429)}  # fmt: skip


def run_case(case: Case, work: Path, redis_url: str | None = None, pause_s: float = 0.01) -> dict:
    """One case end to end: instant server, gateways, key, clients; its accuracy."""
    with contextlib.ExitStack() as stack:
        if case.gateways > 1 and redis_url is None:
            redis_url = stack.enter_context(redis(work))
        instant = free_port()
        stack.enter_context(process("instant", [*INSTANT, "--port", str(instant)],
                                    f"http://127.0.0.1:{instant}/health", 30))  # fmt: skip
        db = f"sqlite:///{work / f'keys-{time.monotonic_ns()}.db'}"
        key = make_key(db, case)
        limits: dict = {"queue_size": 256, "rate_window_s": case.window_s}
        if case.gateways > 1:
            limits["redis_url"] = redis_url
        config = {
            "models": [{"name": "instant", "backend": "openai", "role": "teacher",
                        "url": f"http://127.0.0.1:{instant}", "served_model": "instant"}],
            "auth": {"mode": "keys"},
            "limits": limits,
            "traffic": {"enabled": False, "dsn": db},
        }  # fmt: skip
        path = work / f"gateway-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config))
        urls = []
        for _ in range(case.gateways):
            port = free_port()
            stack.enter_context(process("gateway", serve_argv(path, port),
                                        f"http://127.0.0.1:{port}/ready", 120))  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
        sent = hammer(urls, key, case.window_s * 1.5, pause_s)
    return accuracy(sent, case.kind, case.limit, case.window_s)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--window", type=float, default=60.0, help="seconds (default 60)")
    cli.add_argument("--rpm", type=int, default=120, help="the request limit per window")
    cli.add_argument("--tpm", type=int, default=2000, help="the token limit per window")
    cli.add_argument("--repeats", type=int, default=1)
    cli.add_argument("--pause-ms", type=float, default=10.0, help="a client's pause after a 429")
    cli.add_argument("--kinds", default="requests,tokens")
    args = cli.parse_args(argv)
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dg-limits-") as tmp:
        for repeat in range(args.repeats):
            for kind in args.kinds.split(","):
                for gateways in (1, 2):
                    limit = args.rpm if kind == "requests" else args.tpm
                    case = Case(kind, limit, gateways, args.window)
                    result = run_case(case, Path(tmp), pause_s=args.pause_ms / 1000)
                    name = f"{kind} {'local' if gateways == 1 else 'redis x2'}"
                    rows.setdefault(name, []).append(result)
                    print(f"  {repeat + 1} {name:16} limit {limit:>5}: first window "
                          f"{result['first_window']:>6} ({result['first_ratio']:.3f}), fullest "
                          f"{result['fullest_window']:>6} ({result['fullest_ratio']:.3f}), "
                          f"{result['requests']} sent", flush=True)  # fmt: skip
    summary = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for name, runs in rows.items()}  # fmt: skip
    print(json.dumps({"window_s": args.window, "clients": CLIENTS, "medians": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
