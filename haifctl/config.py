"""One settings object, resolved once: flag > environment > config file > default.

Every value remembers where it came from so that ``haifctl config show`` can say so.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import platformdirs

from haifctl.errors import InvalidInput

DEFAULT_MODEL = "stories260K"


@dataclass(frozen=True)
class Setting:
    """How one setting is named in each layer, its type and default."""

    name: str
    env: tuple[str, ...]
    type: type
    default: Any
    help: str
    secret: bool = False


# Order is the order `config show` prints.  `home` and `registry_url` have computed defaults.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "home", ("HAIF_HOME",), Path, None, "Directory for config.toml, registry.db and state."
    ),
    Setting(
        "registry_url",
        ("HAIF_REGISTRY_URL",),
        str,
        None,
        "Model registry: sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB.",
        secret=True,
    ),
    Setting(
        "model", ("HAIF_MODEL", "MODEL_ID"), str, DEFAULT_MODEL, "Default model NAME[:VERSION]."
    ),
    Setting("n_ctx", ("HAIF_N_CTX",), int, 4096, "Context window (capped at the model's own)."),
    Setting(
        "n_gpu_layers",
        ("HAIF_N_GPU_LAYERS",),
        int,
        -1,
        "Layers offloaded to the GPU (-1 all, 0 none); ignored without GPU support.",
    ),
    Setting("threads", ("HAIF_THREADS",), int, 0, "CPU threads for generation (0: automatic)."),
    Setting(
        "threads_batch",
        ("HAIF_THREADS_BATCH",),
        int,
        0,
        "CPU threads for engine steps that feed prompts (0: as many as for generation; `up` "
        "gives each worker its share of all the cores).",
    ),
    Setting(
        "flash_attn",
        ("HAIF_FLASH_ATTN",),
        str,
        "auto",
        "Flash attention: on, off or auto (llama.cpp's choice on a GPU; on a CPU, on for models "
        "with heads of 32 or more: faster prompts, slower generation below that).",
    ),
    Setting(
        "slots",
        ("HAIF_SLOTS",),
        int,
        0,
        "Sequences a worker decodes at once (continuous batching); 0: chosen from the model's "
        "context and the memory available.",
    ),
    Setting(
        "embeddings",
        ("HAIF_EMBEDDINGS",),
        bool,
        False,
        "Workers also load an embedding context (POST /v1/embeddings, `haifctl embed`); the "
        "orchestrator sends embedding requests only to such workers.",
    ),
    Setting(
        "keep_alive",
        ("HAIF_KEEP_ALIVE",),
        str,
        "5m",
        'How long a model a worker loaded on demand stays once idle ("5m", seconds; -1: '
        "keep), unless a request or the model's registered params say otherwise.",
    ),
    Setting(
        "worker_memory",
        ("HAIF_WORKER_MEMORY",),
        str,
        "",
        "Memory a worker's models may take, e.g. 8G, or a share of what is free when it starts, "
        "e.g. 50% (empty: all of it, the GPU's under CUDA; `up` gives its N workers 1/N each).",
    ),
    Setting(
        "placement",
        ("HAIF_PLACEMENT",),
        str,
        "spread",
        "Where the orchestrator loads a model on demand: spread (the least loaded worker) or "
        "binpack (the fullest one it fits in).",
    ),
    Setting(
        "stream_interval_ms",
        ("HAIF_STREAM_INTERVAL_MS",),
        float,
        20.0,
        "How long a worker may hold a running stream's text to send several tokens in one "
        "frame (a first token and a stream's end go out at once).",
    ),
    Setting("max_tokens", ("HAIF_MAX_TOKENS",), int, 256, "Default completion length in tokens."),
    Setting(
        "gateway_url",
        ("HAIF_GATEWAY_URL", "GATEWAY_URL"),
        str,
        "",
        "A cluster gateway for `infer` (tcp://HOST:PORT); empty: a local cluster if one is up.",
    ),
    Setting(
        "bridge_bind",
        ("HAIF_BRIDGE_BIND",),
        str,
        "127.0.0.1:8080",
        "HOST:PORT of the HTTP bridge that `haifctl up` starts (port 0: any free port).",
    ),
    Setting(
        "bridge_header_timeout",
        ("HAIF_BRIDGE_HEADER_TIMEOUT",),
        float,
        10.0,
        "Seconds an HTTP client has to send a whole request head before the bridge closes the "
        "connection (0: no limit).",
    ),
    Setting(
        "bridge_idle_timeout",
        ("HAIF_BRIDGE_IDLE_TIMEOUT",),
        float,
        15.0,
        "Seconds the bridge keeps an idle HTTP connection open, and waits for the next piece of "
        "a request body (408 after).",
    ),
    Setting(
        "bridge_max_client_connections",
        ("HAIF_BRIDGE_MAX_CLIENT_CONNECTIONS",),
        int,
        256,
        "Concurrent HTTP connections one client address may hold at the bridge; one more gets "
        "429 (0: no cap).",
    ),
    Setting(
        "metrics_port",
        ("HAIF_METRICS_PORT", "OTEL_PROMETHEUS_PORT"),
        int,
        9464,
        "Port of a daemon's /metrics (haifctl up gives each daemon its own; 0: any free port).",
    ),
    Setting(
        "metrics_host",
        ("HAIF_METRICS_HOST",),
        str,
        "127.0.0.1",
        "Address /metrics listens on (0.0.0.0 in containers).",
    ),
    Setting(
        "heartbeat_timeout",
        ("HAIF_HEARTBEAT_TIMEOUT",),
        float,
        3.0,
        "Seconds of silence before the orchestrator drops a worker.",
    ),
    Setting("queue_size", ("HAIF_QUEUE_SIZE",), int, 64, "Queued requests per model, at most."),
    Setting(
        "rate_limit",
        ("HAIF_RATE_LIMIT",),
        float,
        50.0,
        "Requests per second per client key at the gateway.",
    ),
    Setting("rate_burst", ("HAIF_RATE_BURST",), float, 100.0, "Burst size of that rate limit."),
    Setting(
        "max_concurrent_per_key",
        ("HAIF_MAX_CONCURRENT_PER_KEY",),
        int,
        0,
        "Requests one client key may have in flight at the gateway at once (0: no cap).",
    ),
    Setting(
        "redis_url",
        ("HAIF_REDIS_URL",),
        str,
        "",
        "Redis that several gateways share rate limits, concurrency caps and revoked keys "
        "through (redis://HOST:6379/0); empty: each gateway keeps its own, in-process.",
        secret=True,
    ),
    Setting(
        "redis_prefix",
        ("HAIF_REDIS_PREFIX",),
        str,
        "haif",
        "Prefix of every Redis key haifctl writes (one per cluster sharing a Redis).",
    ),
    Setting(
        "usage_retention_days",
        ("HAIF_USAGE_RETENTION_DAYS",),
        float,
        90.0,
        "Days the registry keeps per-request usage rows before pruning them (0: forever).",
    ),
    Setting(
        "max_prompt_chars",
        ("HAIF_MAX_PROMPT_CHARS",),
        int,
        262144,
        "Longest prompt the gateway accepts, in characters.",
    ),
    Setting(
        "max_tokens_cap",
        ("HAIF_MAX_TOKENS_CAP",),
        int,
        4096,
        "Largest max_tokens the gateway accepts.",
    ),
    Setting(
        "request_timeout",
        ("HAIF_REQUEST_TIMEOUT",),
        float,
        300.0,
        "Deadline the gateway gives a request, in seconds.",
    ),
    Setting(
        "log_max_bytes",
        ("HAIF_LOG_MAX_BYTES",),
        int,
        10_000_000,
        "Size at which a daemon's log file under HOME/logs is rotated (0: never).",
    ),
    Setting("log_keep", ("HAIF_LOG_KEEP",), int, 3, "Rotated log files kept per daemon."),
    Setting("postgres_user", ("POSTGRES_USER",), str, "", "Postgres user (builds registry_url)."),
    Setting(
        "postgres_password",
        ("POSTGRES_PASSWORD",),
        str,
        "",
        "Postgres password (builds registry_url).",
        secret=True,
    ),
    Setting("postgres_db", ("POSTGRES_DB",), str, "", "Postgres database; set to use Postgres."),
    Setting("postgres_host", ("POSTGRES_HOST",), str, "127.0.0.1", "Postgres host."),
    Setting("postgres_port", ("POSTGRES_PORT",), int, 5432, "Postgres port."),
)
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    """The resolved configuration.  Build it with :func:`resolve`."""

    home: Path
    registry_url: str
    model: str
    n_ctx: int
    n_gpu_layers: int
    threads: int
    threads_batch: int
    flash_attn: str
    slots: int
    embeddings: bool
    keep_alive: str
    worker_memory: str
    placement: str
    stream_interval_ms: float
    max_tokens: int
    gateway_url: str
    bridge_bind: str
    bridge_header_timeout: float
    bridge_idle_timeout: float
    bridge_max_client_connections: int
    metrics_port: int
    metrics_host: str
    heartbeat_timeout: float
    queue_size: int
    rate_limit: float
    rate_burst: float
    max_concurrent_per_key: int
    redis_url: str
    redis_prefix: str
    usage_retention_days: float
    max_prompt_chars: int
    max_tokens_cap: int
    request_timeout: float
    log_max_bytes: int
    log_keep: int
    postgres_user: str
    postgres_password: str
    postgres_db: str
    postgres_host: str
    postgres_port: int
    config_file: Path
    sources: Mapping[str, str] = field(default_factory=dict)

    def display_value(self, name: str) -> str:
        """The value as `config show` prints it, with secrets masked."""
        value = getattr(self, name)
        if name in ("registry_url", "redis_url"):
            return mask_url(str(value))
        if _BY_NAME[name].secret and value:
            return MASK
        return str(value)


MASK = "********"

# ``password=VALUE`` (also libpq's ``sslpassword``) in a URL's query or a key=value conninfo
# string: the value runs to the next ``&``, whitespace or ``#``, or is a quoted conninfo value.
_PASSWORD_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9_])((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^&\s#]+)"
)


def mask_url(text: str, source: str | None = None) -> str:
    """Hide every password in a URL, keeping everything else readable: the one masking
    function, for ``config show``, error messages, logs and ``status``.

    Masks both forms a Postgres URL can carry one in: the userinfo
    (``postgresql://user:PASS@host/db``) and the query (``...?password=PASS``, which libpq also
    accepts as a ``password=PASS`` conninfo keyword).  ``text`` may also be a message about a
    URL (a driver's error): with ``source``, the URL it is about, every password of ``source``
    is masked wherever it appears in ``text`` too, raw or percent-decoded.  Never raises.
    """
    masked = _PASSWORD_PARAM.sub(lambda m: m.group(1) + MASK, text)
    if source is not None:
        for secret in sorted(_passwords(source), key=len, reverse=True):
            masked = masked.replace(secret, MASK)
    start, _, userinfo = _userinfo(masked)
    if ":" not in userinfo:
        return masked
    user = userinfo.split(":", 1)[0]
    return f"{masked[:start]}{user}:{MASK}@{masked[start + len(userinfo) + 1 :]}"


def _userinfo(url: str) -> tuple[int, int, str]:
    """Where the authority of ``scheme://userinfo@host/...`` starts and ends, and its userinfo
    ("" when there is none)."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        return 0, 0, ""
    start = scheme_end + 3
    end = len(url)
    for stop in "/?#":
        found = url.find(stop, start)
        if found >= 0:
            end = min(end, found)
    userinfo, at, _ = url[start:end].rpartition("@")
    return start, end, userinfo if at else ""


def _passwords(url: str) -> set[str]:
    """The passwords a URL carries, as written and percent-decoded (at least 3 characters: a
    shorter one would mask random bits of a message)."""
    found = [m.group(2).strip("'") for m in _PASSWORD_PARAM.finditer(url)]
    userinfo = _userinfo(url)[2]
    if ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    return {s for raw in found for s in (raw, unquote(raw)) if len(s) >= 3}


def default_home() -> Path:
    return Path(platformdirs.user_config_dir("haifctl", appauthor=False))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(setting: Setting, raw: Any, origin: str) -> Any:
    if setting.type is Path:
        return Path(str(raw)).expanduser()
    if setting.type is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise InvalidInput(
                "invalid_setting",
                f"{origin}: expected a number, got {raw!r}",
                f"set {setting.name} to a number",
            ) from None
    if setting.type is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise InvalidInput(
            "invalid_setting",
            f"{origin}: expected true or false, got {raw!r}",
            f"set {setting.name} to true or false (1 or 0)",
        )
    if setting.type is int:
        if isinstance(raw, bool):
            raise InvalidInput("invalid_setting", f"{origin}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise InvalidInput(
                "invalid_setting",
                f"{origin}: expected an integer, got {raw!r}",
                f"set {setting.name} to a whole number",
            ) from None
    return str(raw)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(
            "invalid_config", f"{path} is not valid TOML: {exc}", "fix or remove the file"
        ) from None
    except OSError as exc:
        raise InvalidInput("invalid_config", f"cannot read {path}: {exc.strerror}") from None
    unknown = sorted(set(data) - set(_BY_NAME) - {"home"})
    if unknown:
        raise InvalidInput(
            "invalid_config",
            f"{path}: unknown setting {unknown[0]!r}",
            "known settings: " + ", ".join(s.name for s in SETTINGS if s.name != "home"),
        )
    if "home" in data:
        raise InvalidInput(
            "invalid_config",
            f"{path}: 'home' cannot be set in the config file that lives in it",
            "use HAIF_HOME or --home instead",
        )
    return data


def resolve(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every setting from flags (None = not given), the environment and the config file."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def pick(setting: Setting, file_data: Mapping[str, Any], config_path: Path | None) -> bool:
        if setting.name in flags:
            values[setting.name] = _coerce(setting, flags[setting.name], f"--{setting.name}")
            sources[setting.name] = "flag"
            return True
        for var in setting.env:
            if env.get(var, "") != "":
                values[setting.name] = _coerce(setting, env[var], var)
                sources[setting.name] = f"env {var}"
                return True
        if setting.name in file_data:
            values[setting.name] = _coerce(
                setting, file_data[setting.name], f"{config_path}: {setting.name}"
            )
            sources[setting.name] = f"file {config_path}"
            return True
        return False

    home_setting = _BY_NAME["home"]
    if not pick(home_setting, {}, None):
        values["home"] = default_home()
        sources["home"] = "default"
    config_file = values["home"] / "config.toml"
    file_data = _read_file(config_file)

    for setting in SETTINGS:
        if setting.name == "home":
            continue
        if pick(setting, file_data, config_file):
            continue
        if setting.name != "registry_url":
            values[setting.name] = setting.default
            sources[setting.name] = "default"

    if "registry_url" not in values:
        if values["postgres_db"]:
            values["registry_url"] = postgres_url_from_parts(values)
            sources["registry_url"] = "derived from POSTGRES_* settings"
        else:
            values["registry_url"] = f"sqlite://{(values['home'] / 'registry.db').absolute()}"
            sources["registry_url"] = "default"

    return Settings(**values, config_file=config_file, sources=sources)


def postgres_url_from_parts(values: Mapping[str, Any]) -> str:
    user = quote(values["postgres_user"], safe="")
    password = quote(values["postgres_password"], safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return (
        f"postgresql://{auth}{values['postgres_host']}:{values['postgres_port']}/"
        f"{quote(values['postgres_db'], safe='')}"
    )
