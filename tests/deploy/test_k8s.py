"""The Kubernetes manifests (deploy/k8s): every kustomization renders with the real
`kubectl kustomize`, validates strictly against Kubernetes' own schemas
(kubernetes-validate), and says what matters: probes, drain, non-root, objects that exist,
a config that loads as mounted, monitoring that selects what it should, a GPU where
promised. CRDs (ServiceMonitor, PrometheusRule) are checked by hand and with promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from gateway.cli import parser
from gateway.config import GatewayConfig, load_config, parse_config
from gateway.routing.policy import load_policy
from tests.tools import require

pytestmark = pytest.mark.slow  # kubectl and kubernetes-validate, dozens of runs

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
TARGETS = ("base", "overlays/cpu", "overlays/gpu-vllm")
OVERLAYS = TARGETS[1:]
# The oldest Kubernetes these manifests are for (the preStop `sleep` action is on by
# default from 1.30) and the newest kubernetes-validate knows.
VERSIONS = ("1.30", "1.37")
CRDS = {"monitoring.coreos.com/v1": {"ServiceMonitor", "PrometheusRule"}}
# Prometheus jobs are the Services' names; deploy/prometheus/alerts.yml uses the first two.
JOBS = {"distillgate", "distillgate-adapt"}
# Containers allowed a writable root: vLLM's kernel caches land in too many places.
WRITABLE_ROOT = {("distillgate-vllm", "vllm")}
# Secrets an overlay supplies; base alone is not meant to be applied.
OVERLAY_SECRETS = {"distillgate-traffic"}
DSN_ENV = "DISTILLGATE_TRAFFIC_DSN"

Docs = list[dict]


def _binary(name: str, install: str) -> str:
    return require(shutil.which(name), f"`{name}`", install, "check the Kubernetes manifests")


@pytest.fixture(scope="module")
def render() -> Callable[[str], Docs]:
    """`render(target)`: the objects `kubectl kustomize deploy/k8s/<target>` prints."""
    kubectl = _binary("kubectl", "apt-get install kubectl")
    cache: dict[str, Docs] = {}

    def get(target: str) -> Docs:
        if target not in cache:
            done = subprocess.run(
                [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, f"kubectl kustomize {target}:\n{done.stderr}"
            cache[target] = [d for d in yaml.safe_load_all(done.stdout) if d]
        return cache[target]

    return get


def _one(docs: Docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _names(docs: Docs, kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in docs if d["kind"] == kind}


def _pods(docs: Docs) -> Iterator[tuple[str, dict]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def _container(docs: Docs, workload: str, name: str) -> dict:
    pod = _one(docs, "Deployment", workload)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def _port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly(render, target: str, version: str) -> None:
    problems = []
    for doc in render(target):
        if doc["kind"] in CRDS.get(doc["apiVersion"], ()):
            continue  # no schema here: checked by the tests below
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    assert problems == []


@pytest.mark.parametrize("target", TARGETS)
def test_everything_lands_in_one_namespace(render, target: str) -> None:
    """Services are found by short names (the DSN's host, the vLLM URL): one namespace."""
    spaces = {d["metadata"].get("namespace") for d in render(target) if d["kind"] != "Namespace"}
    assert spaces == {"distillgate"}
    assert _names(render(target), "Namespace") == {"distillgate"}


def test_strict_validation_catches_a_misspelt_field(render) -> None:
    """The validation above can fail: a typo in a probe is rejected, not ignored."""
    deployment = json.loads(json.dumps(_one(render("base"), "Deployment", "distillgate")))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["pth"] = probe["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_probes_drain_and_command(render, target: str) -> None:
    docs = render(target)
    pod = _one(docs, "Deployment", "distillgate")["spec"]["template"]["spec"]
    gateway = _container(docs, "distillgate", "gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = gateway["startupProbe"]
    # the first start converts the teacher (~30-60 s): room for several times that
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    args = parser().parse_args(gateway["args"])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", _port(gateway, "http"))
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and "gateway.yaml" in d["data"]]
    served = parse_config(yaml.safe_load(configmap["data"]["gateway.yaml"])).server
    drain = served.drain_s + served.shutdown_timeout_s  # what the mounted config sets
    drain = served.drain_s + served.shutdown_timeout_s
    sleep = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= 3, "endpoints need a moment to drop the pod before uvicorn stops"
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 5  # + the last flush


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_runs_as_non_root_without_capabilities(render, target: str) -> None:
    for workload, pod in _pods(render(target)):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, workload
        assert pod.get("automountServiceAccountToken") is False, workload
        mounts_of = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc, where = c["securityContext"], f"{workload}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert c["resources"]["requests"]["memory"], where
            if (workload, c["name"]) in WRITABLE_ROOT:
                continue
            assert sc["readOnlyRootFilesystem"] is True, where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            if c["image"].startswith("distillgate:"):  # torch and transformers need a /tmp
                assert tmp and "emptyDir" in mounts_of[tmp[0]["name"]], where


def _references(pod: dict) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key) of every ConfigMap, Secret and PVC a pod spec uses."""
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"], None
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"], None
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None
        for source in volume.get("projected", {}).get("sources", []):
            for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if field in source:
                    yield kind, source[field]["name"], None
    for c in pod.get("initContainers", []) + pod["containers"]:
        for env in c.get("env", []):
            for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if field in env.get("valueFrom", {}):
                    ref = env["valueFrom"][field]
                    yield kind, ref["name"], ref["key"]
        for env in c.get("envFrom", []):
            for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if field in env:
                    yield kind, env[field]["name"], None


@pytest.mark.parametrize("target", TARGETS)
def test_every_referenced_configmap_secret_and_claim_exists(render, target: str) -> None:
    docs = render(target)
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    missing = []
    for workload, pod in _pods(docs):
        for kind, name, key in _references(pod):
            if target == "base" and kind == "Secret" and name in OVERLAY_SECRETS:
                continue
            obj = objects.get((kind, name))
            if obj is None:
                missing.append(f"{workload}: {kind} {name}")
            elif key is not None and key not in {
                **obj.get("data", {}),
                **obj.get("stringData", {}),
            }:
                missing.append(f"{workload}: {kind} {name} has no key {key}")
    assert missing == []


def _keys(obj: dict) -> set[str]:
    return {*obj.get("data", {}), *obj.get("stringData", {})}


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_and_adapt_share_the_log_the_store_and_the_config(render, target: str) -> None:
    docs = render(target)
    gateway = _container(docs, "distillgate", "gateway")
    adapt = _container(docs, "distillgate-adapt", "adapt")
    args = parser().parse_args(adapt["args"])
    assert (args.command, args.action, args.once) == ("adapt", "run", False)
    assert args.config == parser().parse_args(gateway["args"]).config
    for c in (gateway, adapt):
        assert _env(c)[DSN_ENV]["valueFrom"]["secretKeyRef"] == {
            "name": "distillgate-traffic", "key": DSN_ENV,
        }  # fmt: skip
    claims = {}
    for workload, container in (("distillgate", gateway), ("distillgate-adapt", adapt)):
        pod = _one(docs, "Deployment", workload)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        store = _env(container)["DISTILLGATE_STORE"]["value"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == store)
        claims[workload] = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claims["distillgate"] == claims["distillgate-adapt"]


def _mounted_config(docs: Docs, workload: str, container: dict, root: Path) -> Path:
    """Write the ConfigMaps of the container's config volume as the kubelet would mount
    them (under `root`); return the config file's path there."""
    pod = _one(docs, "Deployment", workload)["spec"]["template"]["spec"]
    config = Path(parser().parse_args(container["args"]).config)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    target = root / config.parent.relative_to("/")
    target.mkdir(parents=True)
    for source in volume["projected"]["sources"]:
        for key, text in _one(docs, "ConfigMap", source["configMap"]["name"])["data"].items():
            assert not (target / key).exists(), f"{key} is in two ConfigMaps of {workload}"
            (target / key).write_text(text)
    return target / config.name


@pytest.mark.parametrize("target", TARGETS)
def test_the_mounted_config_loads_with_its_policy(render, target: str, tmp_path: Path) -> None:
    docs = render(target)
    for d in docs:  # every gateway config, wherever it is
        if d["kind"] == "ConfigMap" and "gateway.yaml" in d.get("data", {}):
            parse_config(yaml.safe_load(d["data"]["gateway.yaml"]), d["metadata"]["name"])
    configs: dict[str, GatewayConfig] = {}
    for workload, name in (("distillgate", "gateway"), ("distillgate-adapt", "adapt")):
        container = _container(docs, workload, name)
        config = load_config(_mounted_config(docs, workload, container, tmp_path / workload))
        assert load_policy(config.routing.policy).classes  # beside it, as `policy.yaml`
        assert str(config.store) == _env(container)["DISTILLGATE_STORE"]["value"]
        assert config.traffic.dsn is None  # the Secret's, never one written in a ConfigMap
        configs[workload] = config
    gateway_config, adapt_config = configs["distillgate"], configs["distillgate-adapt"]
    assert gateway_config.model_dump(exclude={"routing"}) == adapt_config.model_dump(
        exclude={"routing"}
    )
    adapt = _container(docs, "distillgate-adapt", "adapt")
    assert gateway_config.students.from_store
    assert gateway_config.adapt.metrics_port == _port(adapt, "metrics") == 9100


@pytest.mark.parametrize("target", TARGETS)
def test_service_monitors_select_a_service_and_its_port(render, target: str) -> None:
    docs = render(target)
    services = [d for d in docs if d["kind"] == "Service"]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    jobs = set()
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        chosen = [s for s in services if wanted <= s["metadata"].get("labels", {}).items()]
        assert len(chosen) == 1, f"{monitor['metadata']['name']} selects {len(chosen)} Services"
        service = chosen[0]
        ports = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
        # the Service must also select pods that expose that port under that name
        pods = [p for n, p in _pods(docs)
                if service["spec"]["selector"].items() <= _labels(docs, n).items()]  # fmt: skip
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        jobs.add(service["metadata"]["name"])
    assert jobs >= JOBS


def _labels(docs: Docs, workload: str) -> dict[str, str]:
    found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
             and d["metadata"]["name"] == workload]  # fmt: skip
    return found[0]["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("target", TARGETS)
def test_prometheus_rule_passes_promtool(render, target: str, tmp_path: Path) -> None:
    promtool = _binary("promtool", "apt-get install prometheus")
    rule = _one(render(target), "PrometheusRule", "distillgate")
    groups = rule["spec"]["groups"]
    kinds = {k for g in groups for r in g["rules"] for k in ("record", "alert") if k in r}
    assert kinds == {"record", "alert"}, "recording rules and alerts both belong in it"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_dashboard_configmap_is_labelled_for_grafana(render, target: str) -> None:
    configmap = _one(render(target), "ConfigMap", "distillgate-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    dashboard = json.loads(text)
    assert dashboard["uid"] == "distillgate"
    assert dashboard["panels"], "placeholder dashboard: generate it, then run deploy/k8s/sync.py"


def test_gpu_overlay_serves_from_vllm_on_a_gpu(render) -> None:
    docs = render("overlays/gpu-vllm")
    vllm = _container(docs, "distillgate-vllm", "vllm")
    assert int(vllm["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    flags = dict(a.removeprefix("--").split("=", 1) for a in vllm["args"] if a.startswith("--"))
    model_dir = Path(vllm["args"][0])
    mount = next(m for m in vllm["volumeMounts"] if m["mountPath"] == str(model_dir.parent))
    assert mount["readOnly"] is True
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and "gateway.yaml" in d["data"]]
    config = parse_config(yaml.safe_load(configmap["data"]["gateway.yaml"]))
    remote = [m for m in config.models if m.backend == "openai"]
    assert remote and all(m.backend != "local" for m in config.models)
    for model in remote:
        url = urlsplit(model.url)
        service = _one(docs, "Service", url.hostname)
        assert url.port in {p["port"] for p in service["spec"]["ports"]}
        assert model.served_model == flags["served-model-name"] == model_dir.name
        assert model.context_length == int(flags["max-model-len"])
        assert str(_port(vllm, "http")) == flags["port"]
    # pods on several nodes share the store: it must be ReadWriteMany here
    assert _one(docs, "PersistentVolumeClaim", "distillgate-models")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def test_cpu_overlay_serves_the_embedded_teacher_in_process(render) -> None:
    docs = render("overlays/cpu")
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and "gateway.yaml" in d["data"]]
    config = parse_config(yaml.safe_load(configmap["data"]["gateway.yaml"]))
    assert [(m.backend, m.role) for m in config.models] == [("local", "teacher")]
    gateway = _container(docs, "distillgate", "gateway")
    assert config.threads == int(gateway["resources"]["requests"]["cpu"])
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {})
                   for _, pod in _pods(docs) for c in pod["containers"])  # fmt: skip


def _sync(*args: str, root: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(K8S / "sync.py"), "--root", str(root), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_generated_manifests_are_current() -> None:
    done = _sync("--check")
    assert done.returncode == 0, done.stderr


def test_sync_check_names_a_stale_file(tmp_path: Path) -> None:
    for source in ("deploy/prometheus/rules.yml", "deploy/prometheus/alerts.yml",
                   "deploy/policy.yaml", "deploy/k8s/base/kustomization.yaml"):  # fmt: skip
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, tmp_path / source)
    assert _sync(root=tmp_path).returncode == 0
    assert _sync("--check", root=tmp_path).returncode == 0
    policy = tmp_path / "deploy/policy.yaml"
    policy.write_text(policy.read_text() + "\n# changed\n")
    done = _sync("--check", root=tmp_path)
    assert done.returncode == 1
    assert "deploy/k8s/base/generated/policy.yaml is stale" in done.stderr
    assert "prometheus-rules" not in done.stderr
