"""The orchestrator's dispatch path alone, in-process: N workers in its table, then requests
handed to ``OrchestratorDaemon.handle`` one by one (an Infer, then the chosen worker's Done), as
tests/unit/test_orchestrator_table.py drives it, with no socket and no other process.

    python bench/orchestrator_dispatch.py [--workers 1000] [--requests 30000] [--no-freeze]

Prints the time ``handle`` takes for an Infer (p50, p99, p99.9, max, in microseconds) and for a
Done, and what the garbage collector did meanwhile: collections per generation, their longest
and mean pause, and the objects it tracks at the end.  Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import time
from typing import Any

import zmq

from haifctl import wire
from haifctl.daemon.orchestrator import OrchestratorDaemon, Resolution
from haifctl.loadgen import percentile
from haifctl.security import GATEWAY, WORKER

MODEL = "stories260K:1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=30000)
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave start-up objects to the collector (builds before OrchestratorDaemon.start "
        "froze them)",
    )
    args = parser.parse_args()

    daemon = OrchestratorDaemon("tcp://127.0.0.1:0", "tcp://127.0.0.1:1", MODEL)
    daemon.started_mono -= 3600  # long up: no start-up grace
    daemon.send = lambda identity, body: None  # type: ignore[method-assign]
    daemon.registry_link = daemon.ctx.socket(zmq.DEALER)  # status updates go nowhere
    daemon.registry_link.connect("inproc://nowhere")
    info = wire.ModelInfo(ref=MODEL, path="/m", context_length=0)
    daemon.resolved[MODEL] = Resolution(info, float("inf"))
    if not args.no_freeze:
        gc.freeze()  # as OrchestratorDaemon.start does once bound
    with contextlib.redirect_stdout(io.StringIO()):  # a log line per registration
        for i in range(args.workers):
            register = wire.Register(
                worker_id=f"w{i}", models=[MODEL], slots=4, device="cpu", n_ctx=512, pid=1, host="h"
            )
            body = wire.encode(register)
            daemon.handle(f"w{i}".encode(), wire.decode(body), body, WORKER)

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    gc.callbacks.append(timed)
    infer = wire.Infer(request={"prompt": "Once upon a time", "max_tokens": 16}, client="bench")
    done = wire.Done(
        finish_reason="stop",
        prompt_tokens=5,
        completion_tokens=16,
        model=MODEL,
        worker="w",
        time_to_first_token_ms=0.0,
        generation_ms=0.0,
    )
    dispatch: list[float] = []
    finish: list[float] = []
    for k in range(args.requests):
        request_id = f"r{k}"
        body = wire.encode(infer, request_id)
        envelope = wire.decode(body)
        start = time.perf_counter()
        daemon.handle(b"gateway", envelope, body, GATEWAY)
        dispatch.append(time.perf_counter() - start)
        worker = daemon.pending[request_id].worker
        assert worker is not None, "no worker took it"
        answer = wire.reply(envelope, done)
        start = time.perf_counter()
        daemon.handle(worker, wire.decode(answer), answer, WORKER)
        finish.append(time.perf_counter() - start)
    gc.callbacks.remove(timed)
    daemon.ctx.destroy(linger=0)

    print(f"{args.workers:,} workers, {args.requests:,} requests")
    for name, values in (("Infer", dispatch), ("Done", finish)):
        p50, p99, p999 = (percentile(values, q) or 0.0 for q in (50, 99, 99.9))
        print(
            f"{name:<6} us: p50 {p50 * 1e6:.1f}  p99 {p99 * 1e6:.1f}"
            f"  p99.9 {p999 * 1e6:.1f}  max {max(values, default=0) * 1e6:,.0f}"
        )
    for generation, values in pauses.items():
        if values:
            print(
                f"gc gen{generation}: {len(values)} collections, longest"
                f" {max(values) * 1e3:.2f} ms, mean {sum(values) / len(values) * 1e3:.2f} ms"
            )
    print(f"objects the collector tracks: {len(gc.get_objects()):,}")


if __name__ == "__main__":
    main()
