"""The router: what `model: "auto"` does. It resolves a request's SLO class (header, then
`auto:<class>`, then the caller's API key, then the policy's default), detects the
request's domain, gathers each ready model's predicted quality, latency and cost, and asks
the selector. After the answer it records the observed latency, SLO attainment and the
cost saved against always sending to the teacher.

The policy file and the served models' manifests are reread by `refresh()` (the gateway
calls it every second); a request keeps the state it started with. A manifest that cannot
be read (malformed JSON, a field of the wrong type) never stops the reloading: routing keeps
that model's last good manifest, logs the problem once per version of the file and counts
it in `distillgate_registry_errors_total{model}`.

Students being rolled out (`rollouts`, set by the gateway from the adaptation loop's
state) are gated here: one in shadow or retired is never a candidate, one in canary only
for its own domain and only for its share of those requests; and a teacher-answered
request of a domain with a student in shadow or canary names it for a shadow answer.

Failover: a model whose circuit breaker (gateway/routing/breaker.py, fed by every request's
ending through `feed`) is open is not a candidate, a half-open one takes one probe at a
time; a Route keeps its decision's candidates, and `failover` gives a request whose model
failed before its first token the route to the next-best of them (`ranking`) still up.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.adapt.rollout import Rollout
from gateway.config import GatewayConfig, LocalModel
from gateway.errors import InvalidRequest, ServiceUnavailable, Unsupported
from gateway.metrics import Metrics
from gateway.routing.breaker import Breakers, Rules, outcome_of
from gateway.routing.domains import GENERAL, DomainDetector, fit_for
from gateway.routing.estimates import Estimates, cost_per_1k
from gateway.routing.gates import NO_GATES, Gates, gates_for
from gateway.routing.policy import DEFAULT_POLICY, Policy, PolicyFile, SloClass
from gateway.routing.quality import QualityTable, build_table, z_for
from gateway.routing.selector import Candidate, Decision, Slo, choose, ranking
from models.backends.base import Backend
from models.store import Manifest, ModelStore, StoreError, read_manifest

if TYPE_CHECKING:
    from gateway.api.tracking import Ending
    from law.schema import Law

log = logging.getLogger("distillgate")

AUTO = "auto"
CHARS_PER_TOKEN = 4.0  # prompt tokens estimated before tokenising, for cost and latency
HEADERS = ("x-distillgate-slo", "x-distillgate-min-quality", "x-distillgate-max-latency-ms")


def is_auto(model: str) -> bool:
    return model == AUTO or model.startswith(AUTO + ":")


@dataclass(frozen=True)
class Route:
    """One routing decision, with what is needed to report it and learn from it."""

    model: str
    slo_class: str
    reason: str
    domain: str
    confidence: float  # the domain detector's, for the domain it found most likely
    quality: float  # predicted, in the class's basis
    slo: Slo
    predicted_ttft_ms: float
    predicted_latency_ms: float
    cost: float
    teacher_cost: float
    price_per_1k: float  # the chosen model's, for the cost of the tokens it really used
    shadow: str | None = None  # a student to answer this teacher-answered request too
    # what the decision chose from, and its fallback: where a failed request goes next
    candidates: tuple[Candidate, ...] = ()
    fallback: str = "reject"
    failed_over: str | None = None  # the model that failed this request before its retry

    def headers(self) -> dict[str, str]:
        headers = {
            "x-distillgate-model": self.model,
            "x-distillgate-class": self.slo_class,
            "x-distillgate-predicted-quality": f"{self.quality:.4f}",
            "x-distillgate-route-reason": self.reason,
            "x-distillgate-domain": self.domain,
        }
        if self.failed_over is not None:
            headers["x-distillgate-failover"] = self.failed_over
        return headers


@dataclass
class _Models:
    """What routing knows about the served models, rebuilt when a manifest changes."""

    manifests: dict[str, Manifest | None]
    stamps: dict[str, float]
    table: QualityTable
    detector: DomainDetector
    detector_accuracy: float


@dataclass
class Router:
    config: GatewayConfig
    store: ModelStore
    backends: Mapping[str, Backend]
    metrics: Metrics
    policy_file: PolicyFile | None = None
    law: Law | None = None
    estimates: Estimates = field(default_factory=Estimates)
    models: _Models | None = None
    rng: random.Random = field(default_factory=random.Random)
    # model -> mtime of the bad manifest last reported, so each bad version is logged and
    # counted once however often the models are reloaded
    bad_manifests: dict[str, float] = field(default_factory=dict)
    prices: dict[str, float] = field(default_factory=dict)
    priced_for: tuple[Policy, _Models | None] | None = None
    # student -> its rollout; replaced wholesale by the gateway, never mutated in place
    rollouts: dict[str, Rollout] = field(default_factory=dict)
    gated_for: tuple[dict[str, Rollout], Gates] | None = None
    # one circuit breaker per model (gateway/routing/breaker.py), fed by every request
    breakers: Breakers = field(default_factory=Breakers)

    @classmethod
    def build(
        cls, config: GatewayConfig, store: ModelStore, backends: Mapping[str, Backend],
        metrics: Metrics,
    ) -> Router:  # fmt: skip
        """Blocking (reads files, fits the domain detector): run it off the event loop."""
        routing = config.routing
        policy_file = PolicyFile.open(routing.policy) if routing.policy else None
        law = None
        if routing.law is not None:
            from law.predict import load_law

            law = load_law(routing.law)
        router = cls(config, store, backends, metrics, policy_file, law)
        for model in config.models:  # a zero to alert on before the first error
            metrics.registry_errors.labels(model.name)
        if router.policy.seed is not None:
            router.rng.seed(router.policy.seed)
        router.models = router._load_models()
        router._watch_circuits()
        return router

    @property
    def policy(self) -> Policy:
        return self.policy_file.policy if self.policy_file else DEFAULT_POLICY

    # -- the served models ------------------------------------------------------------

    def _manifest_path(self, name: str) -> Path | None:
        model = self.config.model(name)
        if not isinstance(model, LocalModel):
            return None
        root = model.path if model.path is not None else self.store.path_for(name)
        return root / "distillgate.json"

    def _stamps(self) -> dict[str, float]:
        stamps = {}
        for m in self.config.models:
            path = self._manifest_path(m.name)
            stamps[m.name] = path.stat().st_mtime if path and path.is_file() else 0.0
        return stamps

    def _read_manifest(self, name: str, stamp: float) -> Manifest | None:
        """`name`'s manifest; when it cannot be read, the last good one (or None)."""
        path = self._manifest_path(name)
        if path is None or not stamp:
            return None
        try:
            manifest = _check_task(path, read_manifest(path))
        except (StoreError, OSError) as exc:
            if self.bad_manifests.get(name) != stamp:
                self.bad_manifests[name] = stamp
                self.metrics.registry_errors.labels(name).inc()
                log.error("routing: keeping the last good manifest of %s: %s", name, exc)
            return self.models.manifests.get(name) if self.models else None
        if self.bad_manifests.pop(name, None) is not None:
            log.info("routing: the manifest of %s is valid again", name)
        return manifest

    def _load_models(self, stamps: dict[str, float] | None = None) -> _Models:
        # Stamps first: a file that changes while it is read is read again next time.
        stamps = self._stamps() if stamps is None else stamps
        manifests = {m.name: self._read_manifest(m.name, stamps[m.name])
                     for m in self.config.models}  # fmt: skip
        tasks = sorted({mf.task for mf in manifests.values()
                        if mf is not None and mf.role == "student" and mf.task})  # fmt: skip
        detector, accuracy = fit_for(tasks) if tasks else (DomainDetector.fit([]), 1.0)
        roles = {m.name: m.role for m in self.config.models}
        table = build_table(manifests, roles, [*tasks, GENERAL], self.law)
        for name, mf in manifests.items():
            latency = mf.evaluation.latency if mf else None
            if latency is not None:
                self.estimates.prior(name, latency.ttft_ms, latency.ms_per_token_b1)
            else:
                self.estimates.prior(name, None, None)
        if tasks:
            log.info("routing: domains %s, detector held-out accuracy %.3f", tasks, accuracy)
        return _Models(manifests, stamps, table, detector, accuracy)

    def refresh(self) -> None:
        """Reread the policy and, when a manifest changed, the models (blocking). Never
        raises: the gateway's refresh loop must outlive any one bad file."""
        if self.policy_file is not None:
            self.policy_file.refresh()
        stamps = self._stamps()
        if self.models is not None and stamps == self.models.stamps:
            return
        try:
            self.models = self._load_models(stamps)
        except Exception:
            # Something beyond one manifest (a task the domain detector cannot load, say):
            # keep the last good state, and retry only when a file changes again.
            log.exception("routing: models not reloaded; keeping the last good state")
            if self.models is not None:
                self.models = dataclasses.replace(self.models, stamps=stamps)

    # -- a request ---------------------------------------------------------------------

    def _slo_class(
        self, policy: Policy, requested: str, headers: Mapping[str, str], api_key: str | None,
        key_class: str | None = None,
    ) -> tuple[str, SloClass]:  # fmt: skip
        """`api_key` is the caller's key name (gateway/auth.py; with auth.mode none, the
        bearer token), `key_class` that key's own class, which wins over the policy's."""
        name = headers.get("x-distillgate-slo")
        param = "x-distillgate-slo"
        if name is None and requested.startswith(AUTO + ":"):
            name, param = requested.split(":", 1)[1], "model"
        if name is None and key_class:
            name, param = key_class, "authorization"
        if name is None and api_key and api_key in policy.api_keys:
            name = policy.api_keys[api_key].slo_class
        name = name or policy.default_class
        if name not in policy.classes:
            known = ", ".join(sorted(policy.classes))
            raise InvalidRequest(f"Unknown SLO class '{name}'; classes: {known}.", param=param)
        slo = policy.classes[name]
        overrides: dict[str, float] = {}
        for header, key, low, high in (
            ("x-distillgate-min-quality", "min_quality", 0.0, 1.0),
            ("x-distillgate-max-latency-ms", "p95_latency_ms", 1e-9, math.inf),
        ):
            raw = headers.get(header)
            if raw is None:
                continue
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not (low <= value <= high):
                bounds = "between 0 and 1" if high == 1.0 else "a positive number of ms"
                raise InvalidRequest(f"Header {header} must be {bounds}, got {raw!r}.",
                                     param=header)  # fmt: skip
            overrides[key] = value
        return name, slo.model_copy(update=overrides) if overrides else slo

    def route(
        self, text: str, requested: str, headers: Mapping[str, str], api_key: str | None,
        max_tokens: int, *, key_class: str | None = None, needs: frozenset[str] = frozenset(),
    ) -> Route:  # fmt: skip
        policy, models = self.policy, self.models
        if models is None:
            raise ServiceUnavailable("Not ready: routing is still loading.", retry_after=5)
        class_name, slo_class = self._slo_class(policy, requested, headers, api_key, key_class)
        detection = models.detector.detect(text, policy.min_domain_confidence)
        domain = detection.domain
        relative = slo_class.quality_basis == "relative_to_teacher"
        z = z_for(slo_class.quality_interval)
        tokens = self.estimates.expected_tokens(domain, max_tokens)
        prompt_tokens = len(text) / CHARS_PER_TOKEN
        reference = models.table.reference.get(domain)
        teacher_params = self._parameters(reference) if reference else None
        gates = self._gates()
        candidates = []
        for name, backend in self._capable(needs).items():
            if gates is not NO_GATES and not gates.admits(name, domain, self.rng.random):
                continue
            price = cost_per_1k(name, policy.costs, policy.teacher_cost_per_1k_tokens,
                                self._parameters(name), teacher_params)  # fmt: skip
            model = self.config.model(name)
            slots = getattr(model, "max_batch_size", 1)
            estimate = self.estimates.latency(name, backend.load(), slots, tokens)
            candidates.append(Candidate(
                name, models.table.get(name, domain, relative, z), estimate.ttft_ms,
                estimate.latency_ms, price * (prompt_tokens + tokens) / 1000, price,
                teacher=name == reference,
            ))  # fmt: skip
        slo = Slo(slo_class.min_quality, slo_class.p95_ttft_ms, slo_class.p95_latency_ms,
                  slo_class.max_cost_per_1k_tokens)  # fmt: skip
        decision: Decision = choose(
            self._routable(candidates), slo, fallback=policy.fallback,
            exploration=policy.exploration,
            draws=(self.rng.random(), self.rng.random()),
        )  # fmt: skip
        self.metrics.domain_detections.labels(domain).inc()
        self.metrics.route_decisions.labels(decision.model or "none", class_name,
                                            decision.reason).inc()  # fmt: skip
        if decision.model is None:
            raise ServiceUnavailable(
                f"No model can serve SLO class '{class_name}' for a {domain} request: "
                f"{decision.message}."
            )
        chosen = next(c for c in candidates if c.name == decision.model)
        teacher = next((c for c in candidates if c.teacher), chosen)
        shadow = self._shadow(gates, decision.model, domain) if gates.shadows else None
        self.breakers.admit(decision.model)
        return Route(decision.model, class_name, decision.reason, domain,
                     detection.confidence, decision.quality, slo, chosen.ttft_ms,
                     chosen.latency_ms, chosen.cost, teacher.cost,
                     chosen.cost_per_1k, shadow, tuple(candidates), policy.fallback)  # fmt: skip

    def _capable(self, needs: frozenset[str]) -> Mapping[str, Backend]:
        """The served models whose cards support all `needs` (structured outputs, tool
        calling): a model that cannot honour a request is never its candidate."""
        if not needs:
            return self.backends
        capable = {n: b for n, b in self.backends.items() if needs <= b.card().supports}
        if not capable:
            raise Unsupported(
                f"No model this gateway serves supports {' and '.join(sorted(needs))}, which "
                "this request asks for (response_format / tool calling); send it without them."
            )
        return capable

    # -- failover ----------------------------------------------------------------------

    def _watch_circuits(self) -> None:
        f = self.config.failover
        rules = Rules(f.failures_to_open, f.cool_down_s, f.max_cool_down_s, f.probe_timeout_s)
        self.breakers = Breakers(rules, metrics=self.metrics)
        for model in self.config.models:
            self.breakers.watch(model.name)

    def _routable(self, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates whose circuit lets a request through. When every circuit is open,
        all of them (as Envoy's panic threshold): trying beats refusing everything."""
        breakers = self.breakers
        if not breakers.circuits:
            return candidates
        now = breakers.clock()
        return [c for c in candidates if breakers.available(c.name, now)] or candidates

    def failover(self, route: Route) -> Route | None:
        """The route of a request whose model failed before its first token: the decision's
        next-best model whose circuit lets it through, or None (nothing left to try)."""
        now, by_name = self.breakers.clock(), {c.name: c for c in route.candidates}
        pick = next((by_name[n] for n in ranking(route.candidates, route.slo, route.fallback)
                     if n != route.model and n in self.backends
                     and self.breakers.available(n, now)), None)  # fmt: skip
        if pick is None:
            return None
        self.breakers.admit(pick.name)
        self.metrics.route_decisions.labels(pick.name, route.slo_class, "failover").inc()
        return dataclasses.replace(
            route, model=pick.name, reason="failover", quality=pick.quality,
            predicted_ttft_ms=pick.ttft_ms, predicted_latency_ms=pick.latency_ms,
            cost=pick.cost, price_per_1k=pick.cost_per_1k, shadow=None, candidates=(),
            failed_over=route.model,
        )  # fmt: skip

    def feed(self, model: str, ending: Ending) -> None:
        """A request to `model` ended (routed or named): its circuit breaker learns."""
        self.breakers.watch(model)  # a student added while serving, say
        self.breakers.record(model, outcome_of(ending.status, ending.outcome))

    # -- rollouts ----------------------------------------------------------------------

    def _gates(self) -> Gates:
        """The gates of the current rollouts dict, derived once per dict (the gateway
        replaces it wholesale, so identity says whether it changed)."""
        rollouts = self.rollouts
        if not rollouts:
            return NO_GATES
        basis = self.gated_for  # holds the dict, so identity cannot be a reused id
        if basis is None or basis[0] is not rollouts:
            basis = self.gated_for = (rollouts, gates_for(rollouts))
        return basis[1]

    def _shadow(self, gates: Gates, model: str, domain: str) -> str | None:
        """The student to answer a teacher-answered request in the background, drawn with
        probability shadow_share among the served ones in shadow or canary on `domain`."""
        students = gates.shadows.get(domain)
        config = self.config.model(model)
        if not students or config is None or config.role != "teacher":
            return None
        share = self.config.adapt.rollout.shadow_share
        draw = self.rng.random()
        served = [s for s in students if s in self.backends]
        if draw >= share or not served:
            return None
        return served[min(int(draw / share * len(served)), len(served) - 1)]

    def slo_class(
        self, requested: str, headers: Mapping[str, str], api_key: str | None,
        key_class: str | None = None,
    ) -> tuple[str, SloClass] | None:  # fmt: skip
        """The class of a request that names its model (no routing): for the traffic log
        only, so a class that does not exist is no error here."""
        try:
            return self._slo_class(self.policy, requested, headers, api_key, key_class)
        except InvalidRequest:
            return None

    def price_per_1k(self, name: str) -> float:
        """`name`'s price per 1,000 tokens, kept until the policy or the models change."""
        policy, models = self.policy, self.models
        basis = self.priced_for  # held here, so identity cannot be a reused id
        if basis is None or basis[0] is not policy or basis[1] is not models:
            self.priced_for, self.prices = (policy, models), {}
        price = self.prices.get(name)
        if price is None:
            reference = models.table.reference.get(GENERAL) if models else None
            price = self.prices[name] = cost_per_1k(
                name, policy.costs, policy.teacher_cost_per_1k_tokens, self._parameters(name),
                self._parameters(reference) if reference else None,
            )  # fmt: skip
        return price

    def _parameters(self, name: str) -> int | None:
        backend = self.backends.get(name)
        if backend is not None:
            card = backend.card()
            count = card.extra.get("non_embedding_parameters") or card.parameters
            if count:
                return int(count)
        manifest = self.models.manifests.get(name) if self.models else None
        return manifest.evaluation.non_embedding_parameters if manifest else None

    def observe(self, route: Route, ending: Ending) -> None:
        """Learn from an answered request and count whether it met its class."""
        ttft_s, duration_s = ending.ttft_s, ending.duration_s
        if ending.outcome != "success" or ttft_s is None:
            return
        self.estimates.observe(route.model, route.domain, ttft_s, duration_s,
                               ending.longest_tokens)  # fmt: skip
        m = self.metrics
        slo = route.slo
        met = (slo.p95_ttft_ms is None or ttft_s * 1000 <= slo.p95_ttft_ms) and (
            slo.p95_latency_ms is None or duration_s * 1000 <= slo.p95_latency_ms
        )
        m.slo_requests.labels(route.slo_class, "met" if met else "missed").inc()
        if math.isfinite(route.predicted_latency_ms) and route.predicted_latency_ms > 0:
            m.route_latency_ratio.labels(route.model).observe(
                duration_s * 1000 / route.predicted_latency_ms
            )
        m.route_cost.labels(route.model).inc(route.cost)
        m.route_cost_saved.inc(max(route.teacher_cost - route.cost, 0.0))


def _check_task(path: Path, manifest: Manifest) -> Manifest:
    """A student's task must load: routing fits its domain detector on it, and one task
    that cannot load would stop every model's reload."""
    from models.tasks import get_task
    from models.tasks.base import TaskError

    if manifest.role == "student" and manifest.task:
        try:
            get_task(manifest.task)
        except (TaskError, OSError) as exc:
            raise StoreError(f"{path}: task: {exc}") from None
    return manifest


def request_text(messages_or_prompt: Any) -> str:
    """The text the domain detector reads: every message's content, or the prompt."""
    if isinstance(messages_or_prompt, str):
        return messages_or_prompt
    return "\n".join(str(m.get("content") or "") for m in messages_or_prompt)


def api_key_of(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None
