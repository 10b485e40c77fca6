"""`haifctl completion SHELL` prints the scripts the repository ships, they complete the names
only haifctl knows (models, daemons), and the wheel carries them and the man pages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import require
from tests.e2e.conftest import HAIFCTL, Run

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"bash": "haifctl.bash", "zsh": "_haifctl", "fish": "haifctl.fish"}


@pytest.mark.parametrize("shell", sorted(SCRIPTS))
def test_completion_prints_the_shipped_script(haifctl: Run, shell: str) -> None:
    proc = haifctl("completion", shell)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (ROOT / "completions" / SCRIPTS[shell]).read_text()
    assert "haifctl completion --names models" in proc.stdout
    binary = require(shell, shell)
    check = subprocess.run([binary, "-n"], input=proc.stdout, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_completion_help_says_how_to_install(haifctl: Run) -> None:
    text = haifctl("completion", "--help").stdout
    assert "~/.local/share/bash-completion/completions/haifctl" in text
    assert "~/.config/fish/completions/haifctl.fish" in text
    assert "$fpath" in text
    missing = haifctl("completion")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: which shell?")


def bash_complete(home: Path, line: str) -> list[str]:
    """What TAB offers after ``line`` in bash, with the script `haifctl completion bash` prints."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    script = (
        "source <(haifctl completion bash)\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        "_haifctl; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    env = {
        **os.environ,
        "HAIF_HOME": str(home),
        "PATH": f"{Path(HAIFCTL).parent}{os.pathsep}{os.environ['PATH']}",
    }
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return sorted(out.stdout.split())


def test_names_only_haifctl_knows_are_completed(haifctl: Run, home: Path, model_path: Path) -> None:
    reg = haifctl("models", "register", str(model_path), "--name", "tiny", "--alias", "small")
    assert reg.returncode == 0, reg.stderr
    assert bash_complete(home, "haifctl infer --model ti") == ["tiny", "tiny:1"]
    assert bash_complete(home, "haifctl models show s") == ["small", "stories260K", "stories260K:1"]
    assert bash_complete(home, "haifctl models rm tiny") == ["tiny", "tiny:1"]
    assert bash_complete(home, "haifctl top --sort l") == ["load"]
    (home / "logs").mkdir()
    for name in ("gateway", "worker-1", "worker-2"):
        (home / "logs" / f"{name}.log").write_text("")
    assert bash_complete(home, "haifctl logs wor") == ["worker-1", "worker-2"]
    assert haifctl("completion", "--names", "daemons").stdout.split() == [
        "gateway",
        "worker-1",
        "worker-2",
    ]
    # a home that does not exist yet: nothing to offer, and nothing created
    fresh = home.parent / "fresh"
    assert bash_complete(fresh, "haifctl infer -m ") == []
    assert not fresh.exists()


def test_the_wheel_ships_man_pages_and_completions(tmp_path: Path) -> None:
    # pip builds in an isolated environment with the build requirements pyproject.toml names,
    # fetched from the package index
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    offline = ("No matching distribution", "Could not find a version", "connection")
    if proc.returncode != 0 and any(s in proc.stdout + proc.stderr for s in offline):
        pytest.skip("building a wheel needs the package index for setuptools: " + proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("haifctl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    data = next(n.split("/", 1)[0] for n in names if ".data/" in n)
    for page in (ROOT / "man").glob("*.1"):
        assert f"{data}/data/share/man/man1/{page.name}" in names
    assert f"{data}/data/share/bash-completion/completions/haifctl.bash" in names
    assert f"{data}/data/share/zsh/site-functions/_haifctl" in names
    assert f"{data}/data/share/fish/vendor_completions.d/haifctl.fish" in names
