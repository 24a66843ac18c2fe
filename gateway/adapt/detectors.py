"""The shift detectors the adapt process runs over the traffic log, in id order: new
traffic (a template no student covers), a change in the domain mix, and a student's
agreement with the teacher dropping. Each is an update step over plain observations;
the state lives in the detector objects. Only successful requests count; a student's
shadow answer (a teacher-answered request replayed in the background) is no request and
counts nowhere: the request is counted once, by the teacher's row, and degradation is
about the answers callers got, which the audits sample.

Change detection is river's ADWIN (Bifet and Gavaldà 2007, "Learning from time-changing
data with adaptive windowing"): it keeps a window of recent values and drops its older
part when the two parts' means differ by more than a bound that holds with probability
1 - delta. ADWIN says when; where and by how much come from the least-squares change
point over the recent values (`mean_shift`), and an event needs the means before and
after it to differ by a set amount, so a tiny real change in a long stream does not
fire.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.adapt.records import SHADOW, Outcome, ShiftEvent, StoredRecord

if TYPE_CHECKING:
    from river.drift import ADWIN

# The routed domain of a request no student's task claims: gateway.routing.domains.GENERAL,
# not imported from there, since that module loads scipy and this one loads with the config.
GENERAL = "general"
SAMPLE_IDS = 20
MIX_CLOCK = 32  # ADWIN checks for a cut every this many values (river's default)
AUDIT_CLOCK = 4  # audits are sparse: check more often, so a drop is seen within a few
# How far back a change's before/after means look, and the fewest values on either side.
MIX_HISTORY, MIX_MIN_SIDE = 1000, 100
AUDIT_HISTORY, AUDIT_MIN_SIDE = 400, 10


class DetectorConfig(BaseModel):
    """Every threshold of the three detectors. Counts are in (successful) requests.

    The defaults are tuned on bench/adapt/detect.py (figures in docs/BENCHMARKS.md): 10
    uncovered requests of one template in the last 500 (2% of traffic), holding for 20
    more, find a template at 10% of traffic ~110 requests after it starts and one at 3%
    within ~320 (medians), while diverse general questions never reach it. A mix_delta of
    1e-4 keeps ADWIN quiet on 20,000 stationary requests and still sees a share double
    within ~210; audits are few, so degradation runs at delta 1e-2 and needs a drop of
    0.1 after 30 audits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int = Field(500, ge=10, le=1_000_000, description="requests in NewTraffic's window")
    min_count: int = Field(
        10, ge=1, description="uncovered requests of one fingerprint in the window"
    )
    min_share: float = Field(
        0.02, gt=0, le=1, description="their share of all requests in the window"
    )
    min_uncovered_fraction: float = Field(
        0.5, ge=0, le=1,
        description="of the fingerprint's own requests in the window, the share uncovered: "
        "a template a student serves, with a few low-confidence stragglers, is not new",
    )  # fmt: skip
    confirm: int = Field(20, ge=0, description="further requests the condition must hold for")
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="below it a routed domain counts as uncovered"
    )
    mix_delta: float = Field(1e-4, gt=0, lt=1, description="ADWIN delta for domain shares")
    mix_min_change: float = Field(
        0.05, gt=0, le=1, description="|after - before| of a domain's share to report"
    )
    degradation_delta: float = Field(1e-2, gt=0, lt=1, description="ADWIN delta for agreement")
    degradation_min_drop: float = Field(
        0.1, gt=0, le=1, description="before - after of mean agreement to report"
    )
    min_audits: int = Field(
        30, ge=1, description="audits of a (student, domain) before a drop may be reported"
    )
    cooldown: int = Field(
        2000, ge=0,
        description="requests before the same kind and key can fire again: for new_traffic "
        "counted from when its condition stopped holding (so a template that dips and comes "
        "back does not fire twice), for the others from the last event",
    )  # fmt: skip

    @model_validator(mode="after")
    def _fits_window(self) -> DetectorConfig:
        if self.min_count > self.window:
            raise ValueError(f"min_count ({self.min_count}) exceeds window ({self.window})")
        return self


@dataclass(frozen=True, slots=True)
class Observation:
    """What the detectors read of one log row."""

    id: int
    ts: float
    request_id: str
    model: str
    role: Literal["teacher", "student"]
    domain: str | None
    confidence: float | None
    fingerprint: str
    outcome: Outcome
    agreement: float | None = None
    shadow: bool = False  # a shadow answer's row, not a request


def observation(stored: StoredRecord) -> Observation:
    r = stored.record
    return Observation(
        stored.id, r.ts, r.request_id, r.model, r.role, r.domain, r.confidence,
        r.fingerprint, r.outcome, r.agreement, r.route_reason == SHADOW,
    )  # fmt: skip


def uncovered(obs: Observation, min_confidence: float) -> bool:
    """No student covers it: the teacher answered, and the router saw no confident domain."""
    if obs.role != "teacher":
        return False
    low = obs.confidence is not None and obs.confidence < min_confidence
    return obs.domain is None or obs.domain == GENERAL or low


def _adwin(delta: float, clock: int) -> ADWIN:
    from river.drift import ADWIN  # river's import takes ~1 s: only when a detector runs

    return ADWIN(delta=delta, clock=clock)


@dataclass(frozen=True, slots=True)
class Cut:
    """A mean shift: the means and sizes of the values before and after it."""

    before: float
    after: float
    n_before: int
    n_after: int


def mean_shift(values: Sequence[float], min_side: int) -> Cut | None:
    """The single change of mean that best explains `values`: the split maximising
    n1 n2 / n (m1 - m2)^2, the least-squares (Gaussian likelihood) change point, with at
    least `min_side` values on each side. None when `values` is too short."""
    n = len(values)
    if n < 2 * min_side:
        return None
    prefix = list(accumulate(values))
    total = prefix[-1]
    best, best_k = -1.0, min_side
    for k in range(min_side, n - min_side + 1):
        diff = prefix[k - 1] / k - (total - prefix[k - 1]) / (n - k)
        score = k * (n - k) * diff * diff
        if score > best:
            best, best_k = score, k
    left = prefix[best_k - 1]
    return Cut(left / best_k, (total - left) / (n - best_k), best_k, n - best_k)


def changed(adwin: ADWIN, x: float, history: deque[float], min_side: int) -> Cut | None:
    """Feed `x` to ADWIN and to `history`; when ADWIN finds a change, where it was and
    from what to what, by `mean_shift` over the history. ADWIN's own split is no good
    for that: it drops whole old buckets, so the window it keeps still holds much of
    the old regime and its mean understates the change."""
    history.append(x)
    adwin.update(x)
    return mean_shift(history, min_side) if adwin.drift_detected else None


@dataclass
class _Fired:
    below_since: int | None = None  # the request count since which its condition fails


class NewTraffic:
    """Uncovered requests grouped by fingerprint in a sliding window of all requests. A
    fingerprint fires when its uncovered count and share pass the thresholds and keep
    passing for `confirm` more requests; then again only once its condition has failed
    for a whole `cooldown` and holds anew."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.window: deque[tuple[str, bool, str]] = deque()  # (fingerprint, uncovered, id)
        self.uncovered: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.pending: dict[str, int] = {}  # fingerprint -> count when its condition began
        self.fired: dict[str, _Fired] = {}
        self.seen = 0

    def _add(self, fp: str, bare: bool, sign: int) -> None:
        for counts, counted in ((self.total, True), (self.uncovered, bare)):
            if counted:
                n = counts.get(fp, 0) + sign
                if n:
                    counts[fp] = n
                else:
                    del counts[fp]

    def holds(self, fp: str) -> bool:
        c = self.config
        count = self.uncovered.get(fp, 0)
        return (
            count >= c.min_count
            and count >= c.min_share * len(self.window)
            and count >= c.min_uncovered_fraction * self.total[fp]
        )

    def update(self, obs: Observation) -> list[ShiftEvent]:
        self.seen += 1
        bare = uncovered(obs, self.config.min_confidence)
        self.window.append((obs.fingerprint, bare, obs.request_id))
        self._add(obs.fingerprint, bare, 1)
        touched = {obs.fingerprint}  # a covered request lowers its uncovered fraction
        if len(self.window) > self.config.window:
            old_fp, old_bare, _ = self.window.popleft()
            self._add(old_fp, old_bare, -1)
            touched.add(old_fp)
        events = []
        for fp in sorted(touched | self.pending.keys()):  # sorted: events in a stable order
            if self._step(fp):
                events.append(self._event(fp, obs))
        return events

    def _step(self, fp: str) -> bool:
        """Advance `fp`'s state by one request; True when it fires now."""
        holds = self.holds(fp)
        fired = self.fired.get(fp)
        if fired is not None:
            since = fired.below_since
            if not holds:
                fired.below_since = self.seen if since is None else since
                return False
            if since is None or self.seen - since < self.config.cooldown:
                fired.below_since = None  # back before the cooldown: the same traffic
                return False
            del self.fired[fp]  # re-armed: it was gone for a whole cooldown
        if not holds:
            self.pending.pop(fp, None)
            return False
        start = self.pending.setdefault(fp, self.seen)
        if self.seen - start < self.config.confirm:
            return False
        del self.pending[fp]
        self.fired[fp] = _Fired()
        return True

    def _event(self, fp: str, obs: Observation) -> ShiftEvent:
        count = self.uncovered[fp]
        samples = [rid for f, bare, rid in reversed(self.window) if bare and f == fp]
        evidence = {
            "count": count,
            "share": count / len(self.window),
            "window": len(self.window),
            "uncovered_fraction": count / self.total[fp],
            "sample_request_ids": samples[:SAMPLE_IDS][::-1],
        }
        return ShiftEvent("new_traffic", fp, obs.ts, obs.id, evidence)


class _Cooldown:
    """When each key last fired, in requests; a key fires again only after the cooldown."""

    def __init__(self, cooldown: int) -> None:
        self.cooldown = cooldown
        self.last: dict[str, int] = {}

    def ready(self, key: str, now: int) -> bool:
        last = self.last.get(key)
        return last is None or now - last >= self.cooldown

    def mark(self, key: str, now: int) -> None:
        self.last[key] = now


class MixChange:
    """One Bernoulli stream per domain seen (1 when a request is routed to it), each
    watched by ADWIN; a domain whose share moved by mix_min_change fires."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.adwins: dict[str, tuple[ADWIN, deque[float]]] = {}
        self.cooldown = _Cooldown(config.cooldown)
        self.seen = 0

    def update(self, obs: Observation) -> list[ShiftEvent]:
        self.seen += 1
        routed = obs.domain or GENERAL
        if routed not in self.adwins:
            adwin = _adwin(self.config.mix_delta, MIX_CLOCK)
            self.adwins[routed] = (adwin, deque(maxlen=MIX_HISTORY))
        events = []
        for domain, (adwin, history) in self.adwins.items():
            x = 1.0 if domain == routed else 0.0
            cut = changed(adwin, x, history, MIX_MIN_SIDE)
            if cut is None or abs(cut.after - cut.before) < self.config.mix_min_change:
                continue
            if self.cooldown.ready(domain, self.seen):
                self.cooldown.mark(domain, self.seen)
                evidence = {"before": cut.before, "after": cut.after,
                            "n_before": cut.n_before, "n_after": cut.n_after}  # fmt: skip
                events.append(ShiftEvent("mix_change", domain, obs.ts, obs.id, evidence))
        return events


class Degradation:
    """Audited agreement per (student, domain), watched by ADWIN; a drop fires."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.adwins: dict[str, tuple[ADWIN, deque[float]]] = {}
        self.audits: dict[str, int] = {}
        self.cooldown = _Cooldown(config.cooldown)
        self.seen = 0

    def update(self, obs: Observation) -> list[ShiftEvent]:
        self.seen += 1
        if obs.agreement is None or obs.role != "student":
            return []
        key = f"{obs.model}/{obs.domain or GENERAL}"
        if key not in self.adwins:
            adwin = _adwin(self.config.degradation_delta, AUDIT_CLOCK)
            self.adwins[key] = (adwin, deque(maxlen=AUDIT_HISTORY))
        n = self.audits[key] = self.audits.get(key, 0) + 1
        adwin, history = self.adwins[key]
        cut = changed(adwin, obs.agreement, history, AUDIT_MIN_SIDE)
        c = self.config
        if cut is None or n < c.min_audits or cut.before - cut.after < c.degradation_min_drop:
            return []
        if not self.cooldown.ready(key, self.seen):
            return []
        self.cooldown.mark(key, self.seen)
        evidence: dict[str, Any] = {"before": cut.before, "after": cut.after, "n": n,
                                    "n_before": cut.n_before, "n_after": cut.n_after}  # fmt: skip
        return [ShiftEvent("degradation", key, obs.ts, obs.id, evidence)]


class Detectors:
    """The three detectors, fed one log row at a time."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.new_traffic = NewTraffic(self.config)
        self.mix_change = MixChange(self.config)
        self.degradation = Degradation(self.config)

    def update(self, obs: Observation) -> list[ShiftEvent]:
        """The events this observation triggers (none for an unsuccessful request, nor for
        a shadow answer)."""
        if obs.outcome != "success" or obs.shadow:
            return []
        return [
            *self.new_traffic.update(obs),
            *self.mix_change.update(obs),
            *self.degradation.update(obs),
        ]
