"""The rule for the real binaries tests run (PostgreSQL, Prometheus, promtool, kubectl,
docker-compose, hadolint): a missing one skips its tests, except under $CI, where it fails
them (CI installs them all: .ci/run)."""

from __future__ import annotations

import os

import pytest


def require(found: str | os.PathLike | None, what: str, install: str, purpose: str):
    """`found` when it is there; else skip (fail under $CI) naming how to install it."""
    if found is None:
        message = f"{what} not found ({install})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must {purpose}")
        pytest.skip(message)
    return found
