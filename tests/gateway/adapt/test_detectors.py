"""The shift detectors on constructed streams: each fires when it should, stays quiet when
it should not, respects confirm and cooldown; the config's validation; the cheap import."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterable

import pytest
from pydantic import ValidationError

from gateway.adapt.detectors import (
    DetectorConfig,
    Detectors,
    MixChange,
    NewTraffic,
    Observation,
    mean_shift,
    observation,
)
from gateway.adapt.records import ShiftEvent, StoredRecord, TrafficRecord

NEW = "f00dfeedf00dfeed"


class Traffic:
    """Numbered observations, built the way the gateway would log them."""

    def __init__(self) -> None:
        self.i = 0

    def __call__(
        self, fp: str = "", *, role: str = "teacher", domain: str | None = "general",
        confidence: float | None = 0.3, model: str = "", outcome: str = "success",
        agreement: float | None = None,
    ) -> Observation:  # fmt: skip
        self.i += 1
        model = model or ("teacher" if role == "teacher" else f"student-{domain}")
        return Observation(self.i, float(self.i), f"r{self.i}", model, role, domain,
                           confidence, fp or f"q{self.i}", outcome, agreement)  # fmt: skip

    def student(self, domain: str = "finance", agreement: float | None = None) -> Observation:
        return self(f"fp-{domain}", role="student", domain=domain, confidence=0.99,
                    agreement=agreement)  # fmt: skip


def feed(detector: Detectors | NewTraffic | MixChange, stream: Iterable[Observation]
         ) -> list[ShiftEvent]:  # fmt: skip
    return [e for obs in stream for e in detector.update(obs)]


def mixed(t: Traffic, rng: random.Random, n: int, new_share: float = 0.0,
          new: Observation | None = None) -> list[Observation]:  # fmt: skip
    """Students' traffic plus distinct general questions; `new_share` of uncovered
    requests of one template (`NEW`, or a copy of `new`'s fields)."""
    out = []
    for _ in range(n):
        draw = rng.random()
        if draw < new_share:
            out.append(t(NEW) if new is None else t(NEW, role=new.role, domain=new.domain,
                                                   confidence=new.confidence))  # fmt: skip
        elif draw < 0.5 + new_share / 2:
            out.append(t.student("finance" if rng.random() < 0.6 else "support"))
        else:
            out.append(t())  # a bare question: its own fingerprint
    return out


# --- config -------------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    c = DetectorConfig()
    assert c.window == 500 and c.min_confidence == 0.5 and c.min_count <= c.window
    bad: dict[str, float]
    for bad in ({"window": 0}, {"min_share": 1.5}, {"mix_delta": 0}, {"confirm": -1},
                {"window": 20, "min_count": 30}, {"degradation_min_drop": 2},
                {"typo": 1}):  # fmt: skip
        with pytest.raises(ValidationError):
            DetectorConfig(**bad)
    with pytest.raises(ValidationError):
        c.window = 10  # type: ignore[misc]  # frozen


def test_observation_reads_a_stored_record() -> None:
    record = TrafficRecord(
        ts=5.0, request_id="abc", endpoint="chat", requested_model="auto", model="s1",
        role="student", fingerprint="0123456789abcdef", outcome="success", status=200,
        latency_ms=12.0, domain="finance", confidence=0.9, agreement=0.75,
    )  # fmt: skip
    assert observation(StoredRecord(7, record)) == Observation(
        7, 5.0, "abc", "s1", "student", "finance", 0.9, "0123456789abcdef", "success", 0.75
    )


def test_importing_the_detectors_does_not_import_river() -> None:
    code = "import sys, gateway.adapt.detectors; print('river' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# --- new traffic --------------------------------------------------------------------------

SMALL = DetectorConfig(window=200, min_count=8, min_share=0.02, confirm=10, cooldown=300)


def test_new_traffic_fires_for_an_uncovered_template() -> None:
    t, rng = Traffic(), random.Random(0)
    detector = NewTraffic(SMALL)
    assert feed(detector, mixed(t, rng, 600)) == []
    switch = t.i
    events = feed(detector, mixed(t, rng, 400, new_share=0.15))
    assert [e.key for e in events] == [NEW]
    event = events[0]
    assert event.kind == "new_traffic" and event.at_id > switch + SMALL.confirm
    ev = event.evidence
    assert ev["count"] >= SMALL.min_count and ev["share"] >= SMALL.min_share
    assert ev["window"] == SMALL.window and ev["uncovered_fraction"] == 1.0
    assert 0 < len(ev["sample_request_ids"]) <= 20
    assert len(set(ev["sample_request_ids"])) == len(ev["sample_request_ids"])


@pytest.mark.parametrize(
    ("role", "domain", "confidence", "fires"),
    [
        ("teacher", "general", 0.3, True),
        ("teacher", None, None, True),  # no domain detected at all
        ("teacher", "finance", 0.3, True),  # a domain, but below min_confidence
        ("teacher", "finance", 0.9, False),  # a student's domain: covered (the SLO chose)
        ("student", "finance", 0.9, False),
    ],
)
def test_what_counts_as_uncovered(
    role: str, domain: str | None, confidence: float | None, fires: bool
) -> None:
    t, rng = Traffic(), random.Random(1)
    new = Observation(0, 0, "", "", role, domain, confidence, NEW, "success")
    events = feed(NewTraffic(SMALL), mixed(t, rng, 600, new_share=0.2, new=new))
    assert [e.key for e in events] == ([NEW] if fires else [])


def test_a_template_a_student_mostly_serves_is_not_new() -> None:
    """Low-confidence stragglers of a student's template (10% of it, 5% of traffic)."""
    t, rng = Traffic(), random.Random(2)
    stream = [t("fp-finance", confidence=0.4) if rng.random() < 0.1 else o
              for o in mixed(t, rng, 2000)]  # fmt: skip
    assert all(e.key != "fp-finance" for e in feed(NewTraffic(SMALL), stream))
    lenient = SMALL.model_copy(update={"min_uncovered_fraction": 0.0})
    t2, rng2 = Traffic(), random.Random(2)
    stream = [t2("fp-finance", confidence=0.4) if rng2.random() < 0.1 else o
              for o in mixed(t2, rng2, 2000)]  # fmt: skip
    assert any(e.key == "fp-finance" for e in feed(NewTraffic(lenient), stream))


def test_failed_requests_do_not_count() -> None:
    t, rng = Traffic(), random.Random(3)
    stream = [t(NEW, outcome="server_error") if rng.random() < 0.2 else t() for _ in range(800)]
    assert feed(Detectors(SMALL), stream) == []


def test_a_burst_shorter_than_confirm_does_not_fire() -> None:
    config = DetectorConfig(window=20, min_count=5, min_share=0.05, confirm=30)
    t = Traffic()
    burst = [t() for _ in range(50)] + [t(NEW) for _ in range(5)] + [t() for _ in range(60)]
    assert feed(NewTraffic(config), burst) == []
    t = Traffic()
    burst = [t() for _ in range(50)] + [t(NEW) for _ in range(5)] + [t() for _ in range(60)]
    quick = config.model_copy(update={"confirm": 10})
    assert [e.at_id for e in feed(NewTraffic(quick), burst)] == [55 + 10]


def test_fires_once_then_again_only_after_being_gone_for_the_cooldown() -> None:
    t, rng = Traffic(), random.Random(4)
    detector = NewTraffic(SMALL)  # window 200, cooldown 300
    assert len(feed(detector, mixed(t, rng, 1500, new_share=0.2))) == 1  # holds: once
    assert feed(detector, mixed(t, rng, 250)) == []  # gone for less than the cooldown
    assert feed(detector, mixed(t, rng, 100, new_share=0.2)) == []  # so back: no event
    assert feed(detector, mixed(t, rng, 600)) == []  # gone for longer
    events = feed(detector, mixed(t, rng, 400, new_share=0.2))
    assert [e.key for e in events] == [NEW]


def test_diverse_uncovered_questions_never_fire() -> None:
    t, rng = Traffic(), random.Random(5)
    assert feed(NewTraffic(DetectorConfig()), mixed(t, rng, 5000)) == []


# --- mix change ---------------------------------------------------------------------------


def domains(t: Traffic, rng: random.Random, n: int, shares: dict[str | None, float]
            ) -> list[Observation]:  # fmt: skip
    names, weights = list(shares), list(shares.values())
    return [t.student(d) if d not in (None, "general") else t(domain=d)
            for d in rng.choices(names, weights, k=n)]  # fmt: skip


def test_mix_change_reports_which_domain_moved_and_how_far() -> None:
    t, rng = Traffic(), random.Random(6)
    detector = MixChange(DetectorConfig())
    before = {"finance": 0.5, "support": 0.2, "general": 0.3}
    assert feed(detector, domains(t, rng, 3000, before)) == []
    switch = t.i
    after = {"finance": 0.35, "support": 0.5, "general": 0.15}
    events = [e for e in feed(detector, domains(t, rng, 800, after)) if e.key == "support"]
    assert len(events) == 1 and events[0].kind == "mix_change"
    assert 0 < events[0].at_id - switch <= 500
    ev = events[0].evidence
    assert ev["before"] == pytest.approx(0.2, abs=0.06)
    assert ev["after"] == pytest.approx(0.5, abs=0.1)
    assert ev["n_before"] >= 100 and ev["n_after"] >= 100


def test_mix_is_quiet_on_a_stationary_stream() -> None:
    t, rng = Traffic(), random.Random(7)
    shares = {"finance": 0.4, "support": 0.2, None: 0.4}  # None counts as general
    detector = MixChange(DetectorConfig())
    assert feed(detector, domains(t, rng, 20_000, shares)) == []
    assert set(detector.adwins) == {"finance", "support", "general"}


def test_a_small_real_change_is_below_mix_min_change() -> None:
    t, rng = Traffic(), random.Random(8)
    config = DetectorConfig(mix_min_change=0.2)
    stream = domains(t, rng, 3000, {"finance": 0.5, "general": 0.5})
    stream += domains(t, rng, 2000, {"finance": 0.65, "general": 0.35})
    assert feed(MixChange(config), stream) == []
    t, rng = Traffic(), random.Random(8)
    stream = domains(t, rng, 3000, {"finance": 0.5, "general": 0.5})
    stream += domains(t, rng, 2000, {"finance": 0.65, "general": 0.35})
    assert {e.key for e in feed(MixChange(DetectorConfig()), stream)} == {"finance", "general"}


# --- degradation --------------------------------------------------------------------------


def audited(t: Traffic, rng: random.Random, n: int, accuracy: float, share: float = 0.5
            ) -> list[Observation]:  # fmt: skip
    """Student requests, `share` of them audited: agreement 1 with `accuracy`, else 0."""
    return [t.student(agreement=float(rng.random() < accuracy) if rng.random() < share
                      else None) for _ in range(n)]  # fmt: skip


def test_degradation_fires_on_a_drop() -> None:
    t, rng = Traffic(), random.Random(9)
    detectors = Detectors()
    assert feed(detectors, audited(t, rng, 1000, 0.9)) == []
    events = feed(detectors, audited(t, rng, 600, 0.5))
    assert [(e.kind, e.key) for e in events] == [("degradation", "student-finance/finance")]
    ev = events[0].evidence
    assert ev["before"] - ev["after"] >= 0.1 and ev["n"] >= DetectorConfig().min_audits
    assert ev["before"] == pytest.approx(0.9, abs=0.06)
    assert ev["after"] == pytest.approx(0.5, abs=0.2)  # from ~20-50 audits after the drop


def test_degradation_ignores_rises_teachers_and_a_stationary_stream() -> None:
    t, rng = Traffic(), random.Random(10)
    stream = audited(t, rng, 1000, 0.5) + audited(t, rng, 7000, 0.9)  # better: no event
    stream += [t(agreement=0.0) for _ in range(300)]  # teacher rows are never audits
    assert [e for e in feed(Detectors(), stream) if e.kind == "degradation"] == []


def test_degradation_waits_for_min_audits() -> None:
    config = DetectorConfig(min_audits=200)
    t, rng = Traffic(), random.Random(11)
    stream = audited(t, rng, 80, 0.95, share=1.0) + audited(t, rng, 60, 0.2, share=1.0)
    assert feed(Detectors(config), stream) == []
    t, rng = Traffic(), random.Random(11)
    stream = audited(t, rng, 80, 0.95, share=1.0) + audited(t, rng, 60, 0.2, share=1.0)
    assert [e.kind for e in feed(Detectors(), stream)] == ["degradation"]


# --- the change point ---------------------------------------------------------------------


def test_mean_shift_finds_the_split() -> None:
    cut = mean_shift([0.0] * 30 + [1.0] * 12, min_side=5)
    assert cut is not None
    assert (cut.before, cut.after, cut.n_before, cut.n_after) == (0.0, 1.0, 30, 12)
    assert mean_shift([1.0] * 9, min_side=5) is None
    edge = mean_shift([0.0] * 40 + [1.0] * 2, min_side=5)  # too near the end to place
    assert edge is not None and edge.n_after == 5


def test_general_is_the_routers_general() -> None:
    from gateway.adapt import detectors
    from gateway.routing import domains

    assert detectors.GENERAL == domains.GENERAL
