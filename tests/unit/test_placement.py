"""Placement decisions, sizes, durations and labels: pure functions, checked case by case."""

from __future__ import annotations

import pytest

from haifctl.errors import InvalidInput
from haifctl.placement import (
    Candidate,
    Resident,
    estimate_bytes,
    parse_keep_alive,
    parse_labels,
    parse_memory,
    parse_size,
    place,
)

MIB = 1 << 20


def worker(name: str, budget: int, used: int, load: float = 0.0, **labels: str) -> Candidate:
    return Candidate(key=name, name=name, budget=budget, used=used, load=load, labels=labels)


def test_spread_takes_the_least_loaded_and_binpack_the_fullest_that_fits() -> None:
    workers = [
        worker("roomy", 100 * MIB, 10 * MIB, load=0.5),
        worker("tight", 100 * MIB, 80 * MIB, load=0.0),
        worker("full", 100 * MIB, 99 * MIB, load=0.0),
    ]
    spread = place(workers, 15 * MIB, "spread")
    assert spread.key == "tight"
    assert "least loaded" in spread.reason
    binpack = place(workers, 15 * MIB, "binpack")
    assert binpack.key == "tight"  # 5 MiB left over, against 75 on roomy; full cannot
    assert place(workers, 30 * MIB, "binpack").key == "roomy"
    assert place(workers, 30 * MIB, "spread").key == "roomy"
    assert not spread.evict


def test_the_least_recently_used_idle_model_is_evicted_never_a_busy_one() -> None:
    w = worker("w", 10 * MIB, 9 * MIB)
    w.residents = [
        Resident("busy", 3 * MIB, busy=1, last_used=1.0),
        Resident("old", 3 * MIB, busy=0, last_used=2.0),
        Resident("new", 3 * MIB, busy=0, last_used=3.0),
    ]
    decision = place([w], 4 * MIB)
    assert decision.key == "w"
    assert decision.evict == ["old"]  # 1 + 3 free is enough: only the oldest idle one goes
    assert "evicting idle old" in decision.reason
    assert place([w], 7 * MIB).evict == ["old", "new"]
    refused = place([w], 8 * MIB)  # only by evicting the busy one: no
    assert refused.key is None
    assert "needs 8.0 MiB" in refused.reason
    assert "7.0 MiB" in refused.reason  # the most it could free


def test_pinned_models_stay_and_a_worker_with_room_beats_any_eviction() -> None:
    crowded = worker("crowded", 10 * MIB, 10 * MIB)
    crowded.residents = [Resident("waited-for", 10 * MIB, busy=0, last_used=0.0, pinned=True)]
    assert place([crowded], MIB).key is None
    roomy = worker("roomy", 10 * MIB, 8 * MIB, load=0.9)
    assert place([crowded, roomy], MIB).key == "roomy"


def test_labels_select_workers_and_unknown_budgets_have_room() -> None:
    workers = [worker("cpu", 0, 0), worker("gpu", 0, 0, load=1.0, gpu="h100")]
    assert place(workers, 100 * MIB).key == "cpu"
    assert place(workers, 100 * MIB, selector={"gpu": "h100"}).key == "gpu"
    none = place(workers, MIB, selector={"gpu": "a100"})
    assert none.key is None
    assert "gpu=a100" in none.reason


@pytest.mark.parametrize(
    ("text", "size"),
    [("8G", 8 << 30), ("512M", 512 * MIB), ("1.5GiB", 3 << 29), ("4096", 4096), ("2k", 2048)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "budget"),
    [("8G", (8 << 30, 1.0)), ("50%", (0, 0.5)), ("100%", (0, 1.0)), ("12.5%", (0, 0.125))],
)
def test_a_memory_budget_is_a_size_or_a_share(text: str, budget: tuple[int, float]) -> None:
    assert parse_memory(text) == budget


@pytest.mark.parametrize("text", ["0%", "101%", "half%", "-5%"])
def test_a_share_outside_0_to_100_percent_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="not a share of memory"):
        parse_memory(text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        (30, 30.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        (0, 0.0),
        (-1, None),
        ("-1", None),
    ],
)
def test_keep_alive_as_ollama_reads_it(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


def test_bad_values_are_refused_with_a_hint() -> None:
    for bad in ("soon", True, [1]):
        with pytest.raises(InvalidInput, match="keep_alive"):
            parse_keep_alive(bad)
    with pytest.raises(InvalidInput, match="not a size"):
        parse_size("lots")
    with pytest.raises(InvalidInput, match="KEY=VALUE"):
        parse_labels(["gpu"])
    assert parse_labels(["gpu=h100,zone=a", "rack=3"]) == {"gpu": "h100", "zone": "a", "rack": "3"}
    assert estimate_bytes(100 * MIB, MIB) == 111 * MIB
