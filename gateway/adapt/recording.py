"""The gateway's side of the traffic log: a request's `Tag` (what is known once it is
routed), the record made when it ends, and the teacher's audits of student answers. The
gateway only records; everything that reasons about the traffic runs in `distillgate
adapt`, which reads the log.

The request's path does as little as it can: a Tag of values already at hand, and, when
the request ends, one callback scheduled on the event loop; the fingerprint, the content's
JSON and the record are made in that callback, after the response has been handed over.

An audit replays a student-answered request on the teacher, in the background and only
while the teacher has spare capacity, and logs the two answers' agreement with the
request's record (which waits for the audit, seconds at most, before it is queued). A
student in canary or live is audited at least at `adapt.rollout.audit_share`.

A shadow answer replays a teacher-answered request that the router named for it on a
student in shadow or canary, in the background and only while that student is idle
enough; it is logged as a row of its own (route_reason "shadow", request id
"<id>-shadow") with its agreement with the teacher's answer. The teacher's own record is
queued at once, as for any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson

from gateway.adapt.agreement import agreement
from gateway.adapt.fingerprint import fingerprint
from gateway.adapt.records import SHADOW, TrafficRecord
from gateway.adapt.writer import TrafficWriter
from gateway.config import Audit, slots_of
from gateway.metrics import Metrics
from gateway.routing.router import Route, Router, api_key_of
from models.backends.base import Backend, GenerationRequest

if TYPE_CHECKING:
    from gateway.api.tracking import Ending

log = logging.getLogger("distillgate")


def key_hash(api_key: str | None) -> str | None:
    """A stable id for a caller's key that does not reveal it (the key is never logged)."""
    if not api_key:
        return None
    return hashlib.blake2b(api_key.encode(), digest_size=8, person=b"dg.traffic.key").hexdigest()


def content_of(request: GenerationRequest) -> str:
    """The request's content as logged: {"messages": [...]} or {"prompt": "..."}."""
    if request.messages is not None:
        return orjson.dumps({"messages": list(request.messages)}).decode()
    return orjson.dumps({"prompt": request.prompt}).decode()


@dataclass(frozen=True, slots=True)
class Tag:
    """What the log needs to know about a request before it is answered: `generation` is
    the request as the backend got it (its fingerprint and, when `log_content`, its content
    are taken from it after the answer); `audit` the request to replay on the teacher when
    it was drawn for an audit."""

    generation: GenerationRequest
    endpoint: str
    requested_model: str
    model: str
    role: str
    log_content: bool
    slo_class: str | None = None
    key_hash: str | None = None
    domain: str | None = None
    confidence: float | None = None
    route_reason: str | None = None
    price_per_1k: float | None = None
    audit: GenerationRequest | None = None
    # the request to replay on the student `shadow_model` (with `shadow_slots` slots)
    # when the router named one for a shadow answer
    shadow: GenerationRequest | None = None
    shadow_model: str | None = None
    shadow_slots: int = 1

    @property
    def keeps_text(self) -> bool:
        """Whether the answer's text is wanted (for the log, the audit or the shadow)."""
        return self.log_content or self.audit is not None or self.shadow is not None


@dataclass(frozen=True, slots=True)
class Answer:
    """A background generation's text and what its record needs."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None


class Recorder:
    """Makes each request's record and queues it on the writer; runs the audits."""

    def __init__(
        self,
        writer: TrafficWriter,
        audit: Audit,
        backends: Mapping[str, Backend],
        teacher: tuple[str, int] | None,
        metrics: Metrics,
        timeout_s: float,
        rng: random.Random | None = None,
    ) -> None:
        """`teacher` is the audits' reference model and its number of slots."""
        self.writer, self.audit, self.backends = writer, audit, backends
        self.teacher, self.metrics, self.timeout_s = teacher, metrics, timeout_s
        self.rng = rng or random.Random()
        self.audits: set[asyncio.Task[None]] = set()
        self.shadows: set[asyncio.Task[None]] = set()

    def tag(
        self,
        generation: GenerationRequest,
        *,
        endpoint: str,
        requested: str,
        model: str,
        role: str,
        route: Route | None,
        router: Router | None,
        headers: Mapping[str, str],
        caller: tuple[str, str | None] | None = None,
    ) -> Tag:
        """The Tag of a request about to run on `model`: its class and routing facts from
        `route` (model "auto"), or, for a named model, the class its headers and key give
        (`caller`: the authenticated key's name and class; else the bearer token)."""
        key = caller[0] if caller else api_key_of(headers.get("authorization"))
        key_class = caller[1] if caller else None
        known: dict[str, Any] = {"key_hash": key_hash(key)}
        log_content = False
        if router is not None:
            if route is not None:
                slo_class: str | None = route.slo_class
                known.update(
                    domain=route.domain, confidence=route.confidence,
                    route_reason=route.reason, price_per_1k=route.price_per_1k,
                )  # fmt: skip
            else:
                found = router.slo_class(requested, headers, key, key_class)
                slo_class = found[0] if found else None
                known["price_per_1k"] = router.price_per_1k(model)
            if slo_class is not None:
                known["slo_class"] = slo_class
                log_content = router.policy.classes[slo_class].log_content
        audit = None
        share = self._audit_share(model, router)
        if (
            role == "student"
            and self.teacher is not None
            and share > 0
            and self.rng.random() < share
        ):
            audit = replace(generation, request_id=f"{generation.request_id}-audit", stream=False)
        if role == "teacher" and route and route.shadow and router is not None:
            known.update(_shadow_of(generation, route.shadow, router))
        return Tag(generation, endpoint, requested, model, role, log_content, audit=audit, **known)

    def _audit_share(self, model: str, router: Router | None) -> float:
        """traffic.audit.share; for a student in canary or live, at least the rollout's
        audit_share (its promotion and rollback are decided on those pairs)."""
        if router is None:
            return self.audit.share
        rollout = router.rollouts.get(model)
        if rollout is None or rollout.stage not in ("canary", "live"):
            return self.audit.share
        return max(self.audit.share, router.config.adapt.rollout.audit_share)

    def finish(self, tag: Tag, end: Ending) -> None:
        """Record the request once the event loop is done with its response. Never raises."""
        asyncio.get_running_loop().call_soon(self._record, tag, end, time.time())

    def _record(self, tag: Tag, end: Ending, now: float) -> None:
        """Queue the request's record (after its audit, when it has one)."""
        generation = tag.generation
        source = generation.messages if generation.messages is not None else generation.prompt
        cost = None
        if tag.price_per_1k is not None:
            cost = tag.price_per_1k * (end.prompt_tokens + end.completion_tokens) / 1000
        record = TrafficRecord(
            ts=now - end.duration_s, request_id=generation.request_id,
            endpoint=tag.endpoint,  # type: ignore[arg-type]
            requested_model=tag.requested_model, model=tag.model,
            role=tag.role,  # type: ignore[arg-type]
            fingerprint=fingerprint(source or ""), outcome=end.outcome, status=end.status,
            latency_ms=end.duration_s * 1000, prompt_tokens=end.prompt_tokens,
            completion_tokens=end.completion_tokens,
            ttft_ms=None if end.ttft_s is None else end.ttft_s * 1000,
            slo_class=tag.slo_class, key_hash=tag.key_hash, domain=tag.domain,
            confidence=tag.confidence, route_reason=tag.route_reason, cost=cost,
            request=content_of(generation) if tag.log_content else None,
            response=end.text if tag.log_content else None,
        )  # fmt: skip
        if tag.shadow is not None and end.outcome == "success" and end.text is not None:
            self._start_shadow(record, tag, end.text)
        if tag.audit is not None and end.outcome == "success" and end.text is not None:
            if self._spare():
                task = asyncio.get_running_loop().create_task(
                    self._audit(record, tag.audit, end.text)
                )
                self.audits.add(task)
                task.add_done_callback(self.audits.discard)
                return
            self.metrics.audits.labels("skipped_busy").inc()
        self.writer.submit(record)

    def _spare(self) -> bool:
        """The teacher is idle enough: nothing waiting, few of its slots running."""
        assert self.teacher is not None
        name, slots = self.teacher
        backend = self.backends.get(name)
        if backend is None or len(self.audits) >= self.audit.max_in_flight:
            return False
        return self._idle(backend, slots)

    def _idle(self, backend: Backend, slots: int) -> bool:
        """Whether a background answer may run on `backend` now: nothing waiting there,
        fewer than `max_teacher_busy` of its slots running (audits and shadows alike)."""
        load = backend.load()
        return load.waiting == 0 and load.running < max(1.0, slots * self.audit.max_teacher_busy)

    async def _audit(self, record: TrafficRecord, request: GenerationRequest, text: str) -> None:
        assert self.teacher is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                reference = await _answer(self.backends[self.teacher[0]], request)
            score = agreement(text, reference)
        except asyncio.CancelledError:
            self.writer.submit(record)
            raise
        except Exception as exc:  # the teacher failing an audit is no request's failure
            self.metrics.audits.labels("failed").inc()
            log.debug("traffic: audit of %s failed: %s", record.request_id, exc)
        else:
            self.metrics.audits.labels("done").inc()
            self.metrics.audit_agreement.labels(record.model).observe(score)
            kept = reference if record.request is not None else None
            record = replace(record, agreement=score, reference=kept)
        self.writer.submit(record)

    def _start_shadow(self, record: TrafficRecord, tag: Tag, reference: str) -> None:
        """Replay the request on its shadow student when the student is idle enough."""
        name = tag.shadow_model
        assert name is not None and tag.shadow is not None
        backend = self.backends.get(name)
        if backend is None:  # unloaded since it was routed
            self.metrics.shadow_answers.labels(name, "failed").inc()
            return
        full = len(self.shadows) >= self.audit.max_in_flight
        if full or not self._idle(backend, tag.shadow_slots):
            self.metrics.shadow_answers.labels(name, "skipped_busy").inc()
            return
        task = asyncio.get_running_loop().create_task(
            self._shadow(record, tag.shadow, name, backend, reference)
        )
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)

    async def _shadow(
        self, teacher: TrafficRecord, request: GenerationRequest, name: str, backend: Backend,
        reference: str,
    ) -> None:  # fmt: skip
        """Answer `request` on the student and queue its row: the teacher's record's facts,
        the student's run, and the two answers' agreement. Cancelled: no row."""
        started, clock = time.time(), time.perf_counter()
        answer, score, status = None, None, 200
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await _generate(backend, request)
        except Exception as exc:  # the student failing a shadow answer is no request's failure
            status = 504 if isinstance(exc, TimeoutError) else 500
            self.metrics.shadow_answers.labels(name, "failed").inc()
            log.debug("traffic: shadow answer of %s by %s failed: %s", teacher.request_id,
                      name, exc)  # fmt: skip
        else:
            score = agreement(answer.text, reference)
            self.metrics.shadow_answers.labels(name, "done").inc()
            self.metrics.shadow_agreement.labels(name).observe(score)
        content = teacher.request is not None  # the class logs content
        self.writer.submit(replace(
            teacher, ts=started, request_id=request.request_id, model=name, role="student",
            outcome="success" if answer is not None else "server_error", status=status,
            latency_ms=(time.perf_counter() - clock) * 1000,
            prompt_tokens=answer.prompt_tokens if answer else 0,
            completion_tokens=answer.completion_tokens if answer else 0,
            ttft_ms=None if answer is None or answer.ttft_s is None else answer.ttft_s * 1000,
            route_reason=SHADOW, cost=None, agreement=score,
            response=answer.text if answer and content else None,
            reference=reference if content else None,
        ))  # fmt: skip

    async def close(self) -> None:
        """Cancel the audits still running (their records are queued without them) and
        the shadow answers (they leave no row)."""
        running = [*self.audits, *self.shadows]
        for task in running:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*running, return_exceptions=True)


def _shadow_of(generation: GenerationRequest, student: str, router: Router) -> dict[str, Any]:
    """The Tag fields of a shadow answer by `student`."""
    slots = slots_of(router.config.model(student))
    request = replace(generation, request_id=f"{generation.request_id}-shadow", stream=False)
    return {"shadow": request, "shadow_model": student, "shadow_slots": slots}


async def _generate(backend: Backend, request: GenerationRequest) -> Answer:
    parts: list[str] = []
    prompt = completion = 0
    ttft, clock = None, time.perf_counter()
    async with contextlib.aclosing(backend.generate(request)) as chunks:
        async for chunk in chunks:
            if ttft is None and chunk.text:
                ttft = time.perf_counter() - clock
            parts.append(chunk.text)
            prompt = chunk.prompt_tokens or prompt
            completion = chunk.completion_tokens or completion
    return Answer("".join(parts), prompt, completion, ttft)


async def _answer(backend: Backend, request: GenerationRequest) -> str:
    return (await _generate(backend, request)).text
