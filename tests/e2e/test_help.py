"""Every command's --help, as a user reads it: its environment variables, placeholders people
read, at least one example, and prose that wraps cleanly."""

from __future__ import annotations

import itertools
import re

from haifctl.config import SETTINGS
from tests.e2e.conftest import Run

# An option named after a setting (--n-ctx for n_ctx) is that setting: its help names the
# variables that set it too.
ENV_OF = {"--" + s.name.replace("_", "-"): s.env for s in SETTINGS}
# bench's --model and --max-tokens describe its load on any server, not this machine's settings
# options that share a setting's name but are not that setting: a load's own context size
NOT_SETTINGS = {
    (("bench",), "--model"),
    (("bench",), "--max-tokens"),
    (("models", "load"), "--n-ctx"),
}
WIDTH = 80


def commands(haifctl: Run, *path: str) -> list[tuple[str, ...]]:
    """Every visible command under ``path``, from the help's own listing."""
    text = haifctl(*path, "--help", env={"COLUMNS": str(WIDTH)}).stdout
    if "\nCommands:\n" not in text:
        return [path]
    listing = text.split("\nCommands:\n", 1)[1]
    names = [m.group(1) for m in re.finditer(r"^  ([a-z][a-z-]*)\s", listing, re.M)]
    return [c for name in names for c in commands(haifctl, *path, name)]


def ragged(text: str) -> list[str]:
    """Prose lines cut short though the next word of the same paragraph would have fit."""
    lines = text.splitlines()
    out = []
    for line, following in itertools.pairwise(lines):
        indent = len(line) - len(line.lstrip())
        if not line.strip() or not following.strip() or indent != 2:
            continue
        if len(following) - len(following.lstrip()) != indent:
            continue
        word = following.split()[0]
        if len(line) + 1 + len(word) <= WIDTH - 2:
            out.append(line)
    return out


def test_every_command_shows_its_settings_an_example_and_clean_prose(haifctl: Run) -> None:
    found = commands(haifctl)
    assert ("infer",) in found
    assert ("models", "set") in found
    assert ("logs",) in found
    assert len(found) > 20
    for path in found:
        proc = haifctl(*path, "--help", env={"COLUMNS": str(WIDTH)})
        assert proc.returncode == 0, (path, proc.stderr)
        text = proc.stdout
        assert re.search(r"^  Examples\b.*:$", text, re.M), path
        example = re.split(r"^  Examples\b.*:$", text, flags=re.M)[1].split("\n\n")[1].strip()
        assert "haifctl" in example, (path, example)
        for bad in ("<bool>", "<str>", "<int", "<float", "<list[", "<Path>"):
            assert bad not in text, (path, bad)
        prose = re.split(r"^(Arguments|Options|Commands):$", text, flags=re.M)[0]
        assert not ragged(prose), (path, ragged(prose))
        for option, env in ENV_OF.items():
            if (path, option) in NOT_SETTINGS:
                continue
            if re.search(rf"^\s+(-\w, )?{re.escape(option)}[ ,\n]", text, re.M):
                flat = " ".join(text.split())
                noted = {
                    v for note in re.findall(r"\[env: ([^\]]*)\]", flat) for v in note.split(", ")
                }
                assert set(env) <= noted, (path, option)


def test_help_shows_env_notes_and_placeholders(haifctl: Run) -> None:
    text = " ".join(haifctl("infer", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "-m, --model TEXT Model NAME[:VERSION], alias, or .gguf path. [env: HAIF_MODEL, " in text
    assert "--n-ctx N Context window in tokens. [env: HAIF_N_CTX]" in text
    assert "--ignore-eos Generate" in text  # a flag takes no placeholder
    assert "-o, --output [text|json]" in text
    assert "--stop TEXT Stop at this string (repeatable)." in text
    root = " ".join(haifctl("--help").stdout.split())
    assert "--home PATH haifctl home: config.toml and registry.db. [env: HAIF_HOME]" in root


def test_infer_json_without_a_file_says_what_was_meant(haifctl: Run) -> None:
    for args in (("infer", "Once", "--json"), ("infer", "Once", "--json", "-n", "4")):
        proc = haifctl(*args)
        assert proc.returncode == 2
        assert proc.stderr.splitlines() == [
            "error: --json reads a request from a FILE, and none was given",
            "hint: for JSON output use --output json (-o json); for a request on stdin, --json -",
        ]
    proc = haifctl("infer", "--json", "-o", "json")
    assert proc.returncode == 2
    assert "--output json" in proc.stderr
