"""The cluster's keys and who may do what: CURVE on every ZeroMQ link.

Every daemon that listens (registry, orchestrator, gateway) is a CURVE server holding the
cluster's server key pair; everything that connects (the orchestrator to the registry, the
gateway and workers to the orchestrator, the bridge and the CLI to the gateway) is a CURVE
client holding the key pair of its *role*.  Each daemon runs pyzmq's ZAP authenticator: a
connection whose key is unknown, or whose role may not talk to this daemon, is refused in the
handshake (and counted); every message a daemon reads carries its sender's role (ZeroMQ's
``User-Id`` property, set by the authenticator), so a daemon checks the role per message too:
only workers register or stream, only a gateway submits inference, only the CLI writes the
registry.

The keys live in ``HOME/keys`` (0700): ``cluster.json`` (0600) holds the server key pair and one
key pair per role, created the first time anything needs them (``haifctl up`` does, with no
step of its own).  A worker on another machine joins with a token (``haifctl join-token``)
holding the server's public key and a key pair of its own, whose public half is appended to
``workers.json``, the allow-list the orchestrator reads (again when it changes): a token can be
revoked by name without touching the others.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth.thread

from haifctl.errors import InvalidInput
from haifctl.files import PRIVATE_FILE_MODE, private_dir

ADMIN, BRIDGE, GATEWAY, ORCHESTRATOR, WORKER = (
    "admin",
    "bridge",
    "gateway",
    "orchestrator",
    "worker",
)
ROLES = (ADMIN, BRIDGE, GATEWAY, ORCHESTRATOR, WORKER)
# Who may connect to each listening daemon (the ZAP domain is the daemon's name).
MAY_CONNECT: dict[str, frozenset[str]] = {
    "registry": frozenset({ORCHESTRATOR, GATEWAY, ADMIN}),  # a gateway reports usage
    "orchestrator": frozenset({WORKER, GATEWAY, ADMIN}),
    "gateway": frozenset({BRIDGE, ADMIN}),
}
TOKEN_PREFIX = "haif1-"
USER_ID = "User-Id"


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes

    @classmethod
    def new(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def keys_dir(home: Path) -> Path:
    """Where the cluster's keys are: HAIF_KEYS if set (a folder shared by containers), else
    HOME/keys."""
    override = os.environ.get("HAIF_KEYS")
    return Path(override) if override else home / "keys"


def _write_private(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=1)
    tmp.replace(path)


def _decode(data: dict[str, Any]) -> KeyPair:
    return KeyPair(str(data["public"]).encode(), str(data["secret"]).encode())


class Keyring:
    """The keys one process holds: the server's public key (and, for a server, its secret),
    its own role's key pair, and the public keys of every role (to name a peer's role)."""

    def __init__(
        self,
        server_public: bytes,
        server_secret: bytes | None,
        pairs: dict[str, KeyPair],
        folder: Path | None = None,
    ) -> None:
        self.server_public = server_public
        self.server_secret = server_secret
        self.pairs = pairs
        self.folder = folder
        self.roles = {pair.public: role for role, pair in pairs.items()}
        self._workers: dict[bytes, str] = {}
        self._workers_seen: tuple[float, int] | None = None

    # loading -------------------------------------------------------------------------------
    @classmethod
    def ensure(cls, home: Path) -> Keyring:
        """The cluster's keys under ``home``, created (0600) the first time."""
        folder = keys_dir(home)
        path = folder / "cluster.json"
        if not path.exists():
            private_dir(folder)
            data = {
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "server": KeyPair.new().__dict__,
                "roles": {role: KeyPair.new().__dict__ for role in ROLES},
            }
            encoded = json.loads(json.dumps(data, default=lambda b: b.decode()))
            try:  # two processes starting at once: the first one's keys win
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
                with os.fdopen(fd, "w") as out:
                    json.dump(encoded, out, indent=1)
            except FileExistsError:
                pass
        return cls.load(folder)

    @classmethod
    def load(cls, folder: Path) -> Keyring:
        path = folder / "cluster.json"
        try:
            data = json.loads(path.read_text())
            server = _decode(data["server"])
            pairs = {role: _decode(pair) for role, pair in data["roles"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(
                "bad_cluster_keys",
                f"cannot read the cluster's keys at {path}: {exc}",
                "remove the file to have new keys made (every daemon must then restart)",
            ) from None
        return cls(server.public, server.secret, pairs, folder)

    @classmethod
    def from_token(cls, token: str) -> Keyring:
        """A remote worker's keys, from ``haifctl join-token``'s output."""
        token = token.strip()
        try:
            if not token.startswith(TOKEN_PREFIX):
                raise ValueError("it does not start with " + TOKEN_PREFIX)
            raw = base64.urlsafe_b64decode(token[len(TOKEN_PREFIX) :].encode())
            if len(raw) != 96:
                raise ValueError("wrong length")
        except ValueError as exc:
            raise InvalidInput(
                "bad_join_token",
                f"not a join token: {exc}",
                "copy the whole line `haifctl join-token` printed on the cluster's machine",
            ) from None
        z85 = zmq.utils.z85.encode
        pair = KeyPair(z85(raw[32:64]), z85(raw[64:]))
        return cls(z85(raw[:32]), None, {WORKER: pair})

    # joining workers -----------------------------------------------------------------------
    def join_token(self, name: str) -> str:
        """A new worker key pair, allowed under ``name``; returns the token that carries it."""
        assert self.folder is not None
        pair = KeyPair.new()
        workers = self.joined()
        workers[name] = {
            "public": pair.public.decode(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_private(self.folder / "workers.json", workers)
        z85 = zmq.utils.z85.decode
        raw = z85(self.server_public) + z85(pair.public) + z85(pair.secret)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode()

    def joined(self) -> dict[str, dict[str, str]]:
        """Workers allowed by join token: name -> {public, created_at}."""
        if self.folder is None:
            return {}
        try:
            data = json.loads((self.folder / "workers.json").read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def revoke(self, name: str) -> bool:
        assert self.folder is not None
        workers = self.joined()
        if workers.pop(name, None) is None:
            return False
        _write_private(self.folder / "workers.json", workers)
        return True

    def role_of(self, public: bytes) -> str | None:
        """The role of a Z85 public key, or None for a stranger.  workers.json is read again
        when it changes (a token made or revoked while the cluster runs)."""
        role = self.roles.get(public)
        if role is not None:
            return role
        if self.folder is not None:
            try:
                st = (self.folder / "workers.json").stat()
                seen = (st.st_mtime, st.st_size)
            except OSError:
                seen = None
            if seen != self._workers_seen:
                self._workers_seen = seen
                self._workers = {
                    str(entry.get("public", "")).encode(): name
                    for name, entry in self.joined().items()
                    if isinstance(entry, dict)
                }
        return WORKER if public in self._workers else None

    # sockets -------------------------------------------------------------------------------
    def client(self, sock: zmq.Socket[Any], role: str) -> None:
        """Make ``sock`` a CURVE client speaking as ``role``."""
        pair = self.pairs.get(role)
        if pair is None:
            raise InvalidInput(
                "missing_key", f"these keys hold no key for the {role} role", "use the right keys"
            )
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = pair.public
        sock.curve_secretkey = pair.secret

    def server(self, sock: zmq.Socket[bytes], domain: str) -> None:
        """Make ``sock`` a CURVE server whose peers the ZAP handler checks for ``domain``."""
        if self.server_secret is None:
            raise InvalidInput("missing_key", "these keys cannot serve: no server secret key")
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_publickey = self.server_public
        sock.curve_secretkey = self.server_secret


class Authenticator(zmq.auth.thread.ThreadAuthenticator):
    """pyzmq's ZAP handler, in a thread of its own: called once per connection handshake, never
    per message.  Accepts a key whose role may connect to the socket's domain, names the
    connection's User-Id after that role, and counts what it refuses."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], keyring: Keyring, on_refused: Any):
        super().__init__(ctx)
        self.keyring = keyring
        self.on_refused = on_refused

    def callback(self, domain: str, key: bytes) -> bool:
        role = self.keyring.role_of(key)
        allowed = role is not None and role in MAY_CONNECT.get(domain, frozenset())
        if not allowed:
            self.on_refused("unknown_key" if role is None else "role_not_allowed", role, key)
        return allowed

    def curve_user_id(self, client_public_key: bytes) -> str:
        role = self.keyring.role_of(zmq.utils.z85.encode(client_public_key))
        return role or ""

    def start_for(self, domains: list[str]) -> None:
        self.start()
        for domain in domains:
            self.configure_curve_callback(domain=domain, credentials_provider=self)


def role_of_frame(frame: zmq.Frame) -> str:
    """The sender's role, as the authenticator named its connection ('' when unauthenticated)."""
    try:
        return str(frame.get(USER_ID))
    except zmq.ZMQError:
        return ""


def local(home: Path | None = None) -> Keyring:
    """The keys of the cluster whose home is ``home`` (default: this user's haifctl home)."""
    if home is None:
        from haifctl.config import resolve

        home = resolve().home
    return Keyring.ensure(home)
