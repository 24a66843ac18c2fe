"""One adaptation job, from a new traffic's logged teacher answers to a registered student
in shadow: build the task (gateway/adapt/dataset.py), plan the ratio with the law, distil
with the factory, measure agreement on the most recent logged requests, gate, register
atomically, start its rollout. Every step's outcome is written to the job's row, so a
restart resumes where it stopped (the factory resumes its own phases).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.adapt.agreement import agreement
from gateway.adapt.dataset import BuiltTask, build_task
from gateway.adapt.log import TrafficLog
from gateway.adapt.plan import Budget, GateResult, Plan, gate, plan, target_of
from gateway.adapt.rollout import Rollout
from gateway.adapt.state import AdaptState, Job
from gateway.config import GatewayConfig, LocalModel
from models.store import TEACHER_NAME, Adaptation, DomainScore, Evaluation, Interval, ModelStore

if TYPE_CHECKING:
    from gateway.routing.policy import Policy, PolicyFile
    from law.schema import Law

ANSWER_TOKENS = 16
TASKS_DIR = ".tasks"
log = logging.getLogger("distillgate")


@dataclass(frozen=True)
class Teacher:
    """The teacher the traffic's answers came from, and where a student starts: the
    teacher itself when its weights are here (pruned; top-k logits available), else
    `adapt.student_base` (or the embedded SmolLM2) learning from the logged answers."""

    name: str
    local: bool
    base: str
    format: str


def teacher_of(config: GatewayConfig) -> Teacher:
    teacher = next((m for m in config.models if m.role == "teacher"), None)
    if teacher is None:
        raise ValueError("the config serves no teacher: the loop learns from a teacher's answers")
    adapt = config.adapt
    local = isinstance(teacher, LocalModel)
    if local:
        base = str(teacher.path) if teacher.path is not None else teacher.name
    else:
        base = adapt.student_base or TEACHER_NAME
    fmt = adapt.format if adapt.format != "auto" else ("logits" if local else "answers")
    return Teacher(teacher.name, local, base, fmt)


@dataclass
class Context:
    config: GatewayConfig
    store: ModelStore
    log: TrafficLog
    state: AdaptState
    law: Law | None
    policy_file: PolicyFile | None
    progress: bool = False

    @property
    def policy(self) -> Policy:
        from gateway.routing.policy import DEFAULT_POLICY

        return self.policy_file.policy if self.policy_file is not None else DEFAULT_POLICY

    @property
    def tasks_dir(self) -> Path:
        return self.store.root / TASKS_DIR

    def budget(self) -> Budget:
        a = self.config.adapt
        return Budget(a.ratios, a.default_ratio, a.max_train_minutes, a.seconds_per_example,
                      a.epochs, a.max_examples)  # fmt: skip


def student_name(job: Job, ratio: float) -> str:
    """Deterministic, so a restarted job resumes the factory's work on the same name; a
    refresh (after a degradation) is a new generation."""
    generation = int(job.record.get("generation", 0))
    return f"{job.name}-r{ratio:g}-a{job.attempt}" + (f"-g{generation}" if generation else "")


def run_job(ctx: Context, job: Job) -> Job:
    """Advance `job` as far as it goes now; returns it as stored afterwards."""
    a, state = ctx.config.adapt, ctx.state
    built = build_task(
        ctx.log, job.fingerprint, name=job.name, out_dir=ctx.tasks_dir,
        min_rows=a.min_examples, max_rows=a.max_examples,
        validation_share=a.validation_share, test_share=a.test_share,
    )  # fmt: skip
    if not isinstance(built, BuiltTask):
        reason = f"{built.found} of {built.needed} logged teacher answers with content"
        return _update(state, job, status="waiting", reason=reason,
                       record={**job.record, "wait_rows": a.min_examples})  # fmt: skip
    teacher = teacher_of(ctx.config)
    target = target_of(ctx.policy, ctx.log.classes_of(job.fingerprint))
    tried = list(job.record.get("tried", []))
    # after a failed gate only larger ratios are worth trying
    exclude = [r for r in a.ratios if tried and r <= max(tried)]
    chosen = plan(ctx.law, target, built.rows["train"], ctx.budget(), fmt=teacher.format,
                  method=a.method, schedule=a.schedule, exclude=exclude)  # fmt: skip
    record = {**job.record, "task": str(built.path), "rows": built.rows, "split": built.split,
              "target": target, "plan": chosen.as_dict(), "teacher": teacher.name,
              "base": teacher.base, "format": teacher.format}  # fmt: skip
    if chosen.verdict == "wait":
        record["wait_rows"] = min(a.max_examples, built.rows["train"] * 2)
        return _update(state, job, status="waiting", reason=chosen.reason, record=record)
    name = student_name(job, chosen.ratio)
    job = _update(state, job, status="running", student=name, record=record,
                  reason=f"training {name}: {chosen.reason}")  # fmt: skip
    log.info("adapt: job %s trains %s (%s)", job.id, name, chosen.reason)
    return _train_and_gate(ctx, job, built, chosen, teacher, target, name)


def _train_and_gate(
    ctx: Context, job: Job, built: BuiltTask, chosen: Plan, teacher: Teacher, target: float,
    name: str,
) -> Job:  # fmt: skip
    from models.distill.factory import StudentSpec, register_student, train_student

    a = ctx.config.adapt
    started = time.time()
    spec = StudentSpec(
        task=str(built.path), ratio=chosen.ratio, examples=built.rows["train"],
        format=teacher.format, method=a.method, schedule=a.schedule, pruning=a.pruning,
        teacher=teacher.base, epochs=a.epochs, targets="reference", name=name,
    )  # type: ignore[arg-type]  # fmt: skip
    trained = train_student(ctx.store, spec, progress=ctx.progress)
    result, n_test = measure(trained.model, trained.tokenizer, built.path, target,
                             ctx.config.adapt.rollout.confidence)  # fmt: skip
    attempt = {"ratio": chosen.ratio, "student": name, "gate": dict(result.as_dict()),
               "seconds": round(time.time() - started, 1)}  # fmt: skip
    record = {**job.record, "attempts": [*job.record.get("attempts", []), attempt]}
    if not result.passed:
        shutil.rmtree(trained.work, ignore_errors=True)
        return _failed_gate(ctx, job, chosen, result, record)
    adaptation = Adaptation(
        fingerprint=job.fingerprint, job=job.id, event_id=job.event_id, teacher=teacher.name,
        base=teacher.base, target=target, rows=built.rows, split=built.split,
        predicted=_interval(chosen.predicted), measured=_interval(
            (result.value, result.low, result.high)),
    )  # fmt: skip
    score = Interval(value=result.value, low=result.low, high=result.high)
    evaluation = Evaluation(in_domain={str(built.path): DomainScore(
        n=n_test, accuracy=score, agreement=score, reference_accuracy=1.0,
        retention=result.value)}, reference=teacher.name, evaluated=int(time.time()))  # fmt: skip
    # the task by its path: routing loads it to fit domain detection with the new domain
    manifest = trained.manifest.model_copy(update={
        "task": str(built.path), "adaptation": adaptation, "evaluation": evaluation,
    })  # fmt: skip
    register_student(ctx.store, replace(trained, manifest=manifest))
    return finish_registered(ctx, _update(ctx.state, job, record=record), target)


def measure(model: Any, tokenizer: Any, task_path: Path, target: float,
            confidence: float) -> tuple[GateResult, int]:  # fmt: skip
    """The student's agreement with the teacher's logged answers on the test split."""
    from models.distill.data import generate
    from models.tasks import get_task

    test = get_task(str(task_path)).examples("test")
    answers = generate(model, tokenizer, [e.messages() for e in test], ANSWER_TOKENS,
                       desc="gate")  # fmt: skip
    scores = [agreement(s, e.answer or "") for s, e in zip(answers, test, strict=True)]
    return gate(scores, target, confidence), len(test)


def finish_registered(ctx: Context, job: Job, target: float) -> Job:
    """The student is in the store: start its rollout in shadow (idempotent, so a restart
    between registering and this step completes it)."""
    assert job.student is not None
    task = job.record.get("task") or ctx.store.manifest(job.student).task
    ctx.state.start_rollout(Rollout(
        job.student, str(task), "shadow", 0.0, target, time.time(), ctx.log.last_id(),
        "registered: passed the gate",
    ))  # fmt: skip
    log.info("adapt: %s registered, in shadow", job.student)
    return _update(ctx.state, job, status="registered", reason=f"{job.student} registered")


def _failed_gate(ctx: Context, job: Job, chosen: Plan, result: GateResult,
                 record: dict[str, Any]) -> Job:  # fmt: skip
    a = ctx.config.adapt
    tried = [*record.get("tried", []), chosen.ratio]
    record["tried"] = tried
    figures = f"agreement {result.value:.3f} (low {result.low:.3f}) < target {result.target:g}"
    larger = [r for r in sorted(a.ratios) if r > chosen.ratio and r not in tried]
    if job.attempt == 0 and larger:
        reason = f"gate failed at ratio {chosen.ratio:g}: {figures}; trying ratio {larger[0]:g}"
        log.warning("adapt: job %s %s", job.id, reason)
        return _update(ctx.state, job, status="pending", attempt=1, student=None,
                       reason=reason, record=record)  # fmt: skip
    rows = record.get("rows", {}).get("train", 0)
    if rows >= a.max_examples:
        reason = f"gate failed at ratio {chosen.ratio:g}: {figures}; no more data to wait for"
        return _update(ctx.state, job, status="failed", student=None, reason=reason,
                       record=record)  # fmt: skip
    record["wait_rows"] = min(a.max_examples, max(rows * 2, a.min_examples))
    record["tried"] = []  # with more data every ratio is worth another try
    reason = f"gate failed at ratio {chosen.ratio:g}: {figures}; waiting for " \
             f"{record['wait_rows']} examples"  # fmt: skip
    log.warning("adapt: job %s %s", job.id, reason)
    return _update(ctx.state, job, status="waiting", attempt=0, student=None, reason=reason,
                   record=record)  # fmt: skip


def _interval(values: tuple[float, float, float] | None) -> Interval | None:
    if values is None:
        return None
    return Interval(value=values[0], low=values[1], high=values[2])


def _update(state: AdaptState, job: Job, **values: Any) -> Job:
    state.update_job(job.id, **values)
    stored = state.job(job.id)
    assert stored is not None
    return stored
