"""API keys: the pure check, the key table in a real SQLite file, the `keys` commands, the
refusal to serve a public address without keys, and the app over scripted backends with
the official SDK as the client (401s in OpenAI's shape, open health endpoints, a revoked
key refused after the table's next refresh, a key's class routing `auto`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.auth import (
    ApiKey,
    Caller,
    KeyStore,
    KeyStoreError,
    KeyTable,
    Refusal,
    check,
    digest,
    exposure,
    masked,
    new_secret,
)
from gateway.config import parse_config
from gateway.limits import Quota
from gateway.routing.policy import PolicyError, parse_policy
from models.store import ModelStore
from tests.gateway.scripted import ScriptedBackend, wait_ready
from tests.servers import cli

NOW = 1_800_000_000.0


def key_with(secret: str, **fields) -> ApiKey:
    salt = b"0123456789abcdef"
    return ApiKey(fields.pop("name", "team-a"), secret[:11], salt, digest(salt, secret), **fields)


def test_a_secret_is_dg_and_43_random_characters_shown_only_masked() -> None:
    a, b = new_secret(), new_secret()
    assert a.startswith("dg-") and len(a) == 46 and a != b
    assert masked(a) == f"{a[:11]}***{a[-4:]}" and masked("short") == "***"


def test_check_names_what_is_wrong_without_saying_which_names_exist() -> None:
    good, revoked, expired = new_secret(), new_secret(), new_secret()
    table = KeyTable.of([
        key_with(good, slo_class="batch", rpm=10),
        key_with(revoked, name="old", revoked=NOW - 5),
        key_with(expired, name="temp", expires=NOW - 1),
    ])  # fmt: skip
    assert check(table, f"Bearer {good}", NOW) == Caller("team-a", "batch", Quota(10, None))
    assert check(table, None, NOW).reason == "missing"  # type: ignore[union-attr]
    assert check(table, "Basic abc", NOW).reason == "missing"  # type: ignore[union-attr]
    wrong = check(table, f"Bearer {good[:-1]}x", NOW)
    assert isinstance(wrong, Refusal) and wrong.reason == "invalid"
    assert good[:-1] not in wrong.message and "team-a" not in wrong.message
    assert check(table, f"bearer {revoked}", NOW).reason == "revoked"  # type: ignore[union-attr]
    assert check(table, f"Bearer {expired}", NOW).reason == "expired"  # type: ignore[union-attr]
    assert isinstance(check(table, f"Bearer {expired}", NOW - 2), Caller)


def test_a_public_address_needs_keys_or_an_explicit_none() -> None:
    assert exposure(None, "127.0.0.1") is None and exposure(None, "::1") is None
    assert exposure(None, "localhost") is None and exposure("keys", "0.0.0.0") is None
    kind, message = exposure(None, "0.0.0.0")  # type: ignore[misc]
    assert kind == "error" and "auth: {mode: keys}" in message and "mode: none" in message
    assert exposure("none", "10.1.2.3")[0] == "warning"  # type: ignore[index]
    assert exposure(None, "gateway.internal")[0] == "error"  # type: ignore[index]


def test_serve_refuses_a_public_address_without_keys_in_one_line() -> None:
    done = cli("serve", "--host", "0.0.0.0", "--port", "1")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "auth: {mode: keys}" in done.stderr


def test_the_policy_names_keys_and_refuses_secrets() -> None:
    base = {"classes": {"a": {}, "b": {}}, "default_class": "a"}
    assert parse_policy({**base, "api_keys": {"team-a": {"class": "b"}}}).api_keys
    with pytest.raises(PolicyError, match="keys create --name NAME --class"):
        parse_policy({**base, "api_keys": {new_secret(): {"class": "b"}}})


def test_the_key_store_keeps_hashes_and_never_reuses_a_name(tmp_path: Path) -> None:
    store = KeyStore.open(f"sqlite:///{tmp_path / 'traffic.db'}")
    try:
        key, secret = store.create("team-a", "batch", 60, 1000, None, NOW)
        assert key.prefix == secret[:11] and key.digest == digest(key.salt, secret)
        with pytest.raises(KeyStoreError, match="exists already"):
            store.create("team-a", None, None, None, None, NOW)
        assert [k.name for k in store.all()] == ["team-a"]
        assert store.revoke("team-a", NOW + 1).revoked == NOW + 1
        with pytest.raises(KeyStoreError, match="revoked already"):
            store.revoke("team-a", NOW + 2)
        with pytest.raises(KeyStoreError, match="no key named"):
            store.revoke("nobody", NOW)
    finally:
        store.close()
    raw = (tmp_path / "traffic.db").read_bytes()
    assert secret.encode() not in raw and secret[11:].encode() not in raw


def test_keys_commands_create_list_and_revoke(tmp_path: Path) -> None:
    made = cli("keys", "create", "--name", "team-a", "--class", "batch", "--rpm", "60",
               "--expires", "30d", "--store", str(tmp_path), "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    shown = json.loads(made.stdout)
    assert shown["key"].startswith("dg-") and shown["class"] == "batch" and shown["expires"]
    listed = cli("keys", "list", "--store", str(tmp_path))
    assert "team-a" in listed.stdout and shown["key"] not in listed.stdout
    assert shown["key"][:11] in listed.stdout
    assert cli("keys", "revoke", "team-a", "--store", str(tmp_path)).returncode == 0
    again = cli("keys", "create", "--name", "team-a", "--store", str(tmp_path))
    assert again.returncode == 2 and "exists already" in again.stderr
    bad = cli("keys", "create", "--name", "x", "--class", "nope", "--store", str(tmp_path))
    assert bad.returncode == 2 and "not a class of" in bad.stderr
    past = cli("keys", "create", "--name", "y", "--expires", "2001-01-01", "--store",
               str(tmp_path))  # fmt: skip
    assert past.returncode == 2 and "in the past" in past.stderr


# -- the app ----------------------------------------------------------------------------


def keyed_app(tmp_path: Path, **auth) -> TestClient:
    """The real app over one scripted model with `auth.mode: keys`, its key table in
    tmp_path's traffic.db."""
    data = {
        "models": [{"name": "m", "backend": "openai", "url": "http://127.0.0.1:9",
                    "role": "teacher"}],
        "traffic": {"enabled": False},
        "auth": {"mode": "keys", **auth},
    }  # fmt: skip
    backend = ScriptedBackend("m")
    app = create_app(parse_config(data), ModelStore(tmp_path), factory=lambda m: backend)
    return TestClient(app, raise_server_exceptions=False)


def make_key(tmp_path: Path, name: str, **limits) -> str:
    store = KeyStore.open(f"sqlite:///{tmp_path / 'traffic.db'}")
    try:
        return store.create(name, limits.get("slo_class"), limits.get("rpm"),
                            limits.get("tpm"), None, time.time())[1]  # fmt: skip
    finally:
        store.close()


def sdk(client: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client,
                         max_retries=0)  # fmt: skip


def ask(client: openai.OpenAI) -> str | None:
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return out.choices[0].message.content


def test_keyed_requests_pass_and_others_get_401_in_openai_shape(tmp_path: Path) -> None:
    secret = make_key(tmp_path, "team-a")
    with keyed_app(tmp_path) as client:
        wait_ready(client)
        assert ask(sdk(client, secret)) == "Hello, world!"
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(sdk(client, secret[:-2] + "zz"))
        assert caught.value.status_code == 401
        body = caught.value.response.json()["error"]
        assert body["type"] == "invalid_request_error" and body["code"] == "invalid_api_key"
        assert "Incorrect API key" in body["message"]
        missing = client.get("/v1/models")
        assert missing.status_code == 401 and "didn't provide" in missing.json()["error"]["message"]
        for path in ("/health", "/ready", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        metrics = client.get("/metrics").text
        assert 'distillgate_auth_failures_total{reason="invalid"} 1.0' in metrics
        assert 'distillgate_auth_failures_total{reason="missing"} 1.0' in metrics


def test_metrics_can_be_kept_behind_keys(tmp_path: Path) -> None:
    secret = make_key(tmp_path, "ops")
    with keyed_app(tmp_path, metrics="keys") as client:
        wait_ready(client)
        assert client.get("/metrics").status_code == 401
        ok = client.get("/metrics", headers={"authorization": f"Bearer {secret}"})
        assert ok.status_code == 200


def test_a_revoked_key_is_refused_after_the_next_refresh(tmp_path: Path) -> None:
    secret = make_key(tmp_path, "team-a")
    with keyed_app(tmp_path, refresh_s=0.05) as client:
        wait_ready(client)
        assert ask(sdk(client, secret))
        store = KeyStore.open(f"sqlite:///{tmp_path / 'traffic.db'}")
        store.revoke("team-a", time.time())
        store.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            answer = client.get("/v1/models", headers={"authorization": f"Bearer {secret}"})
            if answer.status_code == 401:
                break
            time.sleep(0.02)
        assert answer.status_code == 401 and "revoked" in answer.json()["error"]["message"]


def test_without_keys_mode_nothing_is_checked(tmp_path: Path) -> None:
    data = {"models": [{"name": "m", "backend": "openai", "url": "http://127.0.0.1:9"}],
            "traffic": {"enabled": False}}  # fmt: skip
    backend = ScriptedBackend("m")
    app = create_app(parse_config(data), ModelStore(tmp_path), factory=lambda m: backend)
    with TestClient(app) as client:
        wait_ready(client)
        answer = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert answer.status_code == 200 and "x-ratelimit-limit-requests" not in answer.headers
    assert not (tmp_path / "traffic.db").exists()  # no key table is even opened


def test_an_unreadable_key_table_answers_503_not_401(tmp_path: Path) -> None:
    (tmp_path / "traffic.db").write_bytes(b"this is not a database" * 100)
    with keyed_app(tmp_path) as client:
        answer = client.get("/v1/models", headers={"authorization": "Bearer dg-x"})
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert answer.json()["error"]["type"] == "service_unavailable"


def test_a_header_that_is_not_bearer_is_a_missing_key(tmp_path: Path) -> None:
    with keyed_app(tmp_path) as client:
        wait_ready(client)
        answer = client.post("/v1/chat/completions", json={}, headers={"authorization": "x"})
        assert answer.status_code == 401
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
