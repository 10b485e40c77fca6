"""The model registry: names, versions, aliases, files, checksums and GGUF facts."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import msgspec

from haifctl.config import DEFAULT_MODEL
from haifctl.errors import HaifError, InvalidInput, NotFound
from haifctl.gguf_info import GGUFFacts, read_facts
from haifctl.hashing import sha256_file
from haifctl.registry import usage as usage_table
from haifctl.registry.backends import Backend, Conflict, open_backend
from haifctl.registry.migrations import apply_migrations
from haifctl.registry.usage import UsageRow, UsageTotal

Status = Literal["registered", "deployed", "retired"]
STATUSES: tuple[str, ...] = ("registered", "deployed", "retired")
BUILTIN_VERSION = "1"
BUILTIN_SHA256 = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d"

MAX_NAME_CHARS = 128  # a name, a version or an alias
# The longest NAME:VERSION the registry can hold: other daemons cap a model name with it before
# asking the registry about it.
MAX_REF_CHARS = 2 * MAX_NAME_CHARS + 1
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux: a model given by its file's path
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")
# C0 controls (NUL included), DEL and C1 controls: never part of a name, and Postgres refuses
# a NUL in any text value.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ModelRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One registered model version."""

    name: str
    version: str
    path: str
    sha256: str
    size_bytes: int
    architecture: str
    parameter_count: int | None
    context_length: int | None
    block_count: int | None
    file_type: str | None
    has_chat_template: bool
    params: dict[str, Any]
    status: str
    is_default: bool
    builtin: bool
    aliases: list[str]
    created_at: str
    updated_at: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def builtin_model_path() -> Path:
    """The model shipped inside the package (a real tiny llama trained on TinyStories)."""
    return Path(str(resources.files("haifctl") / "data" / f"{DEFAULT_MODEL}.gguf"))


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Order versions naturally: 2 < 10, 1.9 < 1.10 < 1.10.1, and 1.0-rc1 < 1.0."""
    parts = re.split(r"[._+-]", version)
    key = tuple((2, int(p), "") if p.isdigit() else (0, 0, p) for p in parts)
    # The end of a version sorts after a word (a pre-release tag) and before a number.
    return (*key, (1, 0, ""))


def _shown(text: str) -> str:
    """A name quoted for a message, control characters escaped, a long one cut short."""
    return repr(text) if len(text) <= 60 else repr(text[:60]) + "..."


def check_ref_text(ref: str, what: str = "model reference") -> str:
    """Refuse, before any lookup, what no model name, version or alias can be: text with a NUL
    or another control character, or longer than the registry's limits (NAME and VERSION
    ``MAX_NAME_CHARS`` each, ``MAX_REF_CHARS`` in all)."""
    code = "invalid_model_ref" if what == "model reference" else f"invalid_{what}"
    if _CONTROL.search(ref):
        raise InvalidInput(
            code,
            f"{what} {_shown(ref)} contains a control character",
            "names hold only letters, digits, '.', '_' and '-'",
        )
    name, _, version = ref.strip().partition(":")
    if len(ref) > MAX_REF_CHARS or max(len(name), len(version)) > MAX_NAME_CHARS:
        raise InvalidInput(
            code,
            f"{what} {_shown(ref)} is too long ({len(ref)} characters)",
            f"a name, a version and an alias are at most {MAX_NAME_CHARS} characters each",
        )
    return ref


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``NAME[:VERSION]``."""
    check_ref_text(ref)
    name, sep, version = ref.strip().partition(":")
    if not name or (sep and not version):
        raise InvalidInput(
            "invalid_model_ref", f"{ref!r} is not a model reference", "use NAME or NAME:VERSION"
        )
    return name, (version if sep else None)


def check_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise InvalidInput(
            f"invalid_{kind}",
            f"{kind} {_shown(value)} is not allowed",
            f"a {kind} starts with a letter or digit and holds only letters, digits, '.', '_' "
            "and '-' (at most 128 characters)",
        )
    return value


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``key=value`` strings into default generation parameters (values parsed as JSON)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(
                "invalid_param",
                f"--param {item!r} is not key=value",
                "e.g. --param temperature=0.7",
            )
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse, when a model is registered or edited, default parameters that every inference
    would refuse later: a key that is not a sampling parameter (with the closest ones as a
    suggestion) or a value of the wrong type or out of range (the request schema's bounds)."""
    from haifctl.schema import PLACEMENT_KEYS, SAMPLING_KEYS, validate_request

    known = (*SAMPLING_KEYS, *PLACEMENT_KEYS)
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise InvalidInput(
                "invalid_param",
                f"--param {key} is not a sampling parameter",
                hint + "known: " + ", ".join(known),
            )
    try:
        validate_request({"prompt": "", **params}, "--param")
    except InvalidInput as exc:
        raise InvalidInput(
            "invalid_param",
            exc.message.replace(" | null", ""),
            "e.g. --param temperature=0.7 (values are JSON)",
        ) from None
    return dict(params)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """Model metadata over one backend.  Use :func:`open_registry` to get one."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        apply_migrations(backend)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.backend.close()

    # reading ---------------------------------------------------------------------------------

    def _records(
        self, where: str = "", params: Mapping[str, Any] | None = None
    ) -> list[ModelRecord]:
        rows = self.backend.query(f"SELECT * FROM models {where}", params)
        alias_rows = self.backend.query("SELECT alias, name, version FROM aliases ORDER BY alias")
        aliases: dict[tuple[str, str], list[str]] = {}
        for row in alias_rows:
            aliases.setdefault((row["name"], row["version"]), []).append(row["alias"])
        records = [
            ModelRecord(
                name=row["name"],
                version=row["version"],
                path=row["path"],
                sha256=row["sha256"],
                size_bytes=int(row["size_bytes"]),
                architecture=row["architecture"],
                parameter_count=row["parameter_count"],
                context_length=row["context_length"],
                block_count=row["block_count"],
                file_type=row["file_type"],
                has_chat_template=bool(row["has_chat_template"]),
                params=json.loads(row["params"]),
                status=row["status"],
                is_default=bool(row["is_default"]),
                builtin=bool(row["builtin"]),
                aliases=aliases.get((row["name"], row["version"]), []),
                created_at=row["created_at"],
                updated_at=row["updated_at"],
            )
            for row in rows
        ]
        records.sort(key=lambda r: version_key(r.version), reverse=True)
        records.sort(key=lambda r: r.name.lower())
        return records

    def all(self) -> list[ModelRecord]:
        """Every model version: by name, newest version first."""
        return self._records()

    def versions(self, name: str) -> list[ModelRecord]:
        return self._records("WHERE name = :name", {"name": name})

    def resolve(self, ref: str) -> ModelRecord:
        """Find ``NAME[:VERSION]``, an alias, or the absolute path of a registered file.  NAME
        alone: the default version, else the newest version that is not retired, else the
        newest."""
        if "/" in ref:  # never in a name: a path
            return self.resolve_path(ref)
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            rows = self.backend.query(
                "SELECT name, version FROM aliases WHERE alias = :alias", {"alias": name}
            )
            if rows:
                if version is not None:
                    raise InvalidInput(
                        "invalid_model_ref",
                        f"{name!r} is an alias (of {rows[0]['name']}:{rows[0]['version']}); "
                        "an alias takes no version",
                        f"use {name} or {rows[0]['name']}:{version}",
                    )
                return self.resolve(f"{rows[0]['name']}:{rows[0]['version']}")
            raise self._unknown(ref)
        if version is not None:
            for record in versions:
                if record.version == version:
                    return record
            raise NotFound(
                "model_not_found",
                f"model {name!r} has no version {version!r}",
                "versions: " + ", ".join(r.version for r in versions),
            )
        for record in versions:
            if record.is_default:
                return record
        live = [r for r in versions if r.status != "retired"]
        return (live or versions)[0]

    def resolve_path(self, path: str) -> ModelRecord:
        """The version registered at ``path``, so that a model given as a file works through a
        cluster as it does in-process.  The path must be absolute (a daemon has no caller's
        directory to read a relative one against); only the registry is looked at, never the
        file system.  Several versions of one file: as for NAME alone."""
        if _CONTROL.search(path) or len(path) > MAX_PATH_CHARS:
            raise InvalidInput(
                "invalid_model_ref",
                f"model path {_shown(path)} is not a path a model can have",
                "give the absolute path of a registered .gguf file, or a model name",
            )
        if not path.startswith("/"):
            raise InvalidInput(
                "invalid_model_ref",
                f"model path {_shown(path)} is relative",
                "give it as an absolute path",
            )
        rows = self.backend.query(
            "SELECT name, version FROM models WHERE path = :p", {"p": os.path.normpath(path)}
        )
        if not rows:
            raise NotFound(
                "model_not_registered",
                f"no registered model has the file {path}",
                "a cluster serves registered models: haifctl models register PATH --name NAME "
                "(and haifctl up --model NAME), or run the file in-process with --local",
            )
        records = [self.resolve(f"{r['name']}:{r['version']}") for r in rows]
        records.sort(key=lambda r: version_key(r.version), reverse=True)
        for record in records:
            if record.is_default:
                return record
        live = [r for r in records if r.status != "retired"]
        return (live or records)[0]

    def _unknown(self, ref: str) -> HaifError:
        known = {r.name for r in self.all()}
        known.update(row["alias"] for row in self.backend.query("SELECT alias FROM aliases"))
        close = difflib.get_close_matches(parse_ref(ref)[0], sorted(known), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        hint += "`haifctl models list` shows what is registered; `haifctl models register` adds one"
        return NotFound("model_not_found", f"unknown model {ref!r}", hint)

    # writing ---------------------------------------------------------------------------------

    def register(
        self,
        path: Path,
        *,
        name: str,
        version: str | None = None,
        aliases: Iterable[str] = (),
        params: Mapping[str, Any] | None = None,
        make_default: bool = False,
        builtin: bool = False,
        progress: Callable[[int], None] | None = None,
        facts: GGUFFacts | None = None,
        sha256: str | None = None,
    ) -> ModelRecord:
        """Verify, describe, hash and record a GGUF file.

        All or nothing: a failure writes no row."""
        check_name("name", name)
        params = check_params(params or {})
        aliases = [check_name("alias", a) for a in aliases]
        if version is not None:
            check_name("version", version)
        path = path.expanduser().resolve()
        facts = facts or read_facts(path)
        self._check_free(name, version, aliases)
        digest = sha256 or sha256_file(path, progress)
        now = _now()
        try:
            with self.backend.transaction():
                if version is None:
                    numeric = [int(r.version) for r in self.versions(name) if r.version.isdigit()]
                    version = str(max(numeric, default=0) + 1)
                self._check_free(name, version, aliases)
                if make_default:
                    self.backend.execute(
                        "UPDATE models SET is_default = 0 WHERE name = :name", {"name": name}
                    )
                self.backend.execute(
                    """
                    INSERT INTO models (name, version, path, sha256, size_bytes, architecture,
                        parameter_count, context_length, block_count, file_type, has_chat_template,
                        params, status, is_default, builtin, created_at, updated_at)
                    VALUES (:name, :version, :path, :sha256, :size, :arch, :params_n, :ctx,
                        :blocks, :ftype, :tmpl, :params, 'registered', :dflt, :builtin, :now, :now)
                    """,
                    {
                        "name": name,
                        "version": version,
                        "path": str(path),
                        "sha256": digest,
                        "size": facts.size_bytes,
                        "arch": facts.architecture,
                        "params_n": facts.parameter_count,
                        "ctx": facts.context_length,
                        "blocks": facts.block_count,
                        "ftype": facts.file_type,
                        "tmpl": int(facts.has_chat_template),
                        "params": json.dumps(dict(params or {}), sort_keys=True),
                        "dflt": int(make_default),
                        "builtin": int(builtin),
                        "now": now,
                    },
                )
                for alias in aliases:
                    self.backend.execute(
                        "INSERT INTO aliases (alias, name, version) VALUES (:a, :n, :v)",
                        {"a": alias, "n": name, "v": version},
                    )
        except Conflict:
            # Another process registered the same name/version or alias between check and write.
            self._check_free(name, version, aliases)
            raise
        return self.resolve(f"{name}:{version}")

    def _check_free(self, name: str, version: str | None, aliases: Iterable[str]) -> None:
        if version is not None and self.backend.query(
            "SELECT 1 FROM models WHERE name = :n AND version = :v", {"n": name, "v": version}
        ):
            raise InvalidInput(
                "model_exists",
                f"model {name}:{version} is already registered",
                f"pick another --version, or remove it first: haifctl models rm {name}:{version}",
            )
        if self.backend.query("SELECT 1 FROM aliases WHERE alias = :a", {"a": name}):
            raise InvalidInput(
                "name_taken", f"{name!r} is already an alias", "choose another --name"
            )
        for alias in aliases:
            if alias == name or self.backend.query(
                "SELECT 1 FROM models WHERE name = :a", {"a": alias}
            ):
                raise InvalidInput(
                    "alias_taken",
                    f"alias {alias!r} is already a model name",
                    "choose another alias",
                )
            row = self.backend.query(
                "SELECT name, version FROM aliases WHERE alias = :a", {"a": alias}
            )
            if row:
                raise InvalidInput(
                    "alias_taken",
                    f"alias {alias!r} already points at {row[0]['name']}:{row[0]['version']}",
                    f"move it with: haifctl models alias {alias} {name}"
                    + (f":{version}" if version else ""),
                )

    def remove(self, ref: str, *, all_versions: bool = False) -> list[ModelRecord]:
        """Remove one version (or, with ``all_versions``, every version of a name)."""
        name, version = parse_ref(ref)
        if version is None:
            versions = self.versions(name)
            if not versions:
                target = self.resolve(ref)  # an alias names exactly one version
                versions = [target]
            elif len(versions) > 1 and not all_versions:
                raise InvalidInput(
                    "ambiguous_model_ref",
                    f"model {name!r} has {len(versions)} versions",
                    f"name one ({name}:{versions[0].version}), "
                    "or pass --all to remove every version",
                )
        else:
            versions = [self.resolve(ref)]
        with self.backend.transaction():
            for record in versions:
                self.backend.execute(
                    "DELETE FROM aliases WHERE name = :n AND version = :v",
                    {"n": record.name, "v": record.version},
                )
                self.backend.execute(
                    "DELETE FROM models WHERE name = :n AND version = :v",
                    {"n": record.name, "v": record.version},
                )
        return versions

    def set_alias(self, alias: str, ref: str) -> ModelRecord:
        """Point ``alias`` at a model version, moving it if it already exists."""
        check_name("alias", alias)
        target = self.resolve(ref)
        if self.backend.query("SELECT 1 FROM models WHERE name = :a", {"a": alias}):
            raise InvalidInput(
                "alias_taken", f"{alias!r} is a model name and cannot be an alias too"
            )
        with self.backend.transaction():
            self.backend.execute("DELETE FROM aliases WHERE alias = :a", {"a": alias})
            self.backend.execute(
                "INSERT INTO aliases (alias, name, version) VALUES (:a, :n, :v)",
                {"a": alias, "n": target.name, "v": target.version},
            )
        return self.resolve(target.ref)

    def remove_alias(self, alias: str) -> None:
        check_ref_text(alias, "alias")
        if not self.backend.execute("DELETE FROM aliases WHERE alias = :a", {"a": alias}):
            raise NotFound(
                "alias_not_found", f"no alias {alias!r}", "`haifctl models list` shows aliases"
            )

    def set_default(self, ref: str) -> ModelRecord:
        """Make one version what its bare NAME resolves to."""
        target = self.resolve(ref)
        with self.backend.transaction():
            self.backend.execute(
                "UPDATE models SET is_default = CASE WHEN version = :v THEN 1 ELSE 0 END, "
                "updated_at = :now WHERE name = :n",
                {"n": target.name, "v": target.version, "now": _now()},
            )
        return self.resolve(target.ref)

    def set_params(
        self, ref: str, params: Mapping[str, Any], unset: Iterable[str] = ()
    ) -> ModelRecord:
        """Change a version's default sampling parameters: ``params`` set (checked as at
        register), the keys in ``unset`` dropped."""
        target = self.resolve(ref)
        merged = {k: v for k, v in target.params.items() if k not in set(unset)}
        for key in unset:
            if key not in target.params:
                raise NotFound(
                    "param_not_set",
                    f"{target.ref} has no parameter {key!r} set",
                    "set: " + (", ".join(target.params) or "none"),
                )
        merged.update(params)
        merged = check_params(merged)
        self.backend.execute(
            "UPDATE models SET params = :p, updated_at = :now WHERE name = :n AND version = :v",
            {
                "p": json.dumps(merged, sort_keys=True),
                "now": _now(),
                "n": target.name,
                "v": target.version,
            },
        )
        return self.resolve(target.ref)

    def set_status(self, ref: str, status: str) -> ModelRecord:
        if status not in STATUSES:
            raise InvalidInput(
                "invalid_status", f"unknown status {status!r}", "one of: " + ", ".join(STATUSES)
            )
        target = self.resolve(ref)
        self.backend.execute(
            "UPDATE models SET status = :s, updated_at = :now WHERE name = :n AND version = :v",
            {"s": status, "now": _now(), "n": target.name, "v": target.version},
        )
        return self.resolve(target.ref)

    def ensure_builtin(self) -> ModelRecord:
        """Register the shipped model on first use; follow it if the package moved."""
        path = builtin_model_path()
        rows = self.backend.query(
            "SELECT path FROM models WHERE name = :n AND version = :v",
            {"n": DEFAULT_MODEL, "v": BUILTIN_VERSION},
        )
        if rows:
            if rows[0]["path"] != str(path):
                self.backend.execute(
                    "UPDATE models SET path = :p, updated_at = :now "
                    "WHERE name = :n AND version = :v AND builtin = 1",
                    {"p": str(path), "now": _now(), "n": DEFAULT_MODEL, "v": BUILTIN_VERSION},
                )
            return self.resolve(f"{DEFAULT_MODEL}:{BUILTIN_VERSION}")
        try:
            # The checksum is known: hashing the shipped file on first use would only cost time.
            return self.register(
                path,
                name=DEFAULT_MODEL,
                version=BUILTIN_VERSION,
                builtin=True,
                sha256=BUILTIN_SHA256,
            )
        except (InvalidInput, Conflict):
            # Registered concurrently by another process: fine, read theirs.
            return self.resolve(f"{DEFAULT_MODEL}:{BUILTIN_VERSION}")

    # usage -----------------------------------------------------------------------------------

    def record_usage(self, rows: Sequence[UsageRow]) -> int:
        """Store finished requests' usage (a row already stored is skipped); how many were new."""
        return usage_table.record(self.backend, rows)

    def usage(
        self, since_s: float | None = None, by: usage_table.Group | None = None
    ) -> list[UsageTotal]:
        """Usage totals over the last ``since_s`` seconds, per key, per model, or in all."""
        return usage_table.totals(self.backend, since_s, by)

    def prune_usage(self, older_than_s: float) -> int:
        """Delete usage rows older than ``older_than_s`` seconds; how many went."""
        return usage_table.prune(self.backend, older_than_s)


def open_registry(url: str) -> Registry:
    """Open (and migrate) the registry a URL names."""
    return Registry(open_backend(url))
