"""One function over many files in forked worker processes that share a read-only job.

The job (a layout, a parsed annotation index) is set before the pool forks, so every worker
inherits it instead of unpickling it, and a task is just a name: pickling each task's share of
a large job kept the main process as busy as a worker. A worker function reads it with `job()`.
Without a pool the same function runs in this process, with the same `job()`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_job: Any = None


def job() -> Any:
    """The job of the `mapped` call this process works for."""
    return _job


def worker_count(wanted: int, items: int, min_per_worker: int) -> int:
    """At most ``wanted`` processes, each with at least ``min_per_worker`` items (a pool costs
    its start-up); 1 means no pool."""
    return max(1, min(wanted, items // max(1, min_per_worker)))


@contextlib.contextmanager
def mapped(
    fn: Callable[[T], R],
    shared: Any,
    items: Sequence[T],
    workers: int,
    *,
    ordered: bool = True,
    chunksize: int = 64,
) -> Iterator[Iterable[R]]:
    """Yield the results of ``fn`` over ``items``, computed in ``workers`` forked processes
    (in this one when ``workers`` <= 1) while `job()` returns ``shared``. Ordered results raise
    the error of the first failing item, as a plain loop does; unordered ones come as they are
    done. Leaving the block stops the workers."""
    global _job
    _job = shared
    try:
        if workers <= 1:
            yield map(fn, items)
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                run = pool.imap if ordered else pool.imap_unordered
                yield run(fn, items, chunksize=chunksize)
    finally:
        _job = None
