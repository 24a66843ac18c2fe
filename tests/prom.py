"""A throwaway Prometheus server for tests: the real `prometheus` binary on a free loopback
port, scraping the given targets every second and evaluating the given rule files every
second, its storage in a temporary directory; stopped at the end. A small client for the
parts of its HTTP API the tests read (queries, rules, targets)."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import yaml

from tests.servers import free_port
from tests.tools import require

STEP_S = 1  # scrape and rule-evaluation interval: the tests wait seconds, not minutes


def binary() -> str | None:
    return shutil.which("prometheus")


class PromError(Exception):
    """Prometheus answered a query with an error (bad PromQL, a timeout)."""


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.http = httpx.Client(base_url=f"{url}/api/v1", timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def _get(self, path: str, **params: str | float) -> dict:
        response = self.http.get(path, params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PromError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query at now: the vector's samples (`metric`, `value`)."""
        return self._get("/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """A range query: the matrix's series (`metric`, `values`)."""
        return self._get("/query_range", query=expr, start=start, end=end, step=step)["result"]

    def rule_groups(self) -> list[dict]:
        return self._get("/rules")["groups"]

    def targets(self) -> list[dict]:
        return self._get("/targets", state="active")["activeTargets"]

    def wait_up(self, jobs: Sequence[str], timeout_s: float = 30) -> None:
        """Until every job's targets have been scraped successfully."""
        deadline = time.monotonic() + timeout_s
        while True:
            health = {t["labels"]["job"]: t["health"] for t in self.targets()}
            if all(health.get(job) == "up" for job in jobs):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"targets not up after {timeout_s} s: {self.targets()}")
            time.sleep(0.5)


def has_data(series: Sequence[dict]) -> bool:
    """Whether a query's result holds at least one number (NaN is no data: a quantile of
    a histogram that observed nothing, a ratio of zero to zero)."""
    for item in series:
        samples = item["values"] if "values" in item else [item["value"]]
        if any(math.isfinite(float(v)) for _, v in samples):
            return True
    return False


def config(scrape: Mapping[str, str], rule_files: Sequence[Path]) -> dict:
    """prometheus.yml: one job per `scrape` entry (job name -> host:port, path /metrics)."""
    interval = f"{STEP_S}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in scrape.items()],
    }  # fmt: skip


@contextlib.contextmanager
def prometheus_server(
    tmp: Path, scrape: Mapping[str, str], rule_files: Sequence[Path] = ()
) -> Iterator[Prometheus]:
    """Start Prometheus scraping `scrape` (job -> host:port) with `rule_files` loaded; yield
    a client once it is ready. Skips when the binary is missing, unless $CI is set: then
    it fails, since CI must run the dashboard's queries against a real Prometheus."""
    exe = require(binary(), "prometheus", "apt-get install prometheus",
                  "test against a real Prometheus")  # fmt: skip
    work = tmp / "prometheus"
    work.mkdir()
    (work / "prometheus.yml").write_text(yaml.safe_dump(config(scrape, rule_files)))
    port = free_port()
    cmd = [
        exe, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        _wait_ready(server, 30)
        yield server
    finally:
        server.http.close()
        _stop(proc)


def _wait_ready(server: Prometheus, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {server.proc.returncode}:\n"
                               f"{server.output()}")  # fmt: skip
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"prometheus not ready after {timeout_s} s:\n{server.output()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
