"""What the traffic log holds, as plain frozen data: one `TrafficRecord` per request that
reached a backend (written by the gateway), `StoredRecord` as read back (with its row id),
and `ShiftEvent`, what a detector found, with its evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["success", "client_error", "server_error", "cancelled"]
EventKind = Literal["new_traffic", "mix_change", "degradation"]
EVENT_KINDS: tuple[EventKind, ...] = ("new_traffic", "mix_change", "degradation")
# The route_reason of a shadow answer's row: a student answered a teacher-answered request
# in the background (gateway/adapt/rollout.py); not a request of its own, so the
# detectors' traffic counts and the task built from the log skip it.
SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    """One request that reached a backend. `request` (JSON: `{"messages": [{"role",
    "content"}, ...]}` for chat, `{"prompt": "..."}` for completions) and `response` (the
    first choice's text) are set only when the request's SLO class logs content;
    `reference` is the teacher's answer when the request was audited (a student answered
    and the teacher answered too), `agreement` the two answers' agreement in [0, 1].
    Times are Unix seconds; durations milliseconds."""

    ts: float
    request_id: str
    endpoint: Literal["chat", "completions", "responses"]
    requested_model: str
    model: str
    role: Literal["teacher", "student"]
    fingerprint: str
    outcome: Outcome
    status: int
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    slo_class: str | None = None
    key_hash: str | None = None
    domain: str | None = None
    confidence: float | None = None
    route_reason: str | None = None
    cost: float | None = None
    request: str | None = None
    response: str | None = None
    reference: str | None = None
    agreement: float | None = None


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A row of the log: its id (increasing in insertion order) and its record."""

    id: int
    record: TrafficRecord


@dataclass(frozen=True)
class ShiftEvent:
    """What a detector found. `key` names what moved (a fingerprint for new_traffic, a
    domain for mix_change, "student/domain" for degradation); `at_id` is the id of the
    log row whose arrival triggered it; `evidence` is JSON-able (counts, shares, means,
    sample request ids)."""

    kind: EventKind
    key: str
    ts: float
    at_id: int
    evidence: dict[str, Any] = field(default_factory=dict)
