"""API keys: stored ones and those from HAIF_API_KEYS, each verified to an id of its own."""

from __future__ import annotations

from pathlib import Path

from haifctl.keys import KeyStore


def test_keys_from_the_environment_each_have_an_id(tmp_path: Path) -> None:
    """Per-key limits and usage rows go by the id: two keys from HAIF_API_KEYS must not share
    one."""
    store = KeyStore(tmp_path, env=" alpha-key , beta-key,,")
    assert store.enabled
    assert store.verify("alpha-key") == "env-1"
    assert store.verify("beta-key") == "env-2"
    assert store.verify("gamma-key") is None
    created, record = store.create("ci")
    assert store.verify(created) == record["id"]
    assert record["id"] not in ("env-1", "env-2")


def test_no_keys_means_the_bridge_is_open(tmp_path: Path) -> None:
    store = KeyStore(tmp_path, env="")
    assert not store.enabled
    assert store.verify("anything") is None
