"""Which workers a scale adds and retires: the supervisor's plan, on its own."""

from __future__ import annotations

from haifctl.daemon.supervisor import plan_scale


def test_scale_down_retires_the_least_busy_newest_first_on_a_tie() -> None:
    workers = [
        ("worker-1", "a", 3),
        ("worker-2", "a", 0),
        ("worker-3", "a", 1),
        ("worker-4", "a", 0),
    ]
    assert plan_scale(workers, ["a"], 2) == ([], ["worker-4", "worker-2"])
    assert plan_scale(workers, ["a"], 1) == ([], ["worker-4", "worker-2", "worker-3"])


def test_a_worker_not_serving_yet_retires_first() -> None:
    workers = [("worker-1", "a", 0), ("worker-2", "a", -1)]
    assert plan_scale(workers, ["a"], 1) == ([], ["worker-2"])


def test_workers_keep_taking_turns_over_the_models() -> None:
    # two models, four workers: the two least busy serve "a", but "a" keeps one
    workers = [
        ("worker-1", "a", 0),
        ("worker-2", "b", 5),
        ("worker-3", "a", 0),
        ("worker-4", "b", 4),
    ]
    add, retire = plan_scale(workers, ["a", "b"], 2)
    assert add == []
    assert retire == ["worker-3", "worker-4"]
    # and back up: the new workers go to the models in turn
    left = [("worker-1", "a", 0), ("worker-2", "b", 5)]
    assert plan_scale(left, ["a", "b"], 5) == (["a", "b", "a"], [])


def test_the_same_number_changes_nothing() -> None:
    workers = [("worker-1", "a", 2), ("worker-2", "a", 0)]
    assert plan_scale(workers, ["a"], 2) == ([], [])
    assert plan_scale(workers, ["a"], 3) == (["a"], [])
