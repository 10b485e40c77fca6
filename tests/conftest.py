"""Fixtures shared by every test layer: an isolated haifctl home, registries, the real model."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from haifctl.registry.service import builtin_model_path

ENV_PREFIXES = ("HAIF_", "POSTGRES_")
ENV_NAMES = ("MODEL_ID", "GATEWAY_URL", "OTEL_PROMETHEUS_PORT")
POSTGRES_ENV = "HAIF_TEST_POSTGRES_URL"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test gets its own haifctl home and none of the caller's haifctl settings."""
    for name in list(os.environ):
        if (name.startswith(ENV_PREFIXES) or name in ENV_NAMES) and name != POSTGRES_ENV:
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("HAIF_HOME", str(home))
    return home


@pytest.fixture
def home(clean_env: Path) -> Path:
    return clean_env


@pytest.fixture(scope="session")
def model_path() -> Path:
    return builtin_model_path()


def _postgres_base_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        message = (
            f"Postgres tests need a server: set {POSTGRES_ENV}="
            "postgresql://postgres@127.0.0.1:5432/test (.ci/run does)"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " — CI must run them", pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A Postgres registry URL whose tables live in a schema of their own, dropped afterwards."""
    import psycopg

    base = _postgres_base_url()
    schema = f"haif_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"{POSTGRES_ENV}={base} is unreachable: {exc}", pytrace=False)
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each registry test runs against both backends."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def require(tool: str, package: str = "") -> str:
    """The path of a tool the test needs: skipped on a laptop without it, a failure in CI."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (.ci/run installs Debian's {package or tool})"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


REDIS_URL = "redis://127.0.0.1:6379/0"  # the machine's Redis (.ci/run starts one where none runs)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the machine's Redis, its keys deleted afterwards; a
    missing Redis skips the test on a laptop and fails it in CI."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"needs Redis on 127.0.0.1:6379 (.ci/run starts it): {exc}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    prefix = f"haif-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()
