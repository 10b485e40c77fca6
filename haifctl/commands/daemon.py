"""`haifctl daemon ...` (run one daemon in the foreground) and `haifctl worker`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from haifctl.commands._shared import ModelOpt, state

if TYPE_CHECKING:
    from haifctl.config import Settings
    from haifctl.daemon.base import Daemon

app = typer.Typer(
    no_args_is_help=True,
    help="Run one cluster daemon in the foreground (what `haifctl up` starts).",
)

BindOpt = Annotated[str, typer.Option("--bind", help="Address to listen on; port 0 picks one.")]
ReadyOpt = Annotated[
    Path | None,
    typer.Option(
        "--ready-file", help="Write the bound addresses here once ready.", show_default=False
    ),
]
MetricsOpt = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        help="Port for /metrics (0: any free port). [env: OTEL_PROMETHEUS_PORT, HAIF_METRICS_PORT]",
        show_default=False,
    ),
]


class Placement(StrEnum):
    spread = "spread"
    binpack = "binpack"


HeartbeatTimeoutOpt = Annotated[
    float | None,
    typer.Option("--heartbeat-timeout", help="Seconds of silence before a worker is dropped."),
]


@app.command()
def registry(
    ctx: typer.Context,
    bind: BindOpt = "tcp://127.0.0.1:0",
    metrics_port: MetricsOpt = None,
    ready_file: ReadyOpt = None,
) -> None:
    """Serve the model registry to the other daemons."""
    from haifctl.daemon.registry import RegistryDaemon

    settings = state(ctx).settings(metrics_port=metrics_port)
    daemon = RegistryDaemon(settings.registry_url, bind, ready_file=ready_file)
    daemon.usage_retention_days = settings.usage_retention_days
    _run(daemon, settings)


def _run(daemon: Daemon, settings: Settings) -> None:
    from haifctl import security

    if daemon.keyring is None:
        daemon.keyring = security.local(settings.home)
    daemon.metrics_port = settings.metrics_port
    daemon.metrics_host = settings.metrics_host
    daemon.run()


@app.command()
def orchestrator(
    ctx: typer.Context,
    registry: Annotated[str, typer.Option("--registry", help="The registry daemon's address.")],
    bind: BindOpt = "tcp://127.0.0.1:0",
    heartbeat_timeout: HeartbeatTimeoutOpt = None,
    queue_size: Annotated[
        int | None, typer.Option("--queue-size", min=0, help="Queued requests per model.")
    ] = None,
    placement: Annotated[
        Placement | None,
        typer.Option(
            "--placement",
            help="Where a model is loaded on demand: spread (the least loaded worker) or "
            "binpack (the fullest it fits in). [env: HAIF_PLACEMENT]",
        ),
    ] = None,
    metrics_port: MetricsOpt = None,
    ready_file: ReadyOpt = None,
) -> None:
    """Keep the worker table and queues; schedule requests onto workers."""
    from haifctl.daemon.orchestrator import OrchestratorDaemon
    from haifctl.errors import InvalidInput
    from haifctl.placement import POLICIES

    settings = state(ctx).settings(
        heartbeat_timeout=heartbeat_timeout,
        queue_size=queue_size,
        metrics_port=metrics_port,
        placement=placement.value if placement else None,
    )
    if settings.placement not in POLICIES:
        raise InvalidInput(
            "invalid_placement",
            f"placement {settings.placement!r} is not one of {', '.join(POLICIES)}",
            "set --placement or HAIF_PLACEMENT to spread or binpack",
        )
    daemon = OrchestratorDaemon(
        bind,
        registry,
        settings.model,
        heartbeat_timeout_s=settings.heartbeat_timeout,
        queue_size=settings.queue_size,
        ready_file=ready_file,
        placement=settings.placement,
    )
    _run(daemon, settings)


@app.command()
def gateway(
    ctx: typer.Context,
    orchestrator: Annotated[
        str, typer.Option("--orchestrator", help="The orchestrator's address.")
    ],
    bind: BindOpt = "tcp://127.0.0.1:0",
    rate: Annotated[
        float | None, typer.Option("--rate", help="Requests per second per client key.")
    ] = None,
    burst: Annotated[
        float | None, typer.Option("--burst", help="Token-bucket burst per client key.")
    ] = None,
    heartbeat_timeout: Annotated[
        float | None,
        typer.Option(
            "--heartbeat-timeout", help="Seconds of silence before the orchestrator is lost."
        ),
    ] = None,
    registry: Annotated[
        str,
        typer.Option(
            "--registry", help="The registry daemon's address, to record usage (empty: none)."
        ),
    ] = "",
    metrics_port: MetricsOpt = None,
    ready_file: ReadyOpt = None,
) -> None:
    """Validate, rate-limit and forward requests; relay token streams.

    With HAIF_REDIS_URL, every gateway using that Redis shares one rate limit and one
    concurrency cap per client key, and one list of revoked keys.
    """
    from haifctl.daemon.gateway import GatewayDaemon, Limits

    settings = state(ctx).settings(
        rate_limit=rate,
        rate_burst=burst,
        heartbeat_timeout=heartbeat_timeout,
        metrics_port=metrics_port,
    )
    limits = Limits(
        max_prompt_chars=settings.max_prompt_chars,
        max_tokens_cap=settings.max_tokens_cap,
        request_timeout_s=settings.request_timeout,
        rate_per_s=settings.rate_limit,
        burst=settings.rate_burst,
        max_concurrent_per_key=settings.max_concurrent_per_key,
    )
    daemon = GatewayDaemon(
        bind,
        orchestrator,
        limits=limits,
        orchestrator_timeout_s=settings.heartbeat_timeout,
        ready_file=ready_file,
        registry=registry,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
    )
    _run(daemon, settings)


@app.command()
def bridge(
    ctx: typer.Context,
    gateway: Annotated[
        str,
        typer.Option(
            "--gateway",
            help="The gateway's address, or several comma-separated: requests take turns over "
            "the gateways that are up.",
        ),
    ],
    bind: Annotated[
        str | None,
        typer.Option("--bind", help="HOST:PORT to serve HTTP on. [env: HAIF_BRIDGE_BIND]"),
    ] = None,
    metrics_port: MetricsOpt = None,
    ready_file: ReadyOpt = None,
) -> None:
    """Serve the HTTP API (REST, OpenAI-compatible) and the chat page."""
    from haifctl.daemon.bridge import BridgeDaemon, EdgeLimits, parse_http_bind
    from haifctl.errors import InvalidInput
    from haifctl.keys import KeyStore

    settings = state(ctx).settings(bridge_bind=bind, metrics_port=metrics_port)
    keys = KeyStore(settings.home)
    host, _ = parse_http_bind(settings.bridge_bind)
    if not keys.enabled and host not in ("127.0.0.1", "localhost", "::1"):
        raise InvalidInput(
            "bridge_needs_keys",
            f"no API keys are configured, so the bridge only listens on loopback, not {host}",
            "create one with `haifctl keys create`, or bind to 127.0.0.1",
        )
    from haifctl import security

    daemon = BridgeDaemon(
        gateway,
        settings.bridge_bind,
        keys,
        ready_file,
        metrics_port=settings.metrics_port,
        metrics_host=settings.metrics_host,
        limits=EdgeLimits.from_settings(settings),
    )
    daemon.keyring = security.local(settings.home)
    daemon.run()


def worker(
    ctx: typer.Context,
    orchestrator: Annotated[
        str,
        typer.Option("--orchestrator", help="The orchestrator's address, e.g. tcp://HOST:PORT."),
    ],
    model: ModelOpt = None,
    worker_id: Annotated[
        str | None, typer.Option("--worker-id", help="Stable name for this worker.")
    ] = None,
    heartbeat: Annotated[
        float,
        typer.Option(
            "--heartbeat",
            help="Seconds between heartbeats until the orchestrator says how often (it answers "
            "a worker's registration with a share of its timeout for a silent worker).",
        ),
    ] = 0.5,
    slots: Annotated[
        int | None,
        typer.Option(
            "--slots",
            min=0,
            help="Requests run at once (continuous batching); 0: chosen from the model's "
            "context and the memory available. [env: HAIF_SLOTS]",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=0, help="CPU threads for llama.cpp (0: automatic). [env: HAIF_THREADS]"
        ),
    ] = None,
    threads_batch: Annotated[
        int | None,
        typer.Option(
            "--threads-batch",
            min=0,
            help="CPU threads for steps that feed prompts (0: as --threads). "
            "[env: HAIF_THREADS_BATCH]",
        ),
    ] = None,
    flash_attn: Annotated[
        str | None,
        typer.Option(
            "--flash-attn",
            metavar="auto|on|off",
            help="Flash attention (auto: llama.cpp's choice on a GPU; on a CPU, on for heads of "
            "32 or more, and for smaller heads on for prompts only). [env: HAIF_FLASH_ATTN]",
        ),
    ] = None,
    embeddings: Annotated[
        bool,
        typer.Option(
            "--embeddings",
            help="Also load an embedding context, for POST /v1/embeddings and `haifctl embed` "
            "(the orchestrator sends embedding requests only to such workers). "
            "[env: HAIF_EMBEDDINGS]",
        ),
    ] = False,
    memory: Annotated[
        str | None,
        typer.Option(
            "--memory",
            help="Memory its models may take, e.g. 8G, or a share of what is free when it "
            "starts, e.g. 50% (default: all of it; the GPU's under CUDA; `up` gives each of its "
            "workers an equal share). [env: HAIF_WORKER_MEMORY]",
        ),
    ] = None,
    keep_alive: Annotated[
        str | None,
        typer.Option(
            "--keep-alive",
            help='How long a model it loaded on demand stays once idle ("5m", seconds; -1: '
            "keep) unless a request or the registry says. [env: HAIF_KEEP_ALIVE]",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            help="KEY=VALUE this worker carries, which requests and registry params select "
            "(repeatable), e.g. --label gpu=h100.",
        ),
    ] = None,
    join: Annotated[
        str | None,
        typer.Option(
            "--join",
            help="A join token from `haifctl join-token` on the cluster's machine (a worker "
            "elsewhere); without it, the keys in this haifctl home. [env: HAIF_JOIN_TOKEN]",
            envvar="HAIF_JOIN_TOKEN",
            show_envvar=False,
        ),
    ] = None,
    metrics_port: MetricsOpt = None,
    ready_file: ReadyOpt = None,
) -> None:
    """Run a worker that loads a model and joins an orchestrator (on this or another machine).

    Examples:

      haifctl worker --orchestrator tcp://10.0.0.5:5552 --join haif1-...

      haifctl worker --orchestrator tcp://127.0.0.1:5552 --model llama3.2-1b --slots 4
    """
    from haifctl.daemon.worker import WorkerDaemon
    from haifctl.placement import parse_keep_alive, parse_labels, parse_memory
    from haifctl.security import Keyring

    settings = state(ctx).settings(
        model=model,
        metrics_port=metrics_port,
        slots=slots,
        threads=threads,
        threads_batch=threads_batch,
        flash_attn=flash_attn,
        embeddings=embeddings or None,
        keep_alive=keep_alive,
        worker_memory=memory,
    )
    from haifctl.errors import InvalidInput
    from haifctl.runtime.base import FLASH_ATTN_CHOICES

    if settings.flash_attn not in FLASH_ATTN_CHOICES:
        raise InvalidInput(
            "invalid_flash_attn",
            f"flash attention {settings.flash_attn!r} is not one of "
            f"{', '.join(FLASH_ATTN_CHOICES)}",
            "set --flash-attn or HAIF_FLASH_ATTN to auto, on or off",
        )
    memory_bytes, memory_share = parse_memory(settings.worker_memory or "100%")
    daemon = WorkerDaemon(
        orchestrator,
        settings.model,
        settings,
        worker_id=worker_id,
        heartbeat_s=heartbeat,
        orchestrator_timeout_s=max(3.0, 6 * heartbeat),
        stream_interval_s=settings.stream_interval_ms / 1000,
        ready_file=ready_file,
        memory=memory_bytes,
        memory_share=memory_share,
        labels=parse_labels(label or []),
        keep_alive_s=parse_keep_alive(settings.keep_alive),
    )
    if join:
        daemon.keyring = Keyring.from_token(join)
    _run(daemon, settings)


@app.command()
def supervise(
    ctx: typer.Context,
    workers: Annotated[int, typer.Option("--workers", min=1)] = 1,
    gateways: Annotated[int, typer.Option("--gateways", min=1)] = 1,
    model: Annotated[list[str] | None, typer.Option("--model")] = None,
    orchestrator_bind: Annotated[str, typer.Option("--orchestrator-bind")] = "tcp://127.0.0.1:0",
    gateway_bind: Annotated[str, typer.Option("--gateway-bind")] = "tcp://127.0.0.1:0",
    restart: Annotated[str, typer.Option("--restart")] = "on-failure",
    heartbeat_timeout: HeartbeatTimeoutOpt = None,
    bridge_bind: Annotated[str | None, typer.Option("--bridge-bind")] = None,
    metrics_base: Annotated[int, typer.Option("--metrics-base-port", min=0)] = 0,
    run: Annotated[float | None, typer.Option("--run", help="The run's id (its start).")] = None,
) -> None:
    """Start and watch the whole cluster (what `haifctl up` runs in the background)."""
    from haifctl.daemon.supervisor import Supervisor

    settings = state(ctx).settings(heartbeat_timeout=heartbeat_timeout, bridge_bind=bridge_bind)
    code = Supervisor(
        settings.home,
        workers=workers,
        gateways=gateways,
        models=model or [settings.model],
        registry_url=settings.registry_url,
        orchestrator_bind=orchestrator_bind,
        gateway_bind=gateway_bind,
        restart=restart,
        heartbeat_timeout_s=settings.heartbeat_timeout,
        bridge_bind=settings.bridge_bind,
        metrics_base_port=metrics_base,
        worker_threads=settings.threads,
        worker_threads_batch=settings.threads_batch,
        worker_memory=settings.worker_memory,
        log_max_bytes=settings.log_max_bytes,
        log_keep=settings.log_keep,
        run=run,
    ).run()
    raise typer.Exit(code)


@app.command()
def ping(
    typer_ctx: typer.Context,
    address: Annotated[str, typer.Argument(help="A daemon's address, tcp://HOST:PORT.")],
    timeout: Annotated[float, typer.Option("--timeout", min=0.1)] = 2.0,
) -> None:
    """Exit 0 if the daemon at ADDRESS answers a ping (a container health check)."""
    import zmq

    from haifctl import security, wire
    from haifctl.errors import Unavailable
    from haifctl.rpc import RpcClient

    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        keyring = security.local(state(typer_ctx).settings().home)
        answer = RpcClient(zctx, address, "daemon", keyring).call(wire.Ping(), timeout)
    finally:
        zctx.destroy(linger=0)
    if not isinstance(answer, wire.Pong) or not answer.ready:
        raise Unavailable("not_ready", f"{address} is not ready")
    typer.echo(f"{answer.daemon} {answer.pid} ready")


@app.command()
def keys(ctx: typer.Context) -> None:
    """Create the cluster's CURVE keys if they do not exist, and print where they are (the
    compose stack's first step: every daemon then reads them from HAIF_KEYS)."""
    from haifctl import security

    home = state(ctx).settings().home
    security.local(home)
    typer.echo(str(security.keys_dir(home)))
