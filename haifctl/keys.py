"""API keys for the HTTP bridge: stored hashed (sha256) in HOME/keys.json, compared in constant
time.  ``HAIF_API_KEYS`` (comma-separated) adds keys from the environment, for containers."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from haifctl.errors import InvalidInput, NotFound
from haifctl.files import private_dir

PREFIX = "haif-"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, home: Path, env: str | None = None) -> None:
        self.path = home / "keys.json"
        listed = env if env is not None else os.environ.get("HAIF_API_KEYS", "")
        keys = [k.strip() for k in listed.split(",") if k.strip()]
        # ids by position (env-1, env-2, ...): each key its own limits and usage rows, and
        # nothing of the key in them
        self.env_hashes = [(f"env-{i}", _hash(k)) for i, k in enumerate(keys, 1)]
        self._mtime: float | None = None
        self._keys: list[dict[str, Any]] = []

    def _load(self) -> list[dict[str, Any]]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._mtime, self._keys = None, []
            return self._keys
        if mtime != self._mtime:  # re-read after `haifctl keys create|revoke`
            data = json.loads(self.path.read_text())
            self._keys = list(data.get("keys", [])) if isinstance(data, dict) else []
            self._mtime = mtime
        return self._keys

    def _save(self, keys: list[dict[str, Any]]) -> None:
        private_dir(self.path.parent)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": keys}, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.path)
        self._mtime = None

    @property
    def enabled(self) -> bool:
        return bool(self.env_hashes or self._load())

    def create(self, name: str) -> tuple[str, dict[str, Any]]:
        keys = self._load()
        if any(k["name"] == name for k in keys):
            raise InvalidInput("key_exists", f"a key named {name!r} exists", "pick another --name")
        key = PREFIX + secrets.token_urlsafe(32)
        record = {
            "id": "key_" + secrets.token_hex(6),
            "name": name,
            "prefix": key[: len(PREFIX) + 4],
            "hash": _hash(key),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._save([*keys, record])
        return key, record

    def list(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "hash"} for r in self._load()]

    def revoke(self, id_or_name: str) -> dict[str, Any]:
        keys = self._load()
        kept = [k for k in keys if id_or_name not in (k["id"], k["name"])]
        if len(kept) == len(keys):
            raise NotFound("key_not_found", f"no key {id_or_name!r}", "`haifctl keys list`")
        self._save(kept)
        return next(k for k in keys if id_or_name in (k["id"], k["name"]))

    def verify(self, key: str) -> str | None:
        """The key's id if it is valid, else None.  Every stored hash is compared."""
        digest = _hash(key)
        found = None
        for key_id, stored in [*self.env_hashes, *((k["id"], k["hash"]) for k in self._load())]:
            if hmac.compare_digest(digest, stored):
                found = key_id
        return found
