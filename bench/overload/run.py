"""Overload: bursts of simultaneous chat requests against `distillgate serve` with the real
embedded teacher (SmolLM2-135M-Instruct, CPU), at the gateway's capacity and at `--factor`
times it, with admission control on (the default) and off (`queue`: only the teacher's own
queue refuses, as before admission control existed).

The client is a raw asyncio HTTP/1.1 client in this process: one connection per request,
all connections opened before the burst, then every request written back to back; a
request's latency runs from its write to its whole response. (An SDK client would add its
own per-request milliseconds to every figure.) Memory is the gateway process's: RSS
before the burst, after it, and its peak during it (VmHWM, reset before the burst).

    .venv/bin/python -m bench.overload.run --store var/test-store      # 3 runs per mode
    .venv/bin/python -m bench.overload.run --modes admission --runs 5 --factor 10

(from the repo root: bench/ is a package of scripts, not part of the installed project)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.overhead.run import BenchError, free_port, process
from gateway.admission import capacity_of
from gateway.config import parse_config

DISTILLGATE = [sys.executable, "-m", "gateway.cli"]
TEACHER = "smollm2-135m-instruct"
OFF = 10_000_000  # server.max_in_flight that never refuses: the teacher's queue decides


@dataclass(frozen=True)
class Answer:
    status: int  # 0: the connection failed or closed without an answer
    seconds: float


class Call(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; `send` returns the
    future of its Answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.sent = 0.0
        self.done: asyncio.Future[Answer] | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, payload: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.buffer.clear()
        self.sent = time.perf_counter()
        self.transport.write(payload)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep or self.done is None or self.done.done():
            return
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)  # fmt: skip
        if length is not None and len(body) >= length:
            self.done.set_result(Answer(int(head.split(b" ", 2)[1]), self._elapsed()))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(Answer(0, self._elapsed()))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _elapsed(self) -> float:
        return time.perf_counter() - self.sent


def request_bytes(port: int, max_tokens: int) -> bytes:
    body = json.dumps({
        "model": TEACHER, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello to the team."}],
    }).encode()  # fmt: skip
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def burst(
    port: int, n: int, payload: bytes, timeout_s: float, warm: bool = True
) -> list[Answer]:
    """`n` simultaneous requests: connect all (and, when `warm`, send one GET /health on
    each, as a load balancer's or an SDK's pooled connections have), then write every
    request back to back, then wait for every answer."""
    loop = asyncio.get_running_loop()
    connected = await asyncio.gather(
        *(loop.create_connection(Call, "127.0.0.1", port) for _ in range(n))
    )
    calls = [call for _, call in connected]
    try:
        if warm:
            probe = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            await asyncio.wait_for(asyncio.gather(*(c.send(probe) for c in calls)), timeout_s)
        futures = [call.send(payload) for call in calls]
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout_s))
    finally:
        for call in calls:
            call.close()


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(answers: list[Answer]) -> dict:
    ok = [a.seconds * 1000 for a in answers if a.status == 200]
    refused = [a.seconds * 1000 for a in answers if a.status == 429]
    return {
        "n": len(answers), "answered": len(ok), "refused_429": len(refused),
        "other": len(answers) - len(ok) - len(refused),
        "other_statuses": sorted({a.status for a in answers} - {200, 429}),
        "ok_p50_ms": statistics.median(ok) if ok else float("nan"),
        "ok_p99_ms": quantile(ok, 0.99),
        "r429_p50_ms": statistics.median(refused) if refused else float("nan"),
        "r429_p99_ms": quantile(refused, 0.99),
        "r429_max_ms": max(refused, default=float("nan")),
    }  # fmt: skip


class Memory:
    """The gateway process's resident memory: now, and its peak since `reset`."""

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.clear = Path(f"/proc/{pid}/clear_refs")

    def _field(self, name: str) -> float:
        line = next(x for x in self.status.read_text().splitlines() if x.startswith(name))
        return int(line.split()[1]) / 1024  # kB -> MiB

    def rss(self) -> float:
        return self._field("VmRSS:")

    def peak(self) -> float:
        return self._field("VmHWM:")

    def reset(self) -> None:
        self.clear.write_text("5")  # resets VmHWM to the current RSS


def one_run(port: int, capacity: int, factor: int, payload: bytes, memory: Memory) -> dict:
    at_capacity = summary(asyncio.run(burst(port, capacity, payload, 600)))
    time.sleep(1)
    before = memory.rss()
    memory.reset()
    answers = asyncio.run(burst(port, capacity * factor, payload, 600))
    over = summary(answers)
    over.update(rss_before_mib=before, rss_peak_mib=memory.peak(), rss_after_mib=memory.rss())
    over["ok_p50_ratio"] = over["ok_p50_ms"] / at_capacity["ok_p50_ms"]
    over["ok_p99_ratio"] = over["ok_p99_ms"] / at_capacity["ok_p99_ms"]
    time.sleep(1)
    return {"at_capacity": at_capacity, "over": over}


def run_floor(args: argparse.Namespace, capacity: int) -> dict:
    """The same overload bursts against bench/overload/floor.py: the 429 path's floor."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "bench.overload.floor:app", "--port", str(port),
            "--log-level", "warning", "--no-access-log"]  # fmt: skip
    with process("floor", argv, f"http://127.0.0.1:{port}/health", 60):
        payload = request_bytes(port, args.max_tokens)
        runs = [{"over": summary(asyncio.run(burst(port, capacity * args.factor, payload, 60)))}
                for _ in range(args.runs)]  # fmt: skip
    return {"capacity": capacity, "runs": runs, "median": medians(runs)}


def run_mode(mode: str, args: argparse.Namespace, tmp: Path) -> dict:
    config = {
        "models": [{"name": TEACHER, "backend": "local", "role": "teacher",
                    "max_batch_size": args.batch}],
        "limits": {"queue_size": args.queue},
        "traffic": {"enabled": False},
        "server": {"max_in_flight": OFF} if mode == "queue" else {},
    }  # fmt: skip
    capacity = capacity_of(parse_config({**config, "server": {}}))  # the same bursts in both
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [*DISTILLGATE, "serve", "--config", str(path), "--port", str(port)]
    if args.store:
        argv += ["--store", str(args.store)]
    with process(f"gateway-{mode}", argv, f"http://127.0.0.1:{port}/ready", 300) as pid:
        payload = request_bytes(port, args.max_tokens)
        asyncio.run(burst(port, args.batch, payload, 120))  # warm up
        memory = Memory(pid)
        runs = []
        for i in range(args.runs):
            runs.append(one_run(port, capacity, args.factor, payload, memory))
            print(f"{mode} run {i + 1}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    return {"capacity": capacity, "runs": runs, "median": medians(runs)}


def medians(runs: list[dict]) -> dict:
    out = {}
    for part in ("at_capacity", "over"):
        for key, value in runs[0].get(part, {}).items():
            if isinstance(value, int | float):
                out[f"{part}.{key}"] = statistics.median(r[part][key] for r in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--modes",
        default="admission,queue,floor",
        help="any of admission, queue, floor (comma-separated)",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--factor", type=int, default=10, help="the overload, times the capacity")
    p.add_argument("--batch", type=int, default=8, help="the teacher's max_batch_size")
    p.add_argument("--queue", type=int, default=64, help="limits.queue_size")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--store", type=Path, help="model store holding the converted teacher")
    p.add_argument("--out", type=Path, help="write every run's figures here as JSON")
    args = p.parse_args(argv)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for mode in args.modes.split(","):
                if mode == "floor":
                    results[mode] = run_floor(args, capacity_of(parse_config(
                        {"models": [{"name": TEACHER, "backend": "local"}],
                         "limits": {"queue_size": args.queue}})))  # fmt: skip
                else:
                    results[mode] = run_mode(mode, args, Path(tmp))
    except BenchError as exc:
        print(f"bench.overload: {exc}", file=sys.stderr)
        return 1
    for mode, result in results.items():
        print(f"\n{mode} (capacity {result['capacity']}, x{args.factor}, "
              f"medians of {args.runs} runs):")  # fmt: skip
        for key, value in result["median"].items():
            print(f"  {key:28s} {value:10.1f}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "results": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
