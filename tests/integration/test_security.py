"""The control plane authenticates: CURVE on every ZeroMQ link, roles enforced per message.

Against a real cluster (separate processes on loopback): a peer without the cluster's keys can
neither register, submit, read nor write the registry; a peer with a key of the wrong role is
refused what its role may not do; the client identity used for rate limits comes from the
gateway, never from the message."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from haifctl import wire
from haifctl.security import ADMIN, BRIDGE, GATEWAY, ORCHESTRATOR, WORKER
from tests.cluster import Cluster

REGISTER = wire.Register(
    worker_id="impostor",
    models=["stories260K:1"],
    slots=4,
    device="cpu",
    n_ctx=512,
    pid=1,
    host="evil",
)
INFER = wire.Infer(request={"prompt": "Once", "max_tokens": 100_000})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("security"),
        workers=1,
        gateway_args=("--rate", "0.01", "--burst", "2"),
    )
    yield c
    c.stop()


class KeepingContext(zmq.Context):  # type: ignore[type-arg]
    """Holds every socket it made until destroyed: a test's socket dropped unclosed by a
    reassigned variable would otherwise warn."""

    def socket(self, *args: object, **kwargs: object) -> zmq.Socket[bytes]:  # type: ignore[override]
        sock: zmq.Socket[bytes] = super().socket(*args, **kwargs)  # type: ignore[arg-type]
        self._kept.append(sock)
        return sock


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context = KeepingContext()
    context.__dict__["_kept"] = []
    yield context
    context.destroy(linger=0)


def ask(
    sock: zmq.Socket[bytes], msg: wire.Msg, request_id: str = "", wait_ms: int = 1500
) -> wire.Msg | None:
    """Send one message; its answer, or None when nothing comes back."""
    try:  # a refused connection leaves no peer to queue for: a blocking send would hang
        sock.send(wire.encode(msg, request_id, time.time() + 30), zmq.NOBLOCK)
    except zmq.Again:
        return None
    if not sock.poll(wait_ms):
        return None
    return wire.decode(sock.recv()).msg


def stats(cluster: Cluster) -> wire.Stats:
    with cluster.client() as client:
        return client.stats()


def counter(cluster: Cluster, name: str) -> int:
    return stats(cluster).counters.get(name, 0)


def test_a_peer_without_the_keys_gets_nothing_anywhere(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    before = counter(cluster, "auth_refused_handshake")
    for address, msg in (
        (cluster.orchestrator, REGISTER),
        (cluster.orchestrator, INFER),
        (cluster.gateway, INFER),
        (cluster.registry, wire.RegistryCall(op="list")),
        (cluster.registry, wire.RegistryCall(op="remove", args={"ref": "stories260K"})),
    ):
        plain = ctx.socket(zmq.DEALER)  # no CURVE at all
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(address)
        assert ask(plain, msg, "r") is None, (address, msg)
    assert {w.worker_id for w in stats(cluster).workers} == {"worker-1"}
    # and the orchestrator counted them (from its socket monitor; a plain peer that gives up
    # first is only disconnected, so one keeps trying while we probe)
    end = time.monotonic() + 20
    while counter(cluster, "auth_refused_handshake") <= before:
        assert time.monotonic() < end
        prober = ctx.socket(zmq.DEALER)
        prober.connect(cluster.orchestrator)
        time.sleep(0.2)  # the probe's interval
        prober.close(linger=0)
    with cluster.client() as client:  # the registry still has its model
        msgs = list(client.stream({"prompt": "Once", "max_tokens": 4}))
    assert isinstance(msgs[-1], wire.Done)


def test_a_key_the_cluster_does_not_know_is_refused_and_counted(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Knowing the server's public key (it is public) is not enough."""
    before = counter(cluster, "auth_refused_unknown_key")
    public, secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = cluster.keyring.server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.connect(cluster.orchestrator)
    assert ask(sock, REGISTER) is None
    assert ask(sock, wire.Ping(), "p") is None
    end = time.monotonic() + 10
    while counter(cluster, "auth_refused_unknown_key") <= before:
        assert time.monotonic() < end
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("address", "role"),
    [
        ("orchestrator", BRIDGE),  # the bridge talks to the gateway only
        ("registry", BRIDGE),  # a gateway may report usage there, nothing else
        ("registry", WORKER),
        ("gateway", WORKER),
        ("gateway", ORCHESTRATOR),
    ],
)
def test_roles_may_only_connect_where_they_belong(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]], address: str, role: str
) -> None:
    sock = cluster.dealer(ctx, getattr(cluster, address), role)
    assert ask(sock, wire.Ping(), "p") is None


def test_only_workers_register_and_stream(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A gateway's (or the CLI's) key cannot join as a worker, so it can neither receive
    prompts nor inject answers."""
    for role in (GATEWAY, ADMIN):
        sock = cluster.dealer(ctx, cluster.orchestrator, role)
        assert ask(sock, REGISTER) is None  # no Ack
        sock.send_multipart([b"gw", b"client", wire.encode(wire.Chunks(parts=[]))])
        assert ask(sock, wire.Ping(), "p") is not None  # connected, and answered a ping
    assert {w.worker_id for w in stats(cluster).workers} == {"worker-1"}
    assert counter(cluster, "forbidden_register") >= 2
    assert counter(cluster, "forbidden_stream") >= 2


def test_only_the_gateway_submits_to_the_orchestrator(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Straight to the orchestrator, a request would skip keys, rate limits and the max_tokens
    cap: a worker's or the CLI's key is refused."""
    for role in (WORKER, ADMIN):
        sock = cluster.dealer(ctx, cluster.orchestrator, role)
        answer = ask(sock, INFER, "direct")
        assert isinstance(answer, wire.Error)
        assert answer.code == "forbidden"
        assert answer.kind == "forbidden"


def test_only_the_cli_writes_the_registry(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    orchestrator = cluster.dealer(ctx, cluster.registry, ORCHESTRATOR)
    listed = ask(orchestrator, wire.RegistryCall(op="list"), "l")
    assert isinstance(listed, wire.RegistryReply)  # reading is its job
    for call in (
        wire.RegistryCall(op="remove", args={"ref": "stories260K"}),
        wire.RegistryCall(op="set_alias", args={"alias": "x", "ref": "stories260K"}),
        wire.RegistryCall(op="set_default", args={"ref": "stories260K"}),
    ):
        answer = ask(orchestrator, call, "w")
        assert isinstance(answer, wire.Error)
        assert answer.code == "forbidden"
    admin = cluster.dealer(ctx, cluster.registry, ADMIN)
    answer = ask(admin, wire.RegistryCall(op="remove", args={"ref": "no-such-model"}), "a")
    assert isinstance(answer, wire.Error)
    assert answer.code != "forbidden"  # allowed, and answered on its merits
    resolved = ask(admin, wire.RegistryCall(op="resolve", args={"ref": "stories260K"}), "r")
    assert isinstance(resolved, wire.RegistryReply)


def test_a_spoofed_client_id_has_no_effect(
    cluster: Cluster, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """The gateway's rate limit (burst 2 here) follows the peer, whatever client name each
    message claims."""
    sock = cluster.dealer(ctx, cluster.gateway, ADMIN)
    codes = []
    for i in range(4):
        request = wire.Infer(request={"prompt": "Once", "max_tokens": 1}, client=f"victim-{i}")
        request_id = f"spoof-{i}"
        sock.send(wire.encode(request, request_id, time.time() + 30))
        while True:
            assert sock.poll(30_000)
            envelope = wire.decode(sock.recv())
            if envelope.id == request_id and isinstance(envelope.msg, wire.Done | wire.Error):
                codes.append(getattr(envelope.msg, "code", "ok"))
                break
    assert codes[:2] == ["ok", "ok"]
    assert codes[2:] == ["rate_limited", "rate_limited"]
    clients = {
        e.get("client")
        for e in cluster.procs["gateway"].log_events()
        if e.get("msg") == "request finished"
    }
    assert not any(str(c).startswith("victim") for c in clients)
