"""A real worker seen from a hand-made orchestrator (a CURVE ROUTER with the cluster's keys): it
heartbeats as often as the answer to its Register says, asks for an answer only once it has
heard nothing for a while, and registers again when told it is unknown; its engine streams on
a link of its own; a draining worker waits for the orchestrator to hear it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from haifctl import wire
from haifctl.registry.service import builtin_model_path
from haifctl.security import Keyring
from tests.cluster import Proc

TOLD_S = 0.1  # the interval this orchestrator tells the worker: a fifth of its own 0.5 s


class Orchestrator:
    """The orchestrator's end of one worker's link, answering by hand."""

    def __init__(self, home: Path) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        Keyring.ensure(home).server(self.router, "orchestrator")
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"

    def next(self, timeout_s: float = 60.0) -> tuple[bytes, wire.Envelope]:
        while True:
            frames = self.frames(timeout_s)
            if len(frames) == 2:
                return frames[0], wire.decode(frames[1])

    def frames(self, timeout_s: float = 60.0) -> list[bytes]:
        assert self.router.poll(int(timeout_s * 1000)), "the worker sent nothing"
        return self.router.recv_multipart()

    def next_of(self, kind: type[wire.Msg], timeout_s: float = 60.0) -> tuple[bytes, wire.Msg]:
        end = time.monotonic() + timeout_s
        while True:
            identity, envelope = self.next(max(0.0, end - time.monotonic()))
            if isinstance(envelope.msg, kind):
                return identity, envelope.msg

    def answer(self, identity: bytes, msg: wire.Msg) -> None:
        self.router.send_multipart([identity, wire.encode(msg)])


def heartbeat(orchestrator: Orchestrator) -> wire.Heartbeat:
    _, beat = orchestrator.next_of(wire.Heartbeat, timeout_s=10.0)
    assert isinstance(beat, wire.Heartbeat)
    return beat


@pytest.fixture
def link(tmp_path: Path) -> Iterator[tuple[Orchestrator, Proc]]:
    home = tmp_path / "home"
    orchestrator = Orchestrator(home)
    env = {**os.environ, "HAIF_HOME": str(home), "HAIF_THREADS": "1", "HAIF_SLOTS": "1"}
    args = ["worker", "--orchestrator", orchestrator.address, "--worker-id", "w"]
    worker = Proc("worker", [*args, "--model", str(builtin_model_path())], tmp_path, env)
    try:
        yield orchestrator, worker
    finally:
        worker.stop()
        orchestrator.ctx.destroy(linger=0)


def test_a_worker_heartbeats_as_told_and_asks_for_an_answer_only_when_it_hears_nothing(
    link: tuple[Orchestrator, Proc],
) -> None:
    orchestrator, _ = link
    identity, register = orchestrator.next_of(wire.Register)
    assert isinstance(register, wire.Register)
    orchestrator.answer(identity, wire.Ack(known=True, heartbeat_s=TOLD_S))
    # Heard from just now: its heartbeats ask for nothing (once those sent before our answer
    # reached it have come), until half its silence limit (3 s: the larger of its own timeout
    # and 6 told intervals) has passed without a word.
    while heartbeat(orchestrator).ack:  # sent before our answer reached it
        pass
    quiet = 1
    while not heartbeat(orchestrator).ack:
        quiet += 1
        assert quiet < 100, "it never asked for an answer"
    # 1.5 s of heartbeats: about 15 at the interval it was told, 3 at its own
    assert quiet >= 6, f"{quiet} heartbeats before it asked: it kept its own interval"
    # told it is unknown (this orchestrator restarted), it announces itself again
    orchestrator.answer(identity, wire.Ack(known=False))
    _, again = orchestrator.next_of(wire.Register, timeout_s=10.0)
    assert isinstance(again, wire.Register)
    assert again.worker_id == "w"
    assert again.rejoin  # it was known here before: the orchestrator waits for the others


def test_an_answer_silences_the_asking(link: tuple[Orchestrator, Proc]) -> None:
    """Any message from the orchestrator counts as hearing from it: a heartbeat answered
    makes the next ones ask for nothing."""
    orchestrator, _ = link
    identity, _ = orchestrator.next_of(wire.Register)
    orchestrator.answer(identity, wire.Ack(known=True, heartbeat_s=TOLD_S))
    while heartbeat(orchestrator).ack:  # sent before our answer reached it
        pass
    while not heartbeat(orchestrator).ack:  # then quiet until it has heard nothing for a while
        pass
    orchestrator.answer(identity, wire.Ack(known=True))
    # the beats it sent before our answer reached it may still ask; then it stops asking
    asks = [heartbeat(orchestrator).ack for _ in range(8)]
    assert asks[-4:] == [False] * 4, asks


def test_the_engine_streams_on_its_own_link_and_ends_after_its_text(
    link: tuple[Orchestrator, Proc],
) -> None:
    """Stream frames and the Done come from the engine's link (named after the worker), in
    order, with the first text alone and marked Started; the main link only registers,
    heartbeats and answers."""
    orchestrator, _ = link
    identity, _ = orchestrator.next_of(wire.Register)
    assert identity == b"w"
    orchestrator.answer(identity, wire.Ack(known=True))
    route = [b"client-1", b"gateway-1"]  # as an orchestrator sends it: client first
    request = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True}
    infer = wire.Infer(request=request, route=route)
    orchestrator.router.send_multipart([identity, wire.encode(infer, "r1")])
    texts: list[wire.Part] = []
    while True:
        frames = orchestrator.frames(timeout_s=30.0)
        if len(frames) == 2 and isinstance(wire.decode(frames[1]).msg, wire.Heartbeat):
            assert frames[0] == identity
            continue
        assert frames[0].startswith(b"w\x00"), frames[0]  # the engine's link, not the main one
        if len(frames) == 2:
            done = wire.decode(frames[1])
            break
        assert frames[1:3] == [b"gateway-1", b"client-1"]  # routed back the way it came
        chunks = wire.decode(frames[3]).msg
        assert isinstance(chunks, wire.Chunks)
        if not texts:
            assert len(frames) == 5, "the first text carries the Started note"
            assert wire.decode(frames[4]).msg == wire.Started(ids=["r1"])
            assert chunks.parts[0].n_tokens == 1  # the first token goes out alone
        else:
            assert len(frames) == 4
        texts.extend(chunks.parts)
    assert done.id == "r1"
    assert isinstance(done.msg, wire.Done)
    assert done.msg.completion_tokens == 40
    assert sum(part.n_tokens for part in texts) == 40  # nothing came after the Done


def test_a_registration_naming_a_request_that_ended_is_answered_with_its_end(
    link: tuple[Orchestrator, Proc],
) -> None:
    """A request's Done travels on the engine's link and may cross a registration that still
    names it; told to stop a request it no longer runs, the worker says it ended, on its main
    link, so the orchestrator frees the slot."""
    orchestrator, _ = link
    identity, _ = orchestrator.next_of(wire.Register)
    orchestrator.answer(identity, wire.Ack(known=True, cancel=["long-gone"]))
    while True:
        who, envelope = orchestrator.next(timeout_s=10.0)
        if isinstance(envelope.msg, wire.Error):
            break
    assert who == identity
    assert envelope.id == "long-gone"
    assert envelope.msg.code == "ended"


def sleepy(orchestrator: Orchestrator) -> bytes:
    """Tell the worker to heartbeat every 600 s; return once it has (its loop then sleeps
    until the next one, unless woken)."""
    identity, _ = orchestrator.next_of(wire.Register)
    orchestrator.answer(identity, wire.Ack(known=True, heartbeat_s=600.0))
    while True:  # heartbeats sent before our answer reached it ask for one
        _, envelope = orchestrator.next(timeout_s=10.0)
        if isinstance(envelope.msg, wire.Heartbeat) and not envelope.msg.ack:
            return identity


def test_sigterm_is_told_at_once_and_a_request_sent_meanwhile_is_refused(
    link: tuple[Orchestrator, Proc],
) -> None:
    """On SIGTERM a worker with nothing running says at once that it drains, and asks for
    an answer before it exits: a request the orchestrator sent before it heard arrives
    before that answer and is refused for another worker, rather than lost with the
    worker."""
    orchestrator, worker = link
    identity = sleepy(orchestrator)
    worker.kill(signal.SIGTERM)
    _, envelope = orchestrator.next(timeout_s=10.0)  # long before its next heartbeat
    beat = envelope.msg
    assert isinstance(beat, wire.Heartbeat)
    assert beat.draining
    assert beat.ack
    request = {"prompt": "Once upon a time", "max_tokens": 8}
    infer = wire.Infer(request=request, route=[b"client-1", b"gateway-1"])
    orchestrator.router.send_multipart([identity, wire.encode(infer, "late")])
    orchestrator.router.send_multipart([identity, wire.encode(wire.Ack(known=True), envelope.id)])
    _, refusal = orchestrator.next_of(wire.Error, timeout_s=10.0)
    assert isinstance(refusal, wire.Error)
    assert refusal.code == "worker_draining"  # retryable: the orchestrator tries elsewhere
    assert worker.popen.wait(timeout=30) == 0


def test_a_draining_worker_does_not_wait_for_a_silent_orchestrator(
    link: tuple[Orchestrator, Proc],
) -> None:
    """It asks, hears nothing, and exits after a second (its loop looks while it drains)
    rather than at its next heartbeat, 600 s away."""
    orchestrator, worker = link
    sleepy(orchestrator)
    worker.kill(signal.SIGTERM)
    assert worker.popen.wait(timeout=15) == 0
