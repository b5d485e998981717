"""Turning faults around a run (full disk, a killed data-loader worker) into one clear line."""

from __future__ import annotations

import re
import signal
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, get_worker_info

from toco.errors import UserError


class WorkerProgress(Dataset):
    """Wraps a dataset and records, in shared memory, the key each loader worker is building.

    If the OS kills a worker (e.g. the out-of-memory killer), the main process can then name
    the worker and the sample it died on.
    """

    def __init__(self, dataset: Dataset, num_workers: int) -> None:
        self.dataset = dataset
        self.slots = torch.full((max(num_workers, 1),), -1, dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        info = get_worker_info()
        self.slots[info.id if info is not None else 0] = key
        return self.dataset[key]


_PIDS = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)")


def dead_worker_error(
    err: RuntimeError,
    loader_iter: Any,
    progress: WorkerProgress,
    names: Optional[list[str]],
    iteration: int,
    resume_hint: str,
) -> Optional[UserError]:
    """A UserError naming the dead worker and its last sample, or None if `err` is not a
    data-loader worker death."""
    found = _PIDS.search(str(err))
    if not found:
        return None
    pids = [int(p) for p in found.group(1).replace(",", " ").split()]
    workers = list(getattr(loader_iter, "_workers", []))
    parts = []
    for pid in pids:
        ids = [i for i, w in enumerate(workers) if w.pid == pid]
        if not ids:
            parts.append(f"data-loader worker (pid {pid}) died")
            continue
        worker_id, code = ids[0], workers[ids[0]].exitcode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exited with status {code}"
        )
        key = int(progress.slots[worker_id])
        if key < 0:
            sample = "before its first sample"
        else:
            index = key % len(progress)
            name = f" ({names[index]})" if names is not None and index < len(names) else ""
            sample = f"while loading image index {index}{name}"
        parts.append(f"data-loader worker {worker_id} (pid {pid}) {how} {sample}")
    return UserError(
        "; ".join(parts) + f" at iteration {iteration} (out of memory? try a "
        f"smaller --num-workers or --batch-size); {resume_hint}"
    )
