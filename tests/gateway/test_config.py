"""The YAML config: every file under deploy/ loads (sweep grids are tested with the sweep);
the default config and policy are package data; a bad file is reported whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillgate_deploy import shipped
from gateway.config import ConfigError, load_config, parse_config

DEPLOY = shipped("")  # deploy/, as the installed package `distillgate_deploy`


# Gateway configs: the YAML files at the top of deploy/ and every gateway*.yaml below it
# (compose and Kubernetes ship their own); the rest are other tools' files.
CONFIGS = sorted(
    p for p in DEPLOY.rglob("*.yaml")
    if "policy" not in p.name and (p.parent == DEPLOY or p.name.startswith("gateway"))
)  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_deploy_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.models


def test_default_config_is_the_embedded_teacher() -> None:
    config = load_config()
    assert [(m.name, m.backend, m.role) for m in config.models] == [
        ("smollm2-135m-instruct", "local", "teacher")
    ]
    assert config.routing.policy == shipped("policy.yaml") and config.routing.policy.is_file()
    assert config.routing.law is None  # routing uses no law unless a config names one


def test_relative_routing_paths_resolve_beside_the_config(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "gateway.yaml"
    path.parent.mkdir()
    path.write_text(
        "models: [{name: m, backend: openai, url: 'http://x'}]\n"
        "routing: {policy: policy.yaml, law: ../results/law.json}\n"
    )
    routing = load_config(path).routing
    assert routing.policy == path.parent / "policy.yaml"
    assert routing.law == path.parent / "../results/law.json"


def test_every_problem_is_reported_with_its_path() -> None:
    bad = {
        "models": [
            {"name": "a", "backend": "local", "max_batch_size": 0},
            {"name": "b", "backend": "openai"},
            {"name": "c", "backend": "vllm", "path": "/m", "port": 80, "gpu_memory_utilization": 2},
            {"name": "d", "backend": "tgi"},
        ],
        "limits": {"queue_size": -1, "colour": "red"},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(bad, source="bad.yaml")
    text = str(info.value)
    for expected in (
        "models[0].max_batch_size",
        "models[1].url: Field required",
        "models[2].port",
        "models[2].gpu_memory_utilization",
        "models[3]",
        "limits.queue_size",
        "limits.colour: Extra inputs are not permitted",
    ):
        assert expected in text, expected
    assert text.startswith("invalid config bad.yaml (7 problem(s))")


def test_duplicate_names_and_ports() -> None:
    models = [
        {"name": "x", "backend": "vllm", "path": "/a", "port": 8101},
        {"name": "x", "backend": "vllm", "path": "/b", "port": 8101},
    ]
    with pytest.raises(ConfigError, match="repeated: x"):
        parse_config({"models": models})


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    broken.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(broken)
