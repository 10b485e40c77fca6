"""What the registry checks at the door, the same on SQLite and Postgres: default parameters,
a model found by its file's path, parameters edited after register."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from haifctl.errors import InvalidInput, NotFound
from haifctl.registry.service import Registry, open_registry


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    reg = open_registry(registry_url)
    yield reg
    reg.close()


@pytest.fixture
def gguf(model_path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(model_path, tmp_path / "tiny.gguf"))


def test_params_are_checked_at_register(registry: Registry, gguf: Path) -> None:
    with pytest.raises(InvalidInput, match="temprature is not a sampling parameter") as info:
        registry.register(gguf, name="tiny", params={"temprature": 0.5})
    assert info.value.hint.startswith("did you mean temperature?")
    with pytest.raises(InvalidInput, match=re.escape("temperature: expected `float`, got `str`")):
        registry.register(gguf, name="tiny", params={"temperature": "hot"})
    with pytest.raises(InvalidInput, match=re.escape("top_p: expected `float` <= 1.0")):
        registry.register(gguf, name="tiny", params={"top_p": 2})
    assert registry.versions("tiny") == []  # nothing half-written
    record = registry.register(gguf, name="tiny", params={"temperature": 0.5, "stop": ["\n"]})
    assert record.params == {"temperature": 0.5, "stop": ["\n"]}


def test_set_params(registry: Registry, gguf: Path) -> None:
    registry.register(gguf, name="tiny", params={"temperature": 0.5})
    record = registry.set_params("tiny", {"top_k": 10})
    assert record.params == {"temperature": 0.5, "top_k": 10}
    record = registry.set_params("tiny:1", {}, unset=["temperature"])
    assert record.params == {"top_k": 10}
    with pytest.raises(InvalidInput, match=re.escape("top_k: expected `int` >= 0")):
        registry.set_params("tiny", {"top_k": -1})
    with pytest.raises(NotFound, match="has no parameter 'seed' set"):
        registry.set_params("tiny", {}, unset=["seed"])
    assert registry.resolve("tiny").params == {"top_k": 10}


def test_a_registered_file_resolves_by_its_path(registry: Registry, gguf: Path) -> None:
    registry.register(gguf, name="tiny")
    registry.register(gguf, name="tiny", version="2", params={"seed": 1})
    assert registry.resolve(str(gguf.resolve())).ref == "tiny:2"  # the newest, as NAME alone
    registry.set_default("tiny:1")
    assert registry.resolve(str(gguf.parent / "." / gguf.name)).ref == "tiny:1"
    with pytest.raises(NotFound, match="no registered model has the file") as info:
        registry.resolve(str(gguf.parent / "other.gguf"))
    assert "--local" in info.value.hint
    with pytest.raises(InvalidInput, match="is relative"):
        registry.resolve("models/tiny.gguf")
