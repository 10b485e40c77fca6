"""Completions and man pages are generated from the Typer app; they must match it and work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def test_generated_files_match_the_code() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gendocs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "man").glob("*.1")))
def test_man_pages_render_without_warnings(page: str) -> None:
    require("man")
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(ROOT / "man" / page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "haifctl" in proc.stdout
    assert "SYNOPSIS" in proc.stdout


def bash_complete(line: str) -> list[str]:
    script = (
        f"source {ROOT / 'completions' / 'haifctl.bash'}\n"
        f"COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n"
        "[[ $line == *' ' ]] && true\n"
        "_haifctl; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_bash_completion_knows_commands_options_and_choices() -> None:
    assert bash_complete("haifctl m") == ["models"]
    assert bash_complete("haifctl models re") == ["register"]
    assert set(bash_complete("haifctl infer --max")) == {"--max-tokens"}
    assert bash_complete("haifctl infer --output j") == ["json"]
    assert "--all" in bash_complete("haifctl models rm --")
    assert bash_complete("haifctl config s") == ["show"]


@pytest.mark.parametrize(("shell", "script"), [("zsh", "_haifctl"), ("fish", "haifctl.fish")])
def test_other_shells_parse_their_scripts(shell: str, script: str) -> None:
    exe = require(shell)
    proc = subprocess.run(
        [exe, "-n", str(ROOT / "completions" / script)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "source", sorted(p.name for p in (ROOT / "docs" / "architecture").glob("*.puml"))
)
def test_architecture_diagrams_render(source: str, tmp_path: Path) -> None:
    plantuml = require("plantuml")
    shutil.copy(ROOT / "docs" / "architecture" / source, tmp_path / source)
    proc = subprocess.run(
        [plantuml, "-tpng", "-failfast2", str(tmp_path / source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # without Graphviz plantuml still writes a PNG: one that shows an error message
    assert "Exception" not in proc.stderr, proc.stderr[-2000:]
    images = list(tmp_path.glob("*.png"))
    assert len(images) == 1
    assert images[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert images[0].stat().st_size > 20_000
