"""`distillgate adapt status | promote | rollback | retire | name` on a real SQLite log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.adapt.log import TrafficLog, database_url
from gateway.adapt.rollout import Rollout
from gateway.adapt.state import AdaptState
from models.tasks import get_task
from tests.servers import cli


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    log = TrafficLog.open(database_url(None, root))
    state = AdaptState(log.engine)
    task = root / ".tasks" / "traffic-abc.jsonl"
    task.parent.mkdir(parents=True)
    rows = [{"prompt": f"ticket {i}?", "answer": "billing", "split": "train"} for i in range(4)]
    task.write_text("\n".join(json.dumps(r) for r in [{"task": {"name": "traffic-abc"}}, *rows]))
    job = state.add_job("abc", "traffic-abc", None, time.time())
    assert job is not None
    state.update_job(job.id, status="registered", student="s1", record={"task": str(task)})
    state.start_rollout(Rollout("s1", str(task), "shadow", 0.0, 0.9, time.time(), 0, "registered"))
    log.close()
    return root


def test_status_lists_jobs_students_and_transitions(store: Path) -> None:
    done = cli("adapt", "status", "--store", str(store), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [j["name"] for j in data["jobs"]] == ["traffic-abc"]
    assert data["rollouts"][0]["student"] == "s1" and data["rollouts"][0]["stage"] == "shadow"
    assert data["transitions"][0]["to"] == "shadow"
    text = cli("adapt", "status", "--store", str(store)).stdout
    assert "s1" in text and "shadow" in text and "no pairs yet" in text


def test_an_operator_promotes_rolls_back_and_retires(store: Path) -> None:
    steps = []
    for action in ("promote", "promote", "promote", "rollback", "retire"):
        done = cli("adapt", action, "s1", "--store", str(store), "--json")
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        steps.append((data["to"], data["share"]))
    assert steps == [("canary", 0.1), ("canary", 0.5), ("live", 1.0), ("shadow", 0.0),
                     ("retired", 0.0)]  # fmt: skip
    status = json.loads(cli("adapt", "status", "--store", str(store), "--json").stdout)
    reasons = [t["reason"] for t in status["transitions"]]
    assert reasons[-1] == "retired by hand" and "promoted by hand" in reasons


def test_bad_input_is_one_line(store: Path, tmp_path: Path) -> None:
    unknown = cli("adapt", "promote", "nobody", "--store", str(store))
    assert (
        unknown.returncode == 2 and "no student 'nobody' in rollout; students: s1" in unknown.stderr
    )
    cli("adapt", "promote", "s1", "--store", str(store))
    cli("adapt", "promote", "s1", "--store", str(store))
    cli("adapt", "promote", "s1", "--store", str(store))
    again = cli("adapt", "promote", "s1", "--store", str(store))
    assert again.returncode == 2 and "already live" in again.stderr
    missing = cli("adapt", "status", "--store", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no traffic log at" in missing.stderr
    assert not (tmp_path / "none").exists(), "a status never creates a log"
    for bad in (cli("adapt", "name", "1", "bad name!", "--store", str(store)),
                cli("adapt", "name", "7", "fine", "--store", str(store))):  # fmt: skip
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_name_renames_the_job_and_its_task(store: Path) -> None:
    done = cli("adapt", "name", "abc", "support-tickets-live", "--store", str(store), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "job": 1,
        "from": "traffic-abc",
        "to": "support-tickets-live",
    }
    task = get_task(str(store / ".tasks" / "traffic-abc.jsonl"))
    assert task.name == "support-tickets-live" and task.size("train") == 4
