"""The same registry behaviour on a real SQLite file and a real Postgres server."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from haifctl.errors import InvalidInput, NotFound, Unavailable
from haifctl.registry.backends import SQLiteBackend
from haifctl.registry.migrations import MIGRATIONS
from haifctl.registry.remote import RemoteRegistry
from haifctl.registry.service import (
    BUILTIN_SHA256,
    MAX_NAME_CHARS,
    MAX_REF_CHARS,
    Registry,
    open_registry,
)
from haifctl.security import Keyring
from tests.cluster import Proc


@pytest.fixture
def registry(registry_url: str) -> Registry:
    reg = open_registry(registry_url)
    yield reg
    reg.close()


@pytest.fixture
def gguf_copy(model_path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(model_path, tmp_path / "tiny.gguf"))


def names(registry: Registry) -> list[str]:
    return [r.ref for r in registry.all()]


def test_register_records_file_facts_and_checksum(registry: Registry, gguf_copy: Path) -> None:
    record = registry.register(
        gguf_copy, name="tiny", aliases=["story"], params={"temperature": 0.5}
    )
    assert record.ref == "tiny:1"
    assert record.sha256 == BUILTIN_SHA256
    assert record.path == str(gguf_copy.resolve())
    assert (record.architecture, record.context_length, record.block_count) == ("llama", 2048, 5)
    assert record.parameter_count == 292_800
    assert record.status == "registered"
    assert record.aliases == ["story"]
    assert record.params == {"temperature": 0.5}
    assert registry.resolve("story") == record
    assert registry.resolve("tiny:1") == record


def test_versions_are_ordered_and_name_alone_means_newest(
    registry: Registry, gguf_copy: Path
) -> None:
    for version in ("1.9", "1.10", "1.2"):
        registry.register(gguf_copy, name="tiny", version=version)
    assert names(registry) == ["tiny:1.10", "tiny:1.9", "tiny:1.2"]
    assert registry.resolve("tiny").version == "1.10"
    registry.set_status("tiny:1.10", "retired")
    assert registry.resolve("tiny").version == "1.9"  # retired versions are passed over
    registry.set_default("tiny:1.2")
    assert registry.resolve("tiny").version == "1.2"  # unless one is marked default
    registry.set_default("tiny:1.9")
    assert [r.version for r in registry.versions("tiny") if r.is_default] == ["1.9"]


def test_default_version_numbers_count_up(registry: Registry, gguf_copy: Path) -> None:
    assert registry.register(gguf_copy, name="tiny").version == "1"
    assert registry.register(gguf_copy, name="tiny").version == "2"
    registry.register(gguf_copy, name="tiny", version="beta")
    assert registry.register(gguf_copy, name="tiny").version == "3"


def test_unknown_models_get_suggestions(registry: Registry, gguf_copy: Path) -> None:
    registry.register(gguf_copy, name="tinystories")
    with pytest.raises(NotFound, match="unknown model 'tinystorie'") as info:
        registry.resolve("tinystorie")
    assert "did you mean tinystories" in info.value.hint
    with pytest.raises(NotFound, match="has no version '9'") as info:
        registry.resolve("tinystories:9")
    assert "versions: 1" in info.value.hint


def test_a_failed_register_leaves_no_row(
    registry: Registry, gguf_copy: Path, tmp_path: Path
) -> None:
    registry.register(gguf_copy, name="first", aliases=["taken"])
    before = names(registry)
    with pytest.raises(InvalidInput, match="alias 'taken' already points at first:1"):
        registry.register(gguf_copy, name="second", aliases=["fresh", "taken"])
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_copy.read_bytes()[:5000])
    with pytest.raises(InvalidInput, match="truncated"):
        registry.register(truncated, name="second")
    with pytest.raises(InvalidInput, match="already registered"):
        registry.register(gguf_copy, name="first", version="1")
    with pytest.raises(InvalidInput, match="not allowed"):
        registry.register(gguf_copy, name="bad name")
    assert names(registry) == before
    with pytest.raises(NotFound):
        registry.resolve("fresh")


def test_aliases_move_and_go(registry: Registry, gguf_copy: Path) -> None:
    registry.register(gguf_copy, name="tiny", version="1")
    registry.register(gguf_copy, name="tiny", version="2")
    assert registry.set_alias("prod", "tiny:1").ref == "tiny:1"
    assert registry.set_alias("prod", "tiny:2").ref == "tiny:2"
    assert registry.resolve("prod").version == "2"
    with pytest.raises(InvalidInput, match="takes no version"):
        registry.resolve("prod:1")
    with pytest.raises(InvalidInput, match="is a model name"):
        registry.set_alias("tiny", "tiny:1")
    registry.remove_alias("prod")
    with pytest.raises(NotFound):
        registry.resolve("prod")
    with pytest.raises(NotFound, match="no alias"):
        registry.remove_alias("prod")


def test_remove_needs_a_version_or_all(registry: Registry, gguf_copy: Path) -> None:
    registry.register(gguf_copy, name="tiny", version="1", aliases=["old"])
    registry.register(gguf_copy, name="tiny", version="2")
    with pytest.raises(InvalidInput, match="has 2 versions"):
        registry.remove("tiny")
    assert [r.ref for r in registry.remove("tiny:1")] == ["tiny:1"]
    with pytest.raises(NotFound):
        registry.resolve("old")  # its alias went with it
    registry.register(gguf_copy, name="tiny", version="3")
    assert sorted(r.ref for r in registry.remove("tiny", all_versions=True)) == ["tiny:2", "tiny:3"]
    assert names(registry) == []


def test_status_is_checked(registry: Registry, gguf_copy: Path) -> None:
    registry.register(gguf_copy, name="tiny")
    assert registry.set_status("tiny", "deployed").status == "deployed"
    with pytest.raises(InvalidInput, match="unknown status"):
        registry.set_status("tiny", "sleeping")


def test_builtin_model_is_registered_once(registry: Registry) -> None:
    first = registry.ensure_builtin()
    assert first.ref == "stories260K:1"
    assert first.builtin
    assert Path(first.path).is_file()
    assert registry.ensure_builtin() == first
    assert names(registry) == ["stories260K:1"]


def test_migrations_are_recorded_and_run_once(registry_url: str) -> None:
    with open_registry(registry_url) as reg:
        rows = reg.backend.query("SELECT name FROM haif_migrations ORDER BY name")
    assert [r["name"] for r in rows] == [name for name, _ in MIGRATIONS]
    with open_registry(registry_url) as again:  # reopening applies nothing twice
        assert len(again.backend.query("SELECT name FROM haif_migrations")) == len(MIGRATIONS)


def test_concurrent_first_use_registers_the_builtin_once(registry_url: str) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            with open_registry(registry_url) as reg:
                results.append(reg.ensure_builtin().ref)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == ["stories260K:1"] * 4


def test_sqlite_registry_uses_wal(tmp_path: Path) -> None:
    with open_registry(f"sqlite://{tmp_path / 'r.db'}") as reg:
        assert isinstance(reg.backend, SQLiteBackend)
        assert reg.backend.db.journal_mode == "wal"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("mysql://x@y/z", "bad_registry_url"),
        ("sqlite://", "bad_registry_url"),
        ("registry.db", "bad_registry_url"),
        ("postgresql://nobody@127.0.0.1:1/db", "registry_unreachable"),
        ("postgresql://x@127.0.0.1/db?bogus=1", "bad_registry_url"),
    ],
)
def test_bad_registry_urls(url: str, code: str) -> None:
    with pytest.raises((InvalidInput, Unavailable)) as info:
        open_registry(url)
    assert info.value.code == code
    assert info.value.hint


def test_sqlite_registry_in_a_directory_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="points at a directory"):
        open_registry(f"sqlite://{tmp_path}")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://nobody:s3cret-pw@127.0.0.1:1/db",
        "postgresql://nobody@127.0.0.1:1/db?password=s3cret-pw",
        "postgresql://x:s3cret-pw@127.0.0.1/db?bogus=1",
        "postgresql://x@127.0.0.1/db?password=s3cret-pw&bogus=1",
    ],
)
def test_registry_errors_mask_the_password(url: str) -> None:
    with pytest.raises((InvalidInput, Unavailable)) as info:
        open_registry(url)
    assert "s3cret-pw" not in info.value.message + info.value.hint
    assert "********" in info.value.message


BAD_REFS = [
    pytest.param("tiny\x00", id="nul"),
    pytest.param("ti\x00ny:1", id="nul-inside"),
    pytest.param("tiny\x1b[2J", id="escape"),
    pytest.param("tiny\n", id="newline"),
    pytest.param("tiny\x7f", id="del"),
    pytest.param("t" * (MAX_NAME_CHARS + 1), id="long-name"),
    pytest.param("tiny:" + "1" * (MAX_NAME_CHARS + 1), id="long-version"),
    pytest.param("t" * (MAX_REF_CHARS + 1), id="long-ref"),
    pytest.param("t" * 1_000_000, id="huge"),
]


@pytest.mark.parametrize("ref", BAD_REFS)
def test_control_characters_and_overlong_refs_are_invalid_input(
    registry: Registry, gguf_copy: Path, ref: str
) -> None:
    """On both backends (Postgres cannot even store a NUL): a clear InvalidInput, before any
    lookup, from every operation that takes a name."""
    registry.register(gguf_copy, name="tiny", aliases=["story"])
    operations = [
        lambda: registry.resolve(ref),
        lambda: registry.remove(ref),
        lambda: registry.set_default(ref),
        lambda: registry.set_status(ref, "retired"),
        lambda: registry.set_alias("other", ref),
        lambda: registry.set_alias(ref, "tiny:1"),
        lambda: registry.remove_alias(ref),
        lambda: registry.register(gguf_copy, name=ref),
        lambda: registry.register(gguf_copy, name="tiny2", aliases=[ref]),
    ]
    for operation in operations:
        with pytest.raises(InvalidInput) as info:
            operation()
        assert info.value.code.startswith("invalid_")
        assert "\x00" not in info.value.message  # shown escaped
        assert len(info.value.message) < 300  # a huge name is not echoed whole
        assert info.value.hint
    assert [r.ref for r in registry.all()] == ["tiny:1"]
    assert registry.resolve("story").ref == "tiny:1"  # nothing changed, the backend still works


def test_a_ref_at_the_limit_is_looked_up(registry: Registry) -> None:
    name = "t" * MAX_NAME_CHARS
    with pytest.raises(NotFound):
        registry.resolve(f"{name}:{'1' * MAX_NAME_CHARS}")
    assert len(f"{name}:{'1' * MAX_NAME_CHARS}") == MAX_REF_CHARS


def test_backends_refuse_a_nul_in_any_text_parameter(registry: Registry) -> None:
    backend = registry.backend
    with pytest.raises(InvalidInput, match="contains a NUL byte"):
        backend.query("SELECT name FROM models WHERE name = :n", {"n": "a\x00b"})
    with pytest.raises(InvalidInput, match="contains a NUL byte"):
        backend.execute("DELETE FROM aliases WHERE alias = :a", {"a": "a\x00b"})
    assert backend.query("SELECT count(*) AS n FROM models")[0]["n"] >= 0  # still usable


def test_registry_daemon_answers_a_nul_name_at_once(registry_url: str, tmp_path: Path) -> None:
    """A NUL in a model name used to escape the daemon's handler on Postgres (psycopg's
    DataError), leaving the caller without an answer until its timeout."""
    env = {**os.environ, "HAIF_REGISTRY_URL": registry_url, "HAIF_HOME": str(tmp_path / "h")}
    proc = Proc("registry", ["daemon", "registry"], tmp_path, env)
    try:
        keyring = Keyring.ensure(tmp_path / "h")
        with RemoteRegistry(proc.endpoint(), keyring, timeout=20.0) as remote:
            for ref in ("tiny\x00", "x" * (MAX_REF_CHARS + 1)):
                with pytest.raises(InvalidInput) as info:
                    remote.resolve(ref)
                assert info.value.code == "invalid_model_ref"
            with pytest.raises(InvalidInput):
                remote.remove_alias("a\x00")
            assert remote.resolve("stories260K").ref == "stories260K:1"
    finally:
        assert proc.stop() == 0, proc.tail()
