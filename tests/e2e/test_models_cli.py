"""`haifctl models` and `haifctl config` as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import Run


@pytest.fixture
def tiny(model_path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(model_path, tmp_path / "tiny-story.gguf"))


@pytest.fixture(params=["sqlite", "postgres"])
def backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    return {"HAIF_REGISTRY_URL": request.getfixturevalue("postgres_url")}


def test_register_list_show_alias_rm(haifctl: Run, tiny: Path, backend_env: dict[str, str]) -> None:
    def run(*args: str) -> str:
        proc = haifctl(*args, env=backend_env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = run(
        "models",
        "register",
        str(tiny),
        "--alias",
        "story",
        "--param",
        "temperature=0.3",
        "--param",
        'stop=["END"]',
    )
    assert "registered tiny-story:1" in out
    run("models", "register", str(tiny), "--name", "tiny-story", "--version", "2")
    listing = json.loads(run("models", "list", "--json"))
    assert [(m["name"], m["version"]) for m in listing] == [
        ("stories260K", "1"),
        ("tiny-story", "2"),
        ("tiny-story", "1"),
    ]
    table = run("models", "list")
    assert "tiny-story" in table
    assert "story" in table
    assert "2048" in table
    shown = json.loads(run("models", "show", "story", "--json"))
    assert shown["version"] == "1"
    assert shown["params"] == {"temperature": 0.3, "stop": ["END"]}
    assert shown["sha256"] == "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d"
    assert "architecture" in run("models", "show", "tiny-story")
    assert "tiny-story -> tiny-story:1" in run("models", "default", "tiny-story:1")
    assert json.loads(run("models", "show", "tiny-story", "--json"))["version"] == "1"
    assert "prod -> tiny-story:2" in run("models", "alias", "prod", "tiny-story:2")
    assert "deployed" in run("models", "status", "prod", "deployed")
    # inference goes through the registry and uses the registered defaults
    result = json.loads(run("infer", "Once", "-m", "prod", "-n", "5", "-o", "json"))
    assert result["model"] == "tiny-story:2"
    run("models", "alias", "prod", "--rm")
    assert "removed tiny-story:1" in run("models", "rm", "tiny-story:1")
    assert [
        m["version"]
        for m in json.loads(run("models", "list", "--json"))
        if m["name"] == "tiny-story"
    ] == ["2"]


def test_register_errors_leave_nothing_behind(haifctl: Run, tiny: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:300_000])
    cases = [
        (["models", "register", str(cut)], "truncated or corrupt"),
        (["models", "register", str(tmp_path / "missing.gguf")], "no such file"),
        (["models", "register", str(tiny), "--param", "colour=red"], "not a sampling parameter"),
        (["models", "register", str(tiny), "--param", "novalue"], "is not key=value"),
        (["models", "register", str(tiny), "--name", "a b"], "name 'a b' is not allowed"),
        (["models", "register", str(tiny), "--alias", "stories260K"], "already a model name"),
    ]
    for args, message in cases:
        proc = haifctl(*args)
        assert proc.returncode != 0, args
        assert proc.stderr.startswith("error: "), proc.stderr
        assert message in proc.stderr, proc.stderr
    listing = json.loads(haifctl("models", "list", "--json").stdout)
    assert [m["name"] for m in listing] == ["stories260K"]


def test_models_errors(haifctl: Run, tiny: Path) -> None:
    assert haifctl("models", "register", str(tiny), "--version", "1").returncode == 0
    assert haifctl("models", "register", str(tiny), "--version", "2").returncode == 0
    proc = haifctl("models", "rm", "tiny-story")
    assert proc.returncode == 2
    assert "has 2 versions" in proc.stderr
    assert "--all" in proc.stderr
    proc = haifctl("models", "show", "tiny-storyy", "--json")
    assert json.loads(proc.stdout)["error"]["hint"].startswith("did you mean tiny-story")
    proc = haifctl("models", "status", "tiny-story", "asleep")
    assert proc.returncode == 2
    assert "unknown status" in proc.stderr
    assert haifctl("models", "rm", "tiny-story", "--all").returncode == 0


def test_missing_model_file_is_explained(haifctl: Run, tiny: Path) -> None:
    assert haifctl("models", "register", str(tiny)).returncode == 0
    tiny.unlink()
    proc = haifctl("infer", "x", "-m", "tiny-story")
    assert proc.returncode == 2
    assert "the file of tiny-story:1 is gone" in proc.stderr
    assert "re-register" in proc.stderr


def test_config_show_says_where_values_come_from(haifctl: Run, home: Path) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text("max_tokens = 99\nthreads = 2\n")
    proc = haifctl(
        "--registry-url",
        f"sqlite://{home}/other.db",
        "config",
        "show",
        "--json",
        env={"MODEL_ID": "tiny", "POSTGRES_PASSWORD": "hunter2"},
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)["settings"]
    assert shown["registry_url"] == {"value": f"sqlite://{home}/other.db", "source": "flag"}
    assert shown["model"] == {"value": "tiny", "source": "env MODEL_ID"}
    assert shown["max_tokens"]["source"] == f"file {home / 'config.toml'}"
    assert shown["n_ctx"] == {"value": "4096", "source": "default"}
    assert shown["postgres_password"]["value"] == "********"
    table = haifctl("config", "show", env={"POSTGRES_PASSWORD": "hunter2"}).stdout
    assert "hunter2" not in table
    assert "env HAIF_HOME" in table


def test_bad_config_file_is_reported(haifctl: Run, home: Path) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text("max_tokens = [")
    proc = haifctl("config", "show")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {home / 'config.toml'} is not valid TOML")
