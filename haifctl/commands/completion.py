"""`haifctl completion`: print a shell's completion script, and the names it asks for."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from haifctl.commands._shared import state
from haifctl.errors import HaifError, InvalidInput


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


class Names(StrEnum):
    models = "models"
    daemons = "daemons"


def completion(
    ctx: typer.Context,
    shell: Annotated[
        Shell | None, typer.Argument(help="bash, zsh or fish.", show_default=False)
    ] = None,
    names: Annotated[
        Names | None,
        typer.Option(
            "--names",
            hidden=True,  # what the scripts run for names only haifctl knows
            help="Print the registered models' names, or the daemons that have logs.",
        ),
    ] = None,
) -> None:
    """Print the completion script for SHELL (bash, zsh or fish).

    It completes commands, options and their choices, and asks haifctl for the names only it
    knows: registered models (--model, models show...) and daemons with logs (logs).

    Install it once (then open a new shell; for zsh, ~/.zfunc must be on $fpath before
    compinit runs):

    \b
      bash: haifctl completion bash > ~/.local/share/bash-completion/completions/haifctl
      zsh:  haifctl completion zsh > ~/.zfunc/_haifctl
      fish: haifctl completion fish > ~/.config/fish/completions/haifctl.fish

    The pip package also installs the scripts (and the man pages) under its prefix's share/
    directory, where bash-completion, zsh and fish look when that prefix is /usr/local or /usr.

    Examples:

      source <(haifctl completion bash)

      haifctl completion zsh > ~/.zfunc/_haifctl
    """
    if names is not None:
        _print_names(ctx, names)
        return
    if shell is None:
        raise InvalidInput("missing_shell", "which shell?", "haifctl completion bash, zsh or fish")
    from haifctl import docgen

    tree = docgen.command_tree()
    script = {Shell.bash: docgen.bash, Shell.zsh: docgen.zsh, Shell.fish: docgen.fish}[shell]
    sys.stdout.write(script(tree))


def _print_names(ctx: typer.Context, names: Names) -> None:
    """One name a line, or nothing: a completion must never print an error into a prompt."""
    try:
        settings = state(ctx).settings()
        if not settings.home.is_dir():  # nothing registered or logged yet; create nothing
            return
        if names is Names.daemons:
            from haifctl.daemon.state import log_dir

            found = sorted(
                p.name.removesuffix(".log") for p in log_dir(settings.home).glob("*.log")
            )
        else:
            from haifctl.commands._dispatch import open_cli_registry

            with open_cli_registry(settings) as registry:
                records = registry.all()
            found = sorted(
                {r.name for r in records}
                | {r.ref for r in records}
                | {a for r in records for a in r.aliases}
            )
    except (HaifError, OSError):
        return
    sys.stdout.write("".join(f"{n}\n" for n in found))
