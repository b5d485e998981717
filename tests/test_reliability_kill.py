"""Kill -9 at any moment loses nothing: training, COCO preparation and the label caches.

Training runs are killed from inside a subprocess at a chosen point (mid-run, half-way through a
checkpoint write, during validation) with a real SIGKILL, then rerun; the result must be
bit-identical to an uninterrupted run. The file writers are killed in a forked child at every
atomic write (temp file half written, complete but not renamed, renamed), then rerun; the
output folder must hold exactly the files, bytes and modes of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import datasets.coco as coco
import train
from datasets.labels import image_labels
from datasets.voc import as_layout
from tests.fixtures import make_coco_tree, make_standard_voc_tree
from tests.test_cli import run, train_args
from tests.test_runtime import _env, voc  # noqa: F401  (voc: module fixture)
from toco import atomic
from toco.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
SCHEDULE = [
    "--max-iters",
    "6",
    "--save-every",
    "2",
    "--eval-every",
    "3",
    "--log-every",
    "1",
    "--warmup-iters",
    "2",
    "--seg-start-iter",
    "2",
    "--lr",
    "1e-4",
    "--threads",
    "1",
]

# Runs train.py's main in a subprocess that SIGKILLs itself at the chosen point.
KILLER = r"""
import io, json, os, signal, sys
point, argv = sys.argv[1], json.loads(sys.argv[2])
import torch
import toco.checkpoint, toco.train.engine, toco.train.runner, train
from toco.cli import run_cli

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if point == "step":  # after the update of iteration 4, before its checkpoint
    step = toco.train.engine.Trainer.train_step
    def killing_step(self, batch, it):
        out = step(self, batch, it)
        if it == 4:
            die()
        return out
    toco.train.engine.Trainer.train_step = killing_step
elif point == "checkpoint":  # half-way through writing the second checkpoint (iteration 4)
    save, calls = torch.save, []
    def killing_save(obj, fh, *a, **k):
        calls.append(1)
        if len(calls) < 2:
            return save(obj, fh, *a, **k)
        buf = io.BytesIO()
        save(obj, buf, *a, **k)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        die()
    toco.checkpoint.torch.save = killing_save
elif point == "validation":  # after the first image of the first validation (iteration 3)
    validate = toco.train.runner.validate
    def killing_validate(model, loader, *a, **k):
        def batches():
            for i, batch in enumerate(loader):
                if i == 1:
                    die()
                yield batch
        return validate(model, batches(), *a, **k)
    toco.train.runner.validate = killing_validate
sys.exit(run_cli(lambda: train.main(argv)))
"""


@pytest.fixture(scope="module")
def uninterrupted(voc, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("kill_ref") / "run"
    assert run(train, train_args(voc, work, *SCHEDULE)) == 0
    return work


def assert_same_tensors(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers, compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_sigkill_mid_run_in_a_checkpoint_write_or_in_validation_then_rerun_is_bit_identical(
    voc, uninterrupted, tmp_path
):
    points = {"step": 4, "checkpoint": 2, "validation": 2}  # point -> checkpoint left behind
    runs = {p: tmp_path / p for p in points}
    procs = {
        p: subprocess.Popen(  # killed runs side by side: start-up time dominates
            [sys.executable, "-c", KILLER, p, json.dumps(train_args(voc, w, *SCHEDULE))],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p, w in runs.items()
    }
    for point, proc in procs.items():
        out, err = proc.communicate(timeout=900)  # generous: only a hang should trip it
        assert proc.returncode == -signal.SIGKILL, (point, out, err)
        work = runs[point]
        assert load_checkpoint(work / "checkpoints" / "last.pt")["iteration"] == points[point]
        assert not (work / "COMPLETE").exists()

    def final_state(work: Path) -> dict:
        state = load_checkpoint(work / "checkpoints" / "last.pt")
        for where in ("work_dir", "cache_dir"):  # the runs' own folders
            state["config"].pop(where)
        return state

    reference = final_state(uninterrupted)
    for point, work in runs.items():
        assert run(train, train_args(voc, work, *SCHEDULE)) == 0, point  # resumes by itself
        resumed = final_state(work)
        assert_same_tensors(reference, resumed, point)
        assert json.loads((work / "final.json").read_text()) == json.loads(
            (uninterrupted / "final.json").read_text()
        ), point
        assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["last.pt"], point


# --------------------------------------------------------------------------------------------
# File writers: a forked child dies at the k-th atomic write, in one of three phases.

PHASES = ("half-written temp", "complete temp", "renamed")


def killed_at(job: Callable[[], object], k: int, phase: str) -> bool:
    """Run `job` in a forked child that SIGKILLs itself at its k-th atomic rename, in `phase`;
    True if it died there, False if the job finished first (fewer than k writes)."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 3  # the job raised
        try:
            real_replace, count = os.replace, [0]

            def dying_replace(src, dst):
                count[0] += 1
                if count[0] == k:
                    if phase == PHASES[0]:
                        os.truncate(src, os.path.getsize(src) // 2)
                    if phase == PHASES[2]:
                        real_replace(src, dst)
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst)

            atomic.os.replace = dying_replace
            job()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the job failed in the child"
    return False


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below `folder` (hidden ones included): relative path -> (mode, bytes)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_every_kill_then_rerun_matches(
    make_job: Callable[[Path], Callable[[], object]], base: Path
) -> int:
    reference = base / "reference"
    make_job(reference)()
    expected = snapshot(reference)
    trials = 0
    for k in range(1, 1000):
        for phase in PHASES:
            out = base / f"kill-{k}-{phase.replace(' ', '-')}"
            if not killed_at(make_job(out), k, phase):
                assert trials > 0, "the job never wrote a file"
                return trials
            make_job(out)()  # the rerun
            assert snapshot(out) == expected, (k, phase)
            trials += 1
    raise AssertionError("unbounded number of writes")


def test_coco_prepare_killed_at_any_write_then_rerun_gives_the_same_files(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(coco, "CHECKPOINT_EVERY", 1)  # a manifest checkpoint after each mask
    root = make_coco_tree(tmp_path / "coco2014")

    def make_job(out: Path):  # one subset: the other goes through the same writes
        return lambda: coco.main(
            ["prepare", "--data-root", str(root), "--out", str(out), "--subsets", "train2014"]
        )

    trials = assert_every_kill_then_rerun_matches(make_job, tmp_path)
    assert trials >= 3 * 6  # labels, list, manifest (start, per mask, end), masks


def test_label_cache_killed_at_any_write_then_rerun_gives_the_same_files(tmp_path):
    layout = as_layout(make_standard_voc_tree(tmp_path / "VOC2012"))

    def make_job(cache: Path):
        return lambda: image_labels(layout, "train", 21, cache)

    assert assert_every_kill_then_rerun_matches(make_job, tmp_path) == 3
