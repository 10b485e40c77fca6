"""`haifctl keys`: API keys for the HTTP bridge."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from haifctl.commands._shared import JsonFlag, print_json, state, stdout, want_json
from haifctl.keys import KeyStore

app = typer.Typer(
    no_args_is_help=True, help="Create, list and revoke API keys for the HTTP bridge."
)


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="A label for the key.")] = "default",
    json: JsonFlag = False,
) -> None:
    """Create a key; it is printed once and stored only as a hash.

    Examples:

      haifctl keys create --name ci

      haifctl keys create --name ci --json | jq -r .key
    """
    want_json(ctx, json)
    key, record = KeyStore(state(ctx).settings().home).create(name)
    if json:
        print_json({"key": key, **{k: v for k, v in record.items() if k != "hash"}})
        return
    out = stdout()
    out.print(key, markup=False)
    out.print(f"[dim]{record['id']} ({name}); store it now: it is not shown again[/dim]")


@app.command("list")
def list_keys(ctx: typer.Context, json: JsonFlag = False) -> None:
    """List keys (ids, names and prefixes; never the keys).

    Examples:

      haifctl keys list
    """
    want_json(ctx, json)
    keys = KeyStore(state(ctx).settings().home).list()
    if json:
        print_json(keys)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "PREFIX", "CREATED"):
        table.add_column(column)
    for k in keys:
        table.add_row(k["id"], k["name"], k["prefix"] + "…", k["created_at"])
    stdout().print(table)


@app.command()
def revoke(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The key's id or name.", show_default=False)],
) -> None:
    """Revoke a key; the bridge refuses it from the next request on.

    With HAIF_REDIS_URL set, the revocation is recorded in Redis first, so that every gateway
    sharing it refuses the key within a second, whichever bridge it comes through.

    Examples:

      haifctl keys revoke ci
    """
    settings = state(ctx).settings()
    store = KeyStore(settings.home)
    if settings.redis_url:
        from haifctl.coordination import revoke_shared

        found = [k for k in store.list() if key in (k["id"], k["name"])]
        if found:  # an unknown key fails below, with the usual error
            revoke_shared(settings.redis_url, settings.redis_prefix, found[0]["id"])
    record = store.revoke(key)
    shared = ", and by every gateway sharing Redis within a second" if settings.redis_url else ""
    stdout().print(f"revoked {record['id']} ({record['name']}){shared}")
