"""`distillgate serve --workers 2` as real processes in front of the instant server: /metrics
counts every request whichever worker answers the scrape (each worker's own share read from
its multiprocess files), a policy change reaches every worker, a killed worker is replaced
without its counts lost, and SIGTERM drains both workers and exits 0."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_shutdown import Stream, refused
from tests.servers import Server, cli_process, gateway

pytestmark = pytest.mark.slow
POLICY = {"classes": {"a": {"min_quality": 0.0}}, "default_class": "a", "fallback": "teacher"}


def config(instant: str, policy: Path, **server: float) -> dict:
    model = {"name": "m", "backend": "openai", "url": instant, "served_model": "instant",
             "role": "teacher"}  # fmt: skip
    return {"models": [model], "traffic": {"enabled": False}, "routing": {"policy": str(policy)},
            "server": {"workers": 2, **server}}  # fmt: skip


def workers(server: Server) -> tuple[list[int], Path]:
    """The workers' pids and the metrics directory, from the parent's start-up line."""
    text = server.log.read_text(errors="replace")
    line = r"serving with 2 workers \(pids (\d+), (\d+)\); metrics merged in (\S+)"
    found = re.search(line, text)
    assert found, text[-2000:]
    return [int(found[1]), int(found[2])], Path(found[3])


def scrape(server: Server) -> dict[str, dict[tuple, float]]:
    """/metrics on a fresh connection (any worker may answer): {sample: {labels: value}}."""
    text = httpx.get(f"{server.url}/metrics", headers={"connection": "close"}, timeout=5).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def own_count(where: Path, pid: int, sample: str, **labels: str) -> float:
    """One worker's own count of `sample`, from its file in the multiprocess directory."""
    families = MultiProcessCollector.merge([str(where / f"counter_{pid}.db")], accumulate=False)
    return sum(s.value for f in families for s in f.samples
               if s.name == sample and labels.items() <= s.labels.items())  # fmt: skip


def chat(server: Server, model: str = "m") -> openai.types.chat.ChatCompletion:
    """One request on its own connection, so that either worker may take it."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as sdk:
        return sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])


def requests_total(metrics: dict) -> float:
    return sum(metrics.get("distillgate_requests_total", {}).values())


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, instant: str) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("workers")
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    with gateway(config(instant, policy), tmp) as server:
        yield server, policy


def test_metrics_count_every_request_whichever_worker_answers(two: tuple[Server, Path]) -> None:
    server, _ = two
    (a, b), where = workers(server)
    before = requests_total(scrape(server))
    k = 40
    for _ in range(k):
        assert chat(server).choices[0].message.content
    for _ in range(6):  # each scrape may be answered by either worker: the same sums
        metrics = scrape(server)
        assert requests_total(metrics) == before + k
        assert metrics["distillgate_model_ready"] == {(("model", "m"),): 1.0}
        assert list(metrics["distillgate_build_info"].values()) == [1.0]  # one series, no pid
        # each worker admits its own capacity (the remote model's 256 + queue 64)
        assert metrics["distillgate_admission_capacity"] == {(): 2 * 320.0}
        assert metrics["distillgate_requests_in_flight"] == {(("model", "m"),): 0.0}
    served = [own_count(where, pid, "distillgate_requests_total") for pid in (a, b)]
    assert all(n > 0 for n in served), served  # both workers answered requests
    assert sum(served) == before + k


def test_a_policy_change_reaches_every_worker(two: tuple[Server, Path]) -> None:
    server, policy = two
    (a, b), where = workers(server)
    for _ in range(4):
        with pytest.raises(openai.BadRequestError, match="Unknown SLO class 'b'"):
            chat(server, "auto:b")
    classes = {**POLICY["classes"], "b": {"min_quality": 0.0}}
    policy.write_text(yaml.safe_dump({**POLICY, "classes": classes}))
    deadline, streak = time.monotonic() + 20, 0
    while streak < 10:  # the routers reread it within a second or two
        assert time.monotonic() < deadline, "the new class did not reach every worker"
        try:
            chat(server, "auto:b")
            streak += 1
        except openai.BadRequestError:
            streak = 0
            time.sleep(0.2)
    for _ in range(30):
        assert chat(server, "auto:b").choices[0].message.content
    decided = [own_count(where, p, "distillgate_route_decisions_total", slo_class="b")
               for p in (a, b)]  # fmt: skip
    assert all(n > 0 for n in decided), decided  # both routers know class b


def test_a_killed_worker_is_replaced_and_its_counts_stay(tmp_path: Path, instant: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    with gateway(config(instant, policy), tmp_path) as server:
        (a, _), where = workers(server)
        for _ in range(20):
            chat(server)
        assert requests_total(scrape(server)) == 20
        os.kill(a, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while f"worker {a} exited with -9; worker" not in server.log.read_text():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert not list(where.glob(f"gauge_live*_{a}.db"))  # its live gauges left the sums
        assert not (where / f"ready-{a}").exists()
        server.wait_ready(60)  # /ready: 200 once the replacement has its models too
        for _ in range(20):
            chat(server)
        assert requests_total(scrape(server)) == 40  # the dead worker's count kept
        assert server.stop() == 0
        assert not where.exists()  # the metrics directory is removed at exit


def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path, instant: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    with gateway(config(instant, policy, drain_s=1.5, shutdown_timeout_s=10), tmp_path) as server:
        (a, b), where = workers(server)
        streams = [Stream(server.url, chunks=20).start() for _ in range(4)]  # 2 s each
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for _ in range(4):  # whichever worker answers, it is draining
            ready = httpx.get(f"{server.url}/ready", headers={"connection": "close"}, timeout=2)
            assert ready.status_code == 503, ready.text
        assert time.monotonic() - signalled < 1.0
        while not refused(server.url):
            assert time.monotonic() - signalled < 4, "the port stayed open past the drain"
            time.sleep(0.05)
        assert time.monotonic() - signalled >= 1.4  # not before drain_s
        for stream in streams:
            stream.join()
            assert stream.error is None, stream.error
            assert (stream.received, stream.finish_reason) == (20, "stop")
        assert server.proc.wait(timeout=15) == 0, server.output()
        for pid in (a, b):
            assert server.log.read_text().count(f"Finished server process [{pid}]") == 1
        assert not where.exists()


def test_a_model_that_cannot_load_stops_every_worker_with_1(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    local = {"name": "m", "backend": "local", "path": str(tmp_path / "nowhere")}
    path.write_text(yaml.safe_dump({"models": [local], "server": {"workers": 2}}))
    out = cli_process("serve", "--config", str(path), "--port", "0", timeout=90)
    assert out.returncode == 1, out.stderr
    assert "distillgate: warning: --workers 2: every worker loads its own copy of m" in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("distillgate: error:")]
    assert errors and all("model 'm'" in e and "nowhere" in e for e in errors), out.stderr
