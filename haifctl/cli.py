"""The `haifctl` command: wires the command groups together and turns errors into one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
import typer.main

from haifctl import __version__
from haifctl.commands import bench as bench_cmd
from haifctl.commands import cluster as cluster_cmd
from haifctl.commands import completion as completion_cmd
from haifctl.commands import config as config_cmd
from haifctl.commands import daemon as daemon_cmd
from haifctl.commands import embed as embed_cmd
from haifctl.commands import infer as infer_cmd
from haifctl.commands import join as join_cmd
from haifctl.commands import keys as keys_cmd
from haifctl.commands import logs as logs_cmd
from haifctl.commands import models as models_cmd
from haifctl.commands import ps as ps_cmd
from haifctl.commands import scale as scale_cmd
from haifctl.commands import top as top_cmd
from haifctl.commands import usage as usage_cmd
from haifctl.commands._shared import CliState, HomeOpt, RegistryUrlOpt, report_error, state
from haifctl.errors import HaifError, Kind

# The exit status of each kind of error, as README.md's "Errors" section documents them: 2 for bad
# input or unknown names, 3 for an unreachable service, 1 otherwise (70, EX_SOFTWARE, for a bug).
EXIT_CODES = {
    Kind.invalid: 2,
    Kind.not_found: 2,
    Kind.unauthorised: 1,
    Kind.forbidden: 1,
    Kind.overloaded: 1,
    Kind.unavailable: 3,
    Kind.timeout: 1,
    Kind.internal: 1,
}

app = typer.Typer(
    name="haifctl",
    help="Serve GGUF language models on llama.cpp: in-process, or as a cluster of daemons.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(infer_cmd.infer)
app.command()(embed_cmd.embed)
app.command()(cluster_cmd.up)
app.command()(cluster_cmd.down)
app.command()(cluster_cmd.status)
app.command()(scale_cmd.scale)
app.command()(logs_cmd.logs)
app.command()(top_cmd.top)
app.command()(ps_cmd.ps)
app.command()(bench_cmd.bench)
app.add_typer(models_cmd.app, name="models")
app.add_typer(config_cmd.app, name="config")
app.add_typer(keys_cmd.app, name="keys")
app.command()(completion_cmd.completion)
app.command()(usage_cmd.usage)
app.command()(daemon_cmd.worker)
app.command("join-token")(join_cmd.join_token)
app.add_typer(daemon_cmd.app, name="daemon", hidden=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"haifctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: HomeOpt = None,
    registry_url: RegistryUrlOpt = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Serve GGUF language models on llama.cpp: in-process, or as a cluster of daemons."""
    state(ctx).flags.update({"home": home, "registry_url": registry_url})


# Placeholders people read in --help and the man pages, by the option's Python type (Typer's own
# read `<int range>`, `<list[str]>`, and `<bool>` on flags that take no value).
PLACEHOLDERS: dict[Any, str] = {int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


def placeholder(annotation: Any) -> str:
    """The placeholder for an option's value: N, NUMBER, TEXT, PATH, or its choices."""
    if get_origin(annotation) is not None:  # list[str], str | None
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return placeholder(inner[0]) if inner else "VALUE"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "[" + "|".join(str(m.value) for m in annotation) + "]"
    return PLACEHOLDERS.get(annotation, "VALUE")


def _no_type(ctx: Any) -> None:
    return None


def _humanise(command: Any) -> None:
    """Help as click prints it, plainly: Rich markup would swallow every `[env: ...]` note
    (and print docstrings' hard wraps ragged); placeholders people read; flags without one."""
    command.rich_markup_mode = None
    for param in command.params:
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            param.metavar = (param.name or "").upper()
            param.display_type_rich = _no_type  # "PROMPT", not "PROMPT <str>"
        elif not (param.is_flag or param.count):
            param.metavar = placeholder(param.type_descriptor.annotation)
    for sub in getattr(command, "commands", {}).values():
        _humanise(sub)


def command() -> Any:
    """The click command behind ``app``, with the help people read (--help, man pages)."""
    root = typer.main.get_command(app)
    _humanise(root)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the app; print user errors as `error:`/`hint:` lines, never tracebacks.

    Usage errors (bad flags, unknown commands) are Typer's own, with exit code 2.
    """
    cli_state = CliState()
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        infer_cmd.check_json_flag(args)
        command()(args=args, prog_name="haifctl", obj=cli_state)
    except HaifError as exc:
        report_error(exc, cli_state.json_errors)
        sys.exit(EXIT_CODES[exc.kind])
    except KeyboardInterrupt:
        sys.stderr.write("\naborted\n")
        sys.exit(130)
    except BrokenPipeError:
        # `haifctl ... | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:  # a bug, not a user mistake: keep the traceback one flag away
        if os.environ.get("HAIF_DEBUG"):
            raise
        report_error(
            HaifError(
                "internal_error",
                f"internal error: {type(exc).__name__}: {exc}",
                "run again with HAIF_DEBUG=1 for the traceback, and report it",
            ),
            cli_state.json_errors,
        )
        sys.exit(70)
