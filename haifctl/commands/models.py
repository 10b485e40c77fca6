"""`haifctl models`: the model registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from haifctl import wire
from haifctl.commands._dispatch import open_cli_registry
from haifctl.commands._shared import (
    JsonFlag,
    human_size,
    print_json,
    state,
    stderr,
    stdout,
    want_json,
)
from haifctl.errors import InvalidInput, NotFound
from haifctl.gguf_info import check_model_path, read_facts
from haifctl.registry.service import STATUSES, ModelRecord, check_params, parse_params

app = typer.Typer(no_args_is_help=True, help="Register, list and manage GGUF models.")

RefArg = Annotated[str, typer.Argument(help="NAME[:VERSION] or an alias.", show_default=False)]


def _human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _as_dict(record: ModelRecord) -> dict[str, object]:
    data = msgspec.to_builtins(record)
    assert isinstance(data, dict)
    return data


def _show(record: ModelRecord) -> None:
    console = stdout()
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", record.ref + ("  (default)" if record.is_default else "")),
        ("aliases", ", ".join(record.aliases) or "-"),
        ("status", record.status),
        ("path", record.path),
        ("sha256", record.sha256),
        ("size", f"{human_size(record.size_bytes)} ({record.size_bytes} bytes)"),
        ("architecture", record.architecture),
        ("parameters", _human_count(record.parameter_count)),
        ("context length", str(record.context_length or "-")),
        ("layers", str(record.block_count or "-")),
        ("file type", record.file_type or "-"),
        ("chat template", "yes" if record.has_chat_template else "no (plain transcript fallback)"),
        ("parameters set", ", ".join(f"{k}={v}" for k, v in record.params.items()) or "-"),
        ("registered", record.created_at),
    ]
    if record.builtin:
        rows.append(("shipped", "yes (the package's default model)"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command()
def register(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The .gguf file.", show_default=False)],
    name: Annotated[
        str | None,
        typer.Option("--name", help="Model name (default: the file name without .gguf)."),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Version (default: one above the newest numbered)."),
    ] = None,
    alias: Annotated[
        list[str] | None,
        typer.Option("--alias", help="Another name for this version (repeatable)."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="Default sampling parameter key=value (repeatable).",
            metavar="KEY=VALUE",
        ),
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="Make this the version that NAME alone means.")
    ] = False,
    json: JsonFlag = False,
) -> None:
    """Add a GGUF model: verify it, read its metadata, hash it, and record it.

    Examples:

      haifctl models register ~/models/llama-3.2-1b-q4_0.gguf --name llama3.2-1b --alias small

      haifctl models register model.gguf --param temperature=0.6 --param top_k=40 --default
    """
    want_json(ctx, json)
    params = check_params(parse_params(param or []))  # before hashing: a typo costs nothing
    path = check_model_path(path)
    facts = read_facts(path)
    settings = state(ctx).settings()
    with open_cli_registry(settings) as registry:
        err = stderr()
        with Progress(
            TextColumn("sha256"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal or json,
        ) as progress:
            task = progress.add_task("hash", total=facts.size_bytes)
            record = registry.register(
                path,
                name=name or path.name.removesuffix(".gguf"),
                version=version,
                aliases=alias or [],
                params=params,
                make_default=default,
                progress=lambda n: progress.advance(task, n),
                facts=facts,
            )
    if json:
        print_json(_as_dict(record))
    else:
        stdout().print(f"registered [bold]{record.ref}[/bold]  sha256 {record.sha256[:16]}…")


@app.command("list")
def list_models(ctx: typer.Context, json: JsonFlag = False) -> None:
    """List registered models, newest version first.

    Examples:

      haifctl models list

      haifctl models list --json | jq -r '.[].name'
    """
    want_json(ctx, json)
    with open_cli_registry(state(ctx).settings()) as registry:
        records = registry.all()
    if json:
        print_json([_as_dict(r) for r in records])
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "VERSION", "ALIASES", "ARCH", "PARAMS", "TYPE", "CTX", "SIZE", "STATUS"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.name,
            r.version + (" *" if r.is_default else ""),
            ", ".join(r.aliases) or "-",
            r.architecture,
            _human_count(r.parameter_count),
            r.file_type or "-",
            str(r.context_length or "-"),
            human_size(r.size_bytes),
            r.status,
        )
    stdout().print(table)


@app.command()
def show(ctx: typer.Context, ref: RefArg, json: JsonFlag = False) -> None:
    """Show everything recorded about one model version.

    Examples:

      haifctl models show small

      haifctl models show llama3.2-1b:2 --json
    """
    want_json(ctx, json)
    with open_cli_registry(state(ctx).settings()) as registry:
        record = registry.resolve(ref)
    if json:
        print_json(_as_dict(record))
    else:
        _show(record)


@app.command("rm")
def remove(
    ctx: typer.Context,
    ref: RefArg,
    all_versions: Annotated[
        bool, typer.Option("--all", help="Remove every version of NAME.")
    ] = False,
    json: JsonFlag = False,
) -> None:
    """Remove a model version from the registry (the file itself stays).

    Its aliases go with it; removing the default version says which version the bare NAME
    means from now on.

    Examples:

      haifctl models rm llama3.2-1b:1

      haifctl models rm llama3.2-1b --all
    """
    want_json(ctx, json)
    with open_cli_registry(state(ctx).settings()) as registry:
        removed = registry.remove(ref, all_versions=all_versions)
        # what the bare NAME means now, when the version it meant is gone
        now_means: dict[str, str | None] = {}
        for r in removed:
            if r.is_default and r.name not in now_means:
                try:
                    now_means[r.name] = registry.resolve(r.name).ref
                except NotFound:
                    now_means[r.name] = None
    if json:
        print_json(
            {
                "removed": [r.ref for r in removed],
                "aliases_removed": sorted(a for r in removed for a in r.aliases),
                "default_removed": [r.ref for r in removed if r.is_default],
                "name_now_means": now_means,
            }
        )
        return
    out = stdout()
    for r in removed:
        also = []
        if r.aliases:
            also.append(f"its alias{'es' if len(r.aliases) > 1 else ''} {', '.join(r.aliases)}")
        if r.is_default:
            means = now_means.get(r.name)
            also.append(
                f"it was {r.name}'s default version: {r.name} now means "
                + (means if means else "nothing (no version left)")
            )
        out.print(f"removed {r.ref}" + (f" (and {'; '.join(also)})" if also else ""), markup=False)


@app.command()
def alias(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The alias.", show_default=False)],
    ref: Annotated[
        str | None, typer.Argument(help="NAME[:VERSION] it points at.", show_default=False)
    ] = None,
    remove: Annotated[bool, typer.Option("--rm", help="Delete the alias.")] = False,
) -> None:
    """Point an alias at a model version (moving it if it exists), or delete it with --rm.

    Examples:

      haifctl models alias prod llama3.2-1b:2

      haifctl models alias prod --rm
    """
    with open_cli_registry(state(ctx).settings()) as registry:
        if remove:
            if ref is not None:
                raise InvalidInput("invalid_arguments", "--rm takes only the alias")
            registry.remove_alias(name)
            stdout().print(f"removed alias {name}")
            return
        if ref is None:
            raise InvalidInput(
                "invalid_arguments",
                "which model should the alias point at?",
                f"haifctl models alias {name} NAME[:VERSION]",
            )
        record = registry.set_alias(name, ref)
    stdout().print(f"{name} -> {record.ref}")


@app.command("default")
def set_default(ctx: typer.Context, ref: RefArg) -> None:
    """Make NAME:VERSION the version that NAME alone resolves to.

    Examples:

      haifctl models default llama3.2-1b:1
    """
    with open_cli_registry(state(ctx).settings()) as registry:
        record = registry.set_default(ref)
    stdout().print(f"{record.name} -> {record.ref}")


@app.command("set")
def set_params(
    ctx: typer.Context,
    ref: RefArg,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="Set a default sampling parameter (repeatable); values are JSON.",
            metavar="KEY=VALUE",
        ),
    ] = None,
    unset: Annotated[
        list[str] | None,
        typer.Option("--unset", help="Drop a default parameter (repeatable).", metavar="KEY"),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Change a model version's default sampling parameters, checked as at register.

    Requests override these; they override haifctl's defaults.

    Examples:

      haifctl models set llama3.2-1b --param temperature=0.6 --param top_k=20

      haifctl models set llama3.2-1b:2 --unset top_k
    """
    want_json(ctx, json)
    if not param and not unset:
        raise InvalidInput(
            "invalid_arguments",
            "nothing to change",
            f"haifctl models set {ref} --param KEY=VALUE, or --unset KEY",
        )
    params = check_params(parse_params(param or []))
    with open_cli_registry(state(ctx).settings()) as registry:
        record = registry.set_params(ref, params, unset or [])
    if json:
        print_json(_as_dict(record))
        return
    shown = ", ".join(f"{k}={v}" for k, v in record.params.items()) or "none"
    stdout().print(f"{record.ref}: parameters {shown}", markup=False)


@app.command("status")
def set_status(
    ctx: typer.Context,
    ref: RefArg,
    status: Annotated[
        str, typer.Argument(help="One of: " + ", ".join(STATUSES) + ".", show_default=False)
    ],
) -> None:
    """Set a model version's deployment status (registered, deployed, retired).

    Examples:

      haifctl models status llama3.2-1b:1 retired
    """
    with open_cli_registry(state(ctx).settings()) as registry:
        record = registry.set_status(ref, status)
    stdout().print(f"{record.ref}: {record.status}")


def _tell_orchestrator(ctx: typer.Context, order: wire.ManageModel, timeout: float) -> None:
    """Send a load or unload to the running cluster's orchestrator and print its answer."""
    import zmq

    from haifctl import security
    from haifctl.daemon.state import daemon_endpoint, running_state
    from haifctl.errors import Unavailable
    from haifctl.rpc import RpcClient

    home = state(ctx).settings().home
    data = running_state(home)
    address = daemon_endpoint(data, "orchestrator") if data else ""
    if not address:
        raise Unavailable("not_running", "no cluster is running", "start one with: haifctl up")
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    rpc = RpcClient(zctx, address, "orchestrator", security.local(home))
    try:
        placed = rpc.ask(order, wire.ModelPlaced, timeout)
    finally:
        rpc.close()
        zctx.term()
    if state(ctx).json_errors:
        print_json(msgspec.to_builtins(placed))
        return
    where = "from" if placed.message == "unloaded" else "on"
    stdout().print(
        f"{placed.ref}: {placed.message} {where} {', '.join(placed.workers)}", markup=False
    )


@app.command("load")
def load(
    ctx: typer.Context,
    ref: RefArg,
    worker: Annotated[
        str | None,
        typer.Option("--worker", help="The worker to load it on (default: where it fits best)."),
    ] = None,
    n_ctx: Annotated[
        int, typer.Option("--n-ctx", min=0, help="Its context window (0: the worker's own).")
    ] = 0,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the load.")
    ] = 300.0,
    json: JsonFlag = False,
) -> None:
    """Load a model on a worker of the running cluster now, instead of at its first request.

    Examples:

      haifctl models load llama3.2-1b

      haifctl models load llama3.2-1b --worker gpu-1 --n-ctx 8192
    """
    want_json(ctx, json)
    order = wire.ManageModel(op="load", ref=ref, worker=worker or "", n_ctx=n_ctx)
    _tell_orchestrator(ctx, order, timeout)


@app.command("unload")
def unload(
    ctx: typer.Context,
    ref: RefArg,
    worker: Annotated[
        str | None,
        typer.Option("--worker", help="Only on this worker (default: on every worker)."),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Unload a model from the running cluster's workers (requests running on it finish).

    Examples:

      haifctl models unload llama3.2-1b
    """
    want_json(ctx, json)
    order = wire.ManageModel(op="unload", ref=ref, worker=worker or "")
    _tell_orchestrator(ctx, order, 10.0)
