"""bench/overhead without servers: its flags, the configs it writes for each target (checked
by the gateway's own validation), LiteLLM's set-up, the process-tree CPU reading, and the
table's arithmetic (added latency, ratios to the direct backend, LiteLLM and the gateway)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from bench.overhead import litellm_proxy
from bench.overhead.procs import BenchError, cpu_seconds, descendants
from bench.overhead.run import (
    VARIANTS,
    describe,
    parse_args,
    serve_argv,
    variant_config,
    variants,
)
from bench.overhead.table import Row, comparisons, document, headline, median_row, report
from gateway.config import parse_config

BENCH_CONFIG = yaml.safe_load((files("bench.overhead") / "gateway.yaml").read_text())


def test_flags_choose_the_targets() -> None:
    assert variants(False, False, False) == ["gateway"]
    assert variants(True, True, True) == list(VARIANTS)
    assert variants(False, False, True) == ["gateway", "gateway+auth+log"]
    args = parse_args(["--full", "--litellm", "--workers", "2", "--concurrency", "1", "8"])
    assert (args.full, args.litellm, args.workers, args.concurrency) == (True, True, 2, [1, 8])
    assert args.litellm_pin == litellm_proxy.PIN and args.litellm_workers == 1


@pytest.mark.parametrize(
    "argv", [["--workers", "0"], ["--repeats", "0"], ["--duration", "0"], ["--warmup", "-1"]]
)
def test_bad_flags_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "must be" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_is_a_valid_gateway_config(name: str) -> None:
    config = parse_config(variant_config(BENCH_CONFIG, name, "sqlite:////tmp/t.db"))
    auth, log = VARIANTS[name]
    assert config.traffic.enabled is log
    assert config.traffic.dsn == "sqlite:////tmp/t.db"  # where the key lives, log or not
    assert config.auth.mode == ("keys" if auth else None)


def test_several_workers_share_the_keys_limits_through_redis() -> None:
    url = "redis://127.0.0.1:6399/0"
    keyed = parse_config(variant_config(BENCH_CONFIG, "gateway+auth+log", "sqlite:///t", url))
    assert keyed.limits.redis_url == url
    assert keyed.limits.queue_size == BENCH_CONFIG["limits"]["queue_size"]  # the rest kept
    plain = parse_config(variant_config(BENCH_CONFIG, "gateway+log", "sqlite:///t", url))
    assert plain.limits.redis_url is None
    assert "through Redis" in describe(["gateway+auth"], 2, 1, "x", redis=True)["gateway+auth"]


def test_workers_reach_serve_only_above_one() -> None:
    one = serve_argv(Path("c.yaml"), 8100, Path("store"), 1)
    assert "--workers" not in one
    assert serve_argv(Path("c.yaml"), 8100, Path("store"), 3)[-2:] == ["--workers", "3"]


def test_descriptions_say_what_is_on() -> None:
    text = describe(["direct", "gateway+auth+log", "litellm"], 2, 1, "litellm[proxy]==1.0")
    assert "2 workers" in text["gateway+auth+log"] and "traffic log on" in text["gateway+auth+log"]
    assert "litellm[proxy]==1.0" in text["litellm"] and list(text) == [
        "direct", "gateway+auth+log", "litellm"
    ]  # fmt: skip


def test_litellm_config_and_environment() -> None:
    config = litellm_proxy.config("http://127.0.0.1:8101", "instant", "sk-x")
    (model,) = config["model_list"]
    assert model["model_name"] == "instant"
    assert model["litellm_params"]["model"] == "openai/instant"
    assert model["litellm_params"]["api_base"] == "http://127.0.0.1:8101/v1"
    assert config["general_settings"]["master_key"] == "sk-x"
    assert "database_url" not in config["general_settings"]
    env = litellm_proxy.environment({"DATABASE_URL": "postgresql://x", "PATH": "/bin"})
    assert "DATABASE_URL" not in env and env["PATH"] == "/bin"
    assert env["LITELLM_LOG"] == "ERROR"
    argv = litellm_proxy.argv(Path("v/bin/litellm"), Path("c.yaml"), 4000, 1)
    assert argv[argv.index("--num_workers") + 1] == "1"


def test_litellm_venv_is_never_the_projects() -> None:
    with pytest.raises(BenchError, match="project's own environment"):
        litellm_proxy.ensure_venv(Path(sys.prefix))


def test_cpu_is_read_over_the_process_tree() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert {child.pid} <= descendants(os.getpid())
        assert cpu_seconds(child.pid) >= 0
    finally:
        child.kill()
        child.wait()


def _row(target: str, c: int, p50: float, rps: float, cpu: float | None = None) -> Row:
    return Row(target, c, p50, p50 * 2, rps, 3, cpu)


ROWS = [
    _row("direct", 1, 0.2, 5000),
    _row("gateway", 1, 0.7, 1500, 600),
    _row("gateway+auth+log", 1, 0.8, 1200, 700),
    _row("litellm", 1, 5.2, 150, 6000),
    _row("direct", 32, 3.0, 10000),
    _row("gateway", 32, 11.0, 3000, 300),
]


def test_median_row() -> None:
    runs = [{"p50_us": p, "p99_us": 10 * p, "rps": r, "cpu_us": c}
            for p, r, c in [(100, 10.0, 5.0), (300, 30.0, 7.0), (200, 20.0, 6.0)]]  # fmt: skip
    row = median_row("gateway", 32, runs)
    assert (row.p50_ms, row.p99_ms, row.rps, row.runs, row.cpu_us) == (0.2, 2.0, 20.0, 3, 6.0)
    assert median_row("direct", 1, [{"p50_us": 1, "p99_us": 2, "rps": 3}]).cpu_us is None


def test_ratios_to_direct_litellm_and_the_gateway() -> None:
    comps = {(c.target, c.concurrency): c for c in comparisons(ROWS)}
    assert ("direct", 1) not in comps
    full = comps[("gateway+auth+log", 1)]
    assert full.added_p50_ms == pytest.approx(0.6)
    assert full.added_p99_ms == pytest.approx(1.2)
    assert full.p50_x_direct == pytest.approx(4.0)
    assert full.rps_x_direct == pytest.approx(0.24)
    assert full.added_p50_x_litellm == pytest.approx(0.6 / 5.0)
    assert full.rps_x_litellm == pytest.approx(8.0)
    assert full.added_p50_us_vs_gateway == pytest.approx(100)
    assert full.rps_x_gateway == pytest.approx(0.8)
    assert full.cpu_us_vs_gateway == pytest.approx(100)
    litellm = comps[("litellm", 1)]
    assert litellm.added_p50_ms == pytest.approx(5.0) and litellm.rps_x_direct == 0.03
    assert litellm.added_p50_x_litellm is None and litellm.rps_x_gateway is None
    plain = comps[("gateway", 32)]  # no LiteLLM row at c=32: no ratio to it
    assert plain.added_p50_ms == pytest.approx(8.0) and plain.rps_x_direct == 0.3
    assert plain.rps_x_litellm is None and plain.rps_x_gateway is None


def test_a_baseline_that_added_nothing_gives_no_ratio() -> None:
    rows = [_row("direct", 1, 1.0, 100), _row("litellm", 1, 1.0, 100), _row("gateway", 1, 2, 50)]
    (gateway,) = [c for c in comparisons(rows) if c.target == "gateway"]
    assert gateway.added_p50_x_litellm is None and gateway.rps_x_litellm == 0.5


def test_report_and_document() -> None:
    assert headline(ROWS) == "gateway+auth+log"
    assert headline([_row("direct", 1, 1, 1)]) is None
    text = report(ROWS, {"gateway": "the plain one"})
    assert "- gateway: the plain one" in text
    assert "| gateway+auth+log | 1 | 0.600 | 1.200 | 4.00 | 0.240 | 0.120 | 8.00 |" in text
    assert "c=1: gateway+auth+log adds 0.600 ms at p50, 0.240 of the direct req/s" in text
    assert "c=1: gateway+auth+log vs gateway: +100 us at p50, +100 us of CPU" in text
    doc = document(ROWS, {}, {"repeats": 3})
    assert doc["headline"] == "gateway+auth+log" and len(doc["rows"]) == len(ROWS)
    assert {c["target"] for c in doc["comparisons"]} == {"gateway", "gateway+auth+log", "litellm"}
