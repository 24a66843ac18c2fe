"""The rollout gates routing reads: which students in shadow, canary or retired may answer
a request, and who shadows each domain (gateway/adapt/rollout.py decides the stages)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.adapt.rollout import Rollout


@dataclass(frozen=True)
class Gates:
    """The rollouts as route() reads them, derived once per rollouts dict: who is never a
    candidate, who is one only for a share of its domain, and who shadows each domain."""

    closed: frozenset[str]  # shadow or retired
    canary: dict[str, tuple[str, float]]  # student -> (its domain, its share)
    shadows: dict[str, tuple[str, ...]]  # domain -> students in shadow or canary

    def admits(self, name: str, domain: str, draw: Callable[[], float]) -> bool:
        """Whether `name` may answer this request: never in shadow or retired; in canary
        only for its own domain, and there for its share of the requests (one `draw`)."""
        if name in self.closed:
            return False
        canary = self.canary.get(name)
        return canary is None or (canary[0] == domain and draw() < canary[1])


NO_GATES = Gates(frozenset(), {}, {})


def gates_for(rollouts: Mapping[str, Rollout]) -> Gates:
    closed = frozenset(n for n, r in rollouts.items() if r.stage in ("shadow", "retired"))
    canary = {n: (r.domain, r.share) for n, r in rollouts.items() if r.stage == "canary"}
    shadows: dict[str, list[str]] = {}
    for name in sorted(rollouts):
        rollout = rollouts[name]
        if rollout.stage in ("shadow", "canary"):
            shadows.setdefault(rollout.domain, []).append(name)
    return Gates(closed, canary, {d: tuple(names) for d, names in shadows.items()})
