"""`haifctl join-token`: let a worker on another machine join the cluster."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from haifctl import security
from haifctl.commands._shared import JsonFlag, print_json, state, stdout, want_json
from haifctl.errors import InvalidInput, NotFound


def join_token(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Option("--name", help="A name for the worker the token is for (its label)."),
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the tokens made so far.")] = False,
    revoke: Annotated[
        str | None,
        typer.Option("--revoke", help="Revoke the token of this name: its worker is refused."),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Print a token that lets a worker on another machine join this cluster.

    Every ZeroMQ link of the cluster is encrypted and authenticated (CURVE); the daemons that
    `haifctl up` starts share the keys in this haifctl home.  A worker elsewhere needs its own:
    the token holds the orchestrator's public key and a key pair made for that worker, whose
    public half the orchestrator now accepts (until revoked).  Keep it secret.

    Examples (a token here, then the worker on the other machine):

      haifctl join-token --name gpu-box

      haifctl worker --orchestrator tcp://THIS-HOST:PORT --join haif1-...
    """
    want_json(ctx, json)
    keyring = security.local(state(ctx).settings().home)
    if revoke is not None:
        if not keyring.revoke(revoke):
            raise NotFound("unknown_token", f"no join token named {revoke!r}", "see --list")
        stdout().print(f"revoked {revoke}: its worker is refused from its next connection on")
        return
    if list_:
        joined = keyring.joined()
        if json:
            print_json([{"name": n, **entry} for n, entry in joined.items()])
            return
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("NAME", "PUBLIC KEY", "CREATED"):
            table.add_column(column)
        for n, entry in joined.items():
            table.add_row(n, entry.get("public", ""), entry.get("created_at", ""))
        stdout().print(table)
        return
    name = name or f"worker-{len(keyring.joined()) + 1}"
    if name in keyring.joined():
        raise InvalidInput(
            "token_exists", f"a join token named {name!r} exists", "revoke it first, or pick --name"
        )
    token = keyring.join_token(name)
    if json:
        print_json({"name": name, "token": token})
        return
    stdout().print(token, markup=False, soft_wrap=True)
