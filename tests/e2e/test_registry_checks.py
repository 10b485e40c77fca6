"""The registry checks what it is given at the door: sampling parameters against the request
schema (with suggestions), registry URLs, and says what `models rm` takes with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Run


def show(haifctl: Run, ref: str) -> dict:
    proc = haifctl("models", "show", ref, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_params_are_checked_when_registered(haifctl: Run, model_path: Path) -> None:
    cases = [
        ("temperature=hot", "error: --param: temperature: expected `float`, got `str`", "JSON"),
        ("temprature=0.5", "error: --param temprature is not a sampling parameter", "temperature?"),
        ("top_k=-3", "error: --param: top_k: expected `int` >= 0", "e.g."),
        ("max_tokens=0", "error: --param: max_tokens: expected `int` >= 1", "e.g."),
    ]
    for param, said, hint in cases:
        proc = haifctl("models", "register", str(model_path), "--name", "t", "--param", param)
        assert proc.returncode == 2, (param, proc.stderr)
        lines = proc.stderr.splitlines()
        assert lines[0] == said
        assert lines[1].startswith("hint: ")
        assert hint in lines[1]
    assert (
        "did you mean temperature?"
        in haifctl("models", "register", str(model_path), "--param", "temprature=1").stderr
    )
    listed = json.loads(haifctl("models", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["stories260K"]  # nothing half-registered

    ok = haifctl("models", "register", str(model_path), "--name", "t", "--param", "top_k=20")
    assert ok.returncode == 0, ok.stderr
    assert show(haifctl, "t")["params"] == {"top_k": 20}


def test_models_set_edits_params(haifctl: Run, model_path: Path) -> None:
    assert haifctl("models", "register", str(model_path), "--name", "t").returncode == 0
    proc = haifctl("models", "set", "t", "--param", "temperature=0.3", "--param", 'stop=["\\n"]')
    assert proc.returncode == 0, proc.stderr
    assert "t:1: parameters" in proc.stdout
    assert show(haifctl, "t")["params"] == {"temperature": 0.3, "stop": ["\n"]}
    assert haifctl("models", "set", "t", "--unset", "stop").returncode == 0
    assert show(haifctl, "t")["params"] == {"temperature": 0.3}
    # the defaults reach inference
    out = json.loads(haifctl("infer", "Once", "-n", "4", "-m", "t", "-o", "json").stdout)
    assert out["model"] == "t:1"

    bad = haifctl("models", "set", "t", "--param", "temperature=9")
    assert bad.returncode == 2
    assert "temperature: expected `float` <= 5.0" in bad.stderr
    assert show(haifctl, "t")["params"] == {"temperature": 0.3}  # unchanged
    assert "did you mean top_p" in haifctl("models", "set", "t", "--param", "top-p=1").stderr
    nothing = haifctl("models", "set", "t")
    assert nothing.returncode == 2
    assert "nothing to change" in nothing.stderr
    missing = haifctl("models", "set", "t", "--unset", "seed")
    assert missing.returncode == 2
    assert "has no parameter 'seed' set" in missing.stderr
    assert haifctl("models", "set", "ghost", "--param", "seed=1").returncode == 2


def test_rm_says_what_else_it_removes(haifctl: Run, model_path: Path) -> None:
    assert haifctl("models", "register", str(model_path), "--name", "m").returncode == 0
    reg = haifctl(
        "models", "register", str(model_path), "--name", "m", "--alias", "prod", "--default"
    )
    assert reg.returncode == 0, reg.stderr
    proc = haifctl("models", "rm", "m:2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "removed m:2 (and its alias prod; it was m's default version: m now means m:1)"
    )
    assert haifctl("models", "show", "prod").returncode == 2
    assert (
        haifctl("models", "register", str(model_path), "--name", "m", "--default").returncode == 0
    )
    data = json.loads(haifctl("models", "rm", "m", "--all", "--json").stdout)
    assert data == {
        "removed": ["m:2", "m:1"],
        "aliases_removed": [],
        "default_removed": ["m:2"],
        "name_now_means": {"m": None},
    }
    assert "--json" in haifctl("models", "rm", "--help").stdout
    assert "table" not in haifctl("models", "rm", "--help").stdout


@pytest.mark.parametrize(
    ("url", "said", "hint"),
    [
        ("sqlite://relative.db", "names a relative path", "use an absolute one: sqlite:///"),
        ("sqlite:///{tmp}/no/such/dir/r.db", "which does not exist", "mkdir -p"),
    ],
)
def test_registry_urls_are_checked(
    haifctl: Run, tmp_path: Path, home: Path, url: str, said: str, hint: str
) -> None:
    url = url.format(tmp=str(tmp_path).lstrip("/"))
    before = set(os.listdir(tmp_path))
    for args in (("--registry-url", url, "models", "list"), ("models", "list")):
        proc = haifctl(*args, env={"HAIF_REGISTRY_URL": url})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()
        assert lines[0].startswith("error: the registry URL")
        assert said in lines[0]
        assert hint in lines[1]
    # the registry daemon refuses it the same way (and creates nothing either)
    daemon = subprocess.run(
        [sys.executable, "-m", "haifctl", "daemon", "registry", "--bind", "tcp://127.0.0.1:0"],
        capture_output=True,
        text=True,
        env={**os.environ, "HAIF_REGISTRY_URL": url},
        cwd=tmp_path,
        timeout=60,
    )
    assert daemon.returncode == 2, daemon.stderr + daemon.stdout
    assert said in daemon.stderr + daemon.stdout
    # no registry file, no directory (haifctl's own home aside)
    assert set(os.listdir(tmp_path)) - {"home"} == before - {"home"}
    assert not (Path.cwd() / "relative.db").exists()
