"""`haifctl config`: see the resolved configuration."""

from __future__ import annotations

import typer
from rich.table import Table

from haifctl.commands._shared import JsonFlag, print_json, state, stdout, want_json
from haifctl.config import SETTINGS

app = typer.Typer(no_args_is_help=True, help="Show the configuration and where it comes from.")


@app.command()
def show(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Print every setting, its value and its source (flag, env, file or default).

    Precedence: command-line flag > environment > config file (HOME/config.toml) > default.
    Secrets are masked.

    Examples:

      haifctl config show

      HAIF_N_CTX=8192 haifctl config show --json
    """
    want_json(ctx, json)
    settings = state(ctx).settings()
    if json:
        print_json(
            {
                "config_file": str(settings.config_file),
                "settings": {
                    s.name: {
                        "value": settings.display_value(s.name),
                        "source": settings.sources[s.name],
                    }
                    for s in SETTINGS
                },
            }
        )
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("SETTING", "VALUE", "SOURCE", "ENV"):
        table.add_column(column)
    for s in SETTINGS:
        table.add_row(
            s.name, settings.display_value(s.name), settings.sources[s.name], ", ".join(s.env)
        )
    console = stdout()
    console.print(table)
    exists = "" if settings.config_file.exists() else " (not present)"
    console.print(f"\nconfig file: {settings.config_file}{exists}")


@app.command()
def path(ctx: typer.Context) -> None:
    """Print the path of the config file.

    Examples:

      $EDITOR "$(haifctl config path)"
    """
    stdout().print(str(state(ctx).settings().config_file))
