"""What every command shares: the per-invocation state, option aliases and output helpers."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from haifctl.config import Settings, resolve
from haifctl.errors import HaifError


@dataclass
class CliState:
    """Lives in click's ``ctx.obj`` for one invocation: global flags and the resolved settings."""

    flags: dict[str, Any] = field(default_factory=dict)
    json_errors: bool = False
    _settings: Settings | None = None

    def settings(self, **flags: Any) -> Settings:
        """Resolve the settings once, from global flags plus this command's own."""
        if self._settings is None:
            self._settings = resolve({**self.flags, **flags})
        return self._settings


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    if not isinstance(obj, CliState):  # invoked without haifctl.cli.main (e.g. a test runner)
        obj = CliState()
        ctx.find_root().obj = obj
    return obj


def want_json(ctx: typer.Context, on: bool) -> bool:
    """Record that this command speaks JSON, so errors come out as JSON too."""
    state(ctx).json_errors = on
    return on


# Shared options, declared once.  Environment variables are resolved by haifctl.config (so that
# `config show` can say where each value came from), and named here for --help.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model NAME[:VERSION], alias, or .gguf path. [env: HAIF_MODEL, MODEL_ID]",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON, for scripts.")]
NCtxOpt = Annotated[
    int | None, typer.Option("--n-ctx", help="Context window in tokens. [env: HAIF_N_CTX]")
]
GpuLayersOpt = Annotated[
    int | None,
    typer.Option(
        "--n-gpu-layers", help="Layers to offload to the GPU, -1 for all. [env: HAIF_N_GPU_LAYERS]"
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="CPU threads, 0 for automatic. [env: HAIF_THREADS]")
]
LocalFlag = Annotated[
    bool, typer.Option("--local", help="Run in-process even when a cluster is up.")
]
GatewayOpt = Annotated[
    str | None,
    typer.Option(
        "--gateway",
        help="A cluster gateway, tcp://HOST:PORT. [env: GATEWAY_URL]",
        show_default=False,
    ),
]
HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="haifctl home: config.toml and registry.db. [env: HAIF_HOME]",
        show_default=False,
    ),
]
RegistryUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--registry-url",
        help="sqlite:///PATH or postgresql://... [env: HAIF_REGISTRY_URL]",
        show_default=False,
    ),
]


def human_size(n: int) -> str:
    """Bytes as people read them (decimal units, as disks are sold)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def stdout() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        # Piped output is for grep and scripts: never truncate a table cell to 80 columns.
        console.width = 1000
    return console


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def report_error(error: HaifError, as_json: bool) -> None:
    """One `error:` line and one `hint:` line on stderr, or a JSON error object on stdout."""
    if as_json:
        print_json(error.to_dict())
        return
    sys.stderr.write(f"error: {error.message}\n")
    if error.hint:
        sys.stderr.write(f"hint: {error.hint}\n")
    sys.stderr.flush()
