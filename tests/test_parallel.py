"""datasets.parallel: a function over items in forked workers that inherit one shared job."""

from __future__ import annotations

import os

import pytest

from datasets import parallel


def _scaled(item: int) -> tuple[int, int]:
    """(item x the shared factor, the pid that computed it); items >= 90 fail."""
    if item >= 90:
        raise ValueError(f"bad item {item}")
    return item * parallel.job()["factor"], os.getpid()


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_from_the_shared_job_in_workers_or_here(workers):
    items = list(range(40))
    with parallel.mapped(_scaled, {"factor": 3}, items, workers, chunksize=4) as out:
        values, pids = zip(*out)
    assert list(values) == [3 * i for i in items]  # ordered, from the inherited job
    assert (os.getpid() in pids) == (workers == 1)  # a pool computed none of them here
    assert parallel.job() is None


def test_unordered_results_hold_every_item():
    with parallel.mapped(_scaled, {"factor": 2}, list(range(30)), 2, ordered=False,
                         chunksize=1) as out:  # fmt: skip
        assert sorted(v for v, _ in out) == [2 * i for i in range(30)]


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_error_is_the_first_failing_items_and_the_job_is_released(workers):
    items = [*range(50), 95, *range(50, 60), 91]  # 95 comes before 91
    with pytest.raises(ValueError, match="bad item 95"):
        with parallel.mapped(_scaled, {"factor": 1}, items, workers, chunksize=2) as out:
            list(out)
    assert parallel.job() is None


def test_worker_count_gives_each_worker_its_minimum():
    assert parallel.worker_count(8, 100, 32) == 3
    assert parallel.worker_count(2, 63, 32) == 1  # 1: no pool
    assert parallel.worker_count(2, 10**6, 32) == 2
    assert parallel.worker_count(0, 10, 1) == 1
