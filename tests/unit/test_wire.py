import os
import random

import pytest

from haifctl import wire


def test_round_trip_keeps_type_and_envelope() -> None:
    msg = wire.Done(
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=7,
        model="m:1",
        worker="w",
        time_to_first_token_ms=1.5,
        generation_ms=9.0,
    )
    envelope = wire.decode(wire.encode(msg, "req-1", 123.5, "00-abc-def-01"))
    assert envelope.msg == msg
    assert (envelope.id, envelope.deadline, envelope.traceparent) == (
        "req-1",
        123.5,
        "00-abc-def-01",
    )
    assert envelope.v == wire.PROTOCOL_VERSION


def test_random_and_mutated_frames_only_ever_raise_badframe() -> None:
    rng = random.Random(1234)
    valid = [
        wire.encode(wire.Infer(request={"prompt": "hello", "max_tokens": 3}), "id", 1.0),
        wire.encode(wire.Chunk(text="héllo wörld", n_tokens=2), "id"),
        wire.encode(
            wire.Register(
                worker_id="w", models=["m:1"], slots=1, device="cpu", n_ctx=2048, pid=1, host="h"
            )
        ),
    ]
    frames = [os.urandom(rng.randint(0, 80)) for _ in range(20_000)]
    for _ in range(20_000):
        frame = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        frames.append(bytes(frame[: rng.randint(0, len(frame))]))
    decoded = 0
    for frame in frames:
        try:
            wire.decode(frame)
            decoded += 1
        except wire.BadFrame:
            pass
    assert decoded < len(frames)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00",
        b"\x95\x01",
        b"x" * (wire.MAX_FRAME_BYTES + 1),
        wire.encode(wire.Ping()).replace(b"\x01", b"\x02", 1),
    ],
)
def test_bad_frames_are_named(frame: bytes) -> None:
    with pytest.raises(wire.BadFrame):
        wire.decode(frame)


def test_the_wire_caps_model_references_at_the_registrys_own_limit() -> None:
    from haifctl.registry.service import MAX_REF_CHARS

    assert wire.MAX_MODEL_REF_CHARS == MAX_REF_CHARS
