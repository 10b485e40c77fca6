"""Append-only, named schema migrations, recorded in the database they changed.

Never edit or reorder an entry once released: add a new one.  The SQL is portable between
SQLite and Postgres (TEXT timestamps in UTC ISO 8601, INTEGER booleans, JSON kept as TEXT).
"""

from __future__ import annotations

from datetime import UTC, datetime

from haifctl.registry.backends import Backend

MIGRATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "0001_models_and_aliases",
        (
            """
            CREATE TABLE models (
                name TEXT NOT NULL,
                version TEXT NOT NULL,
                path TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size_bytes BIGINT NOT NULL,
                architecture TEXT NOT NULL,
                parameter_count BIGINT,
                context_length BIGINT,
                block_count BIGINT,
                file_type TEXT,
                has_chat_template INTEGER NOT NULL DEFAULT 0,
                params TEXT NOT NULL DEFAULT '{}',
                status TEXT NOT NULL DEFAULT 'registered'
                    CHECK (status IN ('registered', 'deployed', 'retired')),
                is_default INTEGER NOT NULL DEFAULT 0,
                builtin INTEGER NOT NULL DEFAULT 0,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (name, version)
            )
            """,
            "CREATE INDEX models_sha256 ON models (sha256)",
            """
            CREATE TABLE aliases (
                alias TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                version TEXT NOT NULL,
                FOREIGN KEY (name, version) REFERENCES models (name, version) ON DELETE CASCADE
            )
            """,
        ),
    ),
    (
        "0002_request_usage",
        (
            # One row per finished request (haifctl/registry/usage.py).  Timestamps as
            # fixed-width UTC ISO 8601 text, like the rest, so text order is time order.
            """
            CREATE TABLE request_usage (
                id TEXT PRIMARY KEY,
                finished_at TEXT NOT NULL,
                request_id TEXT NOT NULL,
                key_id TEXT NOT NULL,
                model TEXT NOT NULL,
                worker TEXT NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                ttft_ms DOUBLE PRECISION,
                duration_ms DOUBLE PRECISION NOT NULL,
                outcome TEXT NOT NULL
            )
            """,
            "CREATE INDEX request_usage_finished_at ON request_usage (finished_at)",
        ),
    ),
)


def apply_migrations(backend: Backend) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    applied_now: list[str] = []
    with backend.transaction():
        if backend.dialect == "postgres":
            # Two processes starting against a fresh database must not both migrate (and even
            # CREATE TABLE IF NOT EXISTS races there); SQLite's BEGIN IMMEDIATE already serialises.
            backend.query("SELECT pg_advisory_xact_lock(7423310)")
        backend.execute(
            "CREATE TABLE IF NOT EXISTS haif_migrations "
            "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {row["name"] for row in backend.query("SELECT name FROM haif_migrations")}
        for name, statements in MIGRATIONS:
            if name in done:
                continue
            for statement in statements:
                backend.execute(statement)
            backend.execute(
                "INSERT INTO haif_migrations (name, applied_at) VALUES (:name, :at)",
                {"name": name, "at": datetime.now(UTC).isoformat()},
            )
            applied_now.append(name)
    return applied_now
