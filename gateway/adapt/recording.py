"""The gateway's side of the traffic log: a request's `Tag` (what is known once it is
routed), the record made when it ends, and the teacher's audits of student answers. The
gateway only records; everything that reasons about the traffic runs in `distillgate
adapt`, which reads the log.

The request's path does as little as it can: a Tag of values already at hand, and, when
the request ends, one callback scheduled on the event loop; the fingerprint, the content's
JSON and the record are made in that callback, after the response has been handed over.

An audit replays a student-answered request on the teacher, in the background and only
while the teacher has spare capacity, and logs the two answers' agreement with the
request's record (which waits for the audit, seconds at most, before it is queued).
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
from gateway.adapt.records import TrafficRecord
from gateway.adapt.writer import TrafficWriter
from gateway.config import Audit
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

    @property
    def keeps_text(self) -> bool:
        """Whether the answer's text is wanted (for the log, or for the audit)."""
        return self.log_content or self.audit is not None


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
    ) -> Tag:
        """The Tag of a request about to run on `model`: its class and routing facts from
        `route` (model "auto"), or, for a named model, the class its headers and key give."""
        key = api_key_of(headers.get("authorization"))
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
                found = router.slo_class(requested, headers, key)
                slo_class = found[0] if found else None
                known["price_per_1k"] = router.price_per_1k(model)
            if slo_class is not None:
                known["slo_class"] = slo_class
                log_content = router.policy.classes[slo_class].log_content
        audit = None
        if (
            role == "student"
            and self.teacher is not None
            and self.audit.share > 0
            and self.rng.random() < self.audit.share
        ):
            audit = replace(generation, request_id=f"{generation.request_id}-audit", stream=False)
        return Tag(generation, endpoint, requested, model, role, log_content, audit=audit, **known)

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

    async def close(self) -> None:
        """Cancel the audits still running (their records are queued without them)."""
        for task in list(self.audits):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.audits, return_exceptions=True)


async def _answer(backend: Backend, request: GenerationRequest) -> str:
    parts = []
    async with contextlib.aclosing(backend.generate(request)) as chunks:
        async for chunk in chunks:
            parts.append(chunk.text)
    return "".join(parts)
