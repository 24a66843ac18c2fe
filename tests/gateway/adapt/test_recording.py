"""The gateway records every request that reached a model in the traffic log (SQLite and
PostgreSQL alike): metadata always, content only for classes that log it, the whole
answer of a stream, a key only as its hash, the teacher's audit of a student's answer;
and a database that cannot be reached costs dropped records, never a failed request."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from gateway.adapt.fingerprint import fingerprint
from gateway.adapt.log import TrafficLog
from gateway.adapt.records import TrafficRecord
from tests.gateway.scripted import ScriptedBackend, scripted_app, sdk_for, wait_ready
from tests.servers import free_port

SYSTEM = {"role": "system", "content": "You label headlines."}


def records_in(url: str, count: int) -> list[TrafficRecord]:
    log = TrafficLog.open(url)
    try:
        for _ in range(100):  # the app's shutdown flushed; PostgreSQL may lag a moment
            rows = log.read(content=True)
            if len(rows) >= count:
                return [r.record for r in rows]
            time.sleep(0.05)
        return [r.record for r in log.read(content=True)]
    finally:
        log.close()


def _serve(backends: dict[str, ScriptedBackend], traffic: dict):
    return scripted_app(backends, roles={"big": "teacher"}, traffic=traffic)


def test_requests_are_recorded_with_content_by_class(log_url: str) -> None:
    big, small = ScriptedBackend("big"), ScriptedBackend("small")
    traffic = {"dsn": log_url, "flush_interval_s": 0.05, "audit": {"share": 0.0}}
    messages = [SYSTEM, {"role": "user", "content": "Headline: Acme beats estimates"}]
    with _serve({"big": big, "small": small}, traffic) as http:
        wait_ready(http)
        sdk = openai.OpenAI(
            base_url="http://testserver/v1", api_key="sk-secret", http_client=http, max_retries=0
        )
        sdk.chat.completions.create(model="big", messages=messages)
        with sdk.chat.completions.create(model="big", messages=messages, stream=True) as s:
            assert "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        sdk.completions.create(model="small", prompt="Say hi", extra_headers={
            "x-distillgate-slo": "exact"})  # fmt: skip
        big.fail_before = RuntimeError("the teacher fell over")
        with pytest.raises(openai.InternalServerError):
            sdk.chat.completions.create(model="big", messages=messages)
    rows = records_in(log_url, 4)
    assert len(rows) == 4
    plain, streamed, exact, failed = rows
    for row in (plain, streamed):
        assert (row.model, row.role, row.requested_model, row.endpoint) == (
            "big",
            "teacher",
            "big",
            "chat",
        )
        assert row.slo_class == "interactive" and row.outcome == "success" and row.status == 200
        assert row.fingerprint == fingerprint(messages)
        assert json.loads(row.request or "") == {"messages": messages}
        assert row.response == "Hello, world!"  # the whole answer, streamed or not
        assert row.completion_tokens == 4 and row.prompt_tokens == 3 and row.latency_ms > 0
        assert row.key_hash and "sk-secret" not in row.key_hash
    assert exact.slo_class == "exact" and exact.endpoint == "completions"
    assert exact.request is None and exact.response is None  # the class keeps no content
    assert exact.fingerprint == fingerprint("Say hi") and exact.role == "student"
    assert failed.outcome == "server_error" and failed.status >= 500
    assert plain.ts <= streamed.ts <= exact.ts <= failed.ts


def test_a_student_answer_is_audited_by_the_teacher(log_url: str) -> None:
    big = ScriptedBackend("big", pieces=("Acme", " beat"))
    small = ScriptedBackend("small", pieces=("Acme", " missed"))
    traffic = {"dsn": log_url, "flush_interval_s": 0.05, "audit": {"share": 1.0}}
    with _serve({"big": big, "small": small}, traffic) as http:
        wait_ready(http)
        sdk = sdk_for(http)
        sdk.chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}])
        for _ in range(200):  # the audit runs after the answer, in the background
            if len(big.seen) == 1 and big.running == 0:
                break
            time.sleep(0.01)
        metrics = http.get("/metrics").text
    [row] = records_in(log_url, 1)
    assert big.seen[0].request_id.endswith("-audit")
    assert row.model == "small" and row.response == "Acme missed"
    assert row.reference == "Acme beat" and row.agreement is not None and 0 <= row.agreement < 1
    assert 'distillgate_audits_total{outcome="done"} 1.0' in metrics


def test_an_unreachable_database_drops_records_and_fails_no_request(tmp_path: Path) -> None:
    dsn = f"postgresql://nobody@127.0.0.1:{free_port()}/none"  # nothing listens there
    big = ScriptedBackend("big")
    traffic = {"dsn": dsn, "flush_interval_s": 0.05}
    with _serve({"big": big}, traffic) as http:
        wait_ready(http)
        sdk = sdk_for(http)
        started = time.perf_counter()
        for _ in range(5):
            sdk.chat.completions.create(model="big", messages=[{"role": "user", "content": "x"}])
        assert time.perf_counter() - started < 5
        for _ in range(200):
            metrics = http.get("/metrics").text
            if 'distillgate_traffic_log_dropped_total{reason="database"} 5.0' in metrics:
                break
            time.sleep(0.05)
    assert 'distillgate_traffic_log_dropped_total{reason="database"} 5.0' in metrics
    assert 'distillgate_requests_total{endpoint="chat",model="big",outcome="success"} 5.0' in (
        metrics
    )
