"""Circuit breakers, one per served model: a model whose requests keep failing is taken
out of `auto` routing for a cool-down, then let back in one probe request at a time.

closed --(failures_to_open consecutive failures)--> open --(cool-down over)--> half-open
half-open --(a success)--> closed;  half-open --(a failure)--> open, cool-down doubled
(capped at max_cool_down_s). Any success closes the circuit and resets the back-off.

The transitions are pure functions over a frozen `Circuit` and the time (`state`,
`available`, `admit`, `record`); `Breakers` keeps one Circuit per model with an injected
clock, logs and counts openings, like LiteLLM's cooldowns (3 failures -> 5 s by default) and
Envoy's outlier detection (ejection time growing with each ejection).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("distillgate")

State = Literal["closed", "half_open", "open"]
Outcome = Literal["success", "failure", "neutral"]  # neutral: says nothing about health
STATE_CODES: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}  # the gauge's values


@dataclass(frozen=True, slots=True)
class Rules:
    failures_to_open: int = 3
    cool_down_s: float = 5.0
    max_cool_down_s: float = 60.0
    # A probe that never reports back (its request lost before it was tracked) stops
    # blocking the next one after this long.
    probe_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Circuit:
    failures: int = 0  # consecutive, since the last success
    opens: int = 0  # consecutive openings, for the back-off
    until: float | None = None  # None: closed; else the end of the cool-down
    probe: float | None = None  # when the half-open probe in flight was let through


CLOSED = Circuit()


def cool_down(rules: Rules, opens: int) -> float:
    """The cool-down of the `opens`-th consecutive opening (1-based): doubling, capped."""
    return min(rules.cool_down_s * 2.0 ** max(opens - 1, 0), rules.max_cool_down_s)


def state(circuit: Circuit, now: float) -> State:
    if circuit.until is None:
        return "closed"
    return "open" if now < circuit.until else "half_open"


def available(circuit: Circuit, now: float, rules: Rules) -> bool:
    """Whether routing may send this model a request now: closed, or half-open with no
    probe in flight (or one so old it is taken for lost)."""
    match state(circuit, now):
        case "closed":
            return True
        case "open":
            return False
    return circuit.probe is None or now - circuit.probe >= rules.probe_timeout_s


def admit(circuit: Circuit, now: float) -> Circuit:
    """The circuit once routing has sent it a request: a half-open one has its probe."""
    if state(circuit, now) != "half_open":
        return circuit
    return replace(circuit, probe=now)


def record(circuit: Circuit, outcome: Outcome, now: float, rules: Rules) -> Circuit:
    """The circuit after a request to its model ended with `outcome`."""
    if outcome == "success":
        return CLOSED
    if outcome == "neutral":  # a client error or a departed client: only frees the probe
        return replace(circuit, probe=None) if circuit.probe is not None else circuit
    failures = circuit.failures + 1
    match state(circuit, now):
        case "closed" if failures < rules.failures_to_open:
            return replace(circuit, failures=failures)
        case "open":  # requests sent before it opened, ending now: the cool-down stands
            return replace(circuit, failures=failures)
    opens = circuit.opens + 1  # closed past the threshold, or the half-open probe failed
    return Circuit(failures, opens, now + cool_down(rules, opens), None)


def outcome_of(status: int, outcome: str) -> Outcome:
    """A tracked request's ending as the breaker reads it: a success, a server-side
    failure (5xx: unreachable, crashed, timed out, the remote's own 5xx), or neither
    (4xx including 429: the model answered; cancelled: the client left)."""
    if outcome == "success":
        return "success"
    return "failure" if status >= 500 else "neutral"


@dataclass
class Breakers:
    """One circuit per model; models never seen are closed. With `metrics`, each opening is
    logged and counted (distillgate_circuit_opens_total) and each watched model's state
    exported (distillgate_circuit_state, read at scrape time)."""

    rules: Rules = Rules()
    clock: Callable[[], float] = time.monotonic
    metrics: Metrics | None = None
    circuits: dict[str, Circuit] = field(default_factory=dict)  # closed ones are absent
    watched: set[str] = field(default_factory=set)

    def watch(self, model: str) -> None:
        """Export `model`'s state (and a zero count of openings to alert on)."""
        if self.metrics is None or model in self.watched:
            return
        self.watched.add(model)
        self.metrics.circuit_state.labels(model).set_function(
            lambda: STATE_CODES[self.state(model)]
        )
        self.metrics.circuit_opens.labels(model)

    def state(self, model: str) -> State:
        return state(self.circuits.get(model, CLOSED), self.clock())

    def available(self, model: str, now: float | None = None) -> bool:
        circuit = self.circuits.get(model)
        if circuit is None:  # the hot path: most models are closed most of the time
            return True
        return available(circuit, self.clock() if now is None else now, self.rules)

    def admit(self, model: str) -> None:
        """Routing sent `model` a request: a half-open circuit's probe is now taken."""
        circuit = self.circuits.get(model)
        if circuit is not None and circuit.until is not None:
            self.circuits[model] = admit(circuit, self.clock())

    def record(self, model: str, outcome: Outcome) -> None:
        before = self.circuits.get(model)
        if before is None:
            if outcome != "failure":  # the common case: a closed circuit stays closed
                return
            before = CLOSED
        now = self.clock()
        after = record(before, outcome, now, self.rules)
        if after == CLOSED:
            self.circuits.pop(model, None)
        else:
            self.circuits[model] = after
        if after.opens > before.opens and after.until is not None:
            log.warning("routing: %s is out of auto routing for %.1f s after %d failures "
                        "in a row", model, after.until - now, after.failures)  # fmt: skip
            if self.metrics is not None:
                self.metrics.circuit_opens.labels(model).inc()
