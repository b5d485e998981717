"""Faults around a run: full or read-only disk, a loader worker killed by the OS, foreign or
incomplete checkpoints, wandb dying mid-run, and the file mode of what we write."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import train
from tests.test_cli import assert_user_error, run, train_args
from tests.test_runtime import voc  # noqa: F401  (module fixture)
from toco import atomic
from toco.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

SHORT = [
    "--warmup-iters",
    "2",
    "--seg-start-iter",
    "1",
    "--lr",
    "1e-4",
    "--log-every",
    "1",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def finished(voc, tmp_path_factory) -> Path:
    """The checkpoint of a finished 1-iteration run."""
    work = tmp_path_factory.mktemp("faults_ref") / "run"
    assert run(train, train_args(voc, work, *SHORT, "--max-iters", "1", "--eval-every", "1")) == 0
    return work / "checkpoints" / "last.pt"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_checkpoint_write_failure_is_one_line_and_keeps_the_previous_checkpoint(
    voc, tmp_path, monkeypatch, capsys, code
):
    real_save, calls = torch.save, []

    def failing_save(obj, fh, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint (iteration 4) hits the full/read-only disk
            fh.write(b"some bytes")
            raise OSError(code, os.strerror(code))
        return real_save(obj, fh, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    work = tmp_path / "run"
    rc = run(
        train,
        train_args(voc, work, *SHORT, "--max-iters", "6", "--eval-every", "6", "--save-every", "2"),
    )
    assert_user_error(
        capsys,
        rc,
        "cannot write",
        str(work / "checkpoints" / "last.pt"),
        os.strerror(code),
        "intact",
    )
    assert load_checkpoint(work / "checkpoints" / "last.pt")["iteration"] == 2
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["last.pt"]
    assert not (work / "COMPLETE").exists()


def test_read_only_work_dir_fails_before_training(voc, tmp_path, monkeypatch, capsys):
    real_mkdir, ro = Path.mkdir, tmp_path / "ro"

    def mkdir(self, *a, **k):  # the work dir's file system is mounted read-only
        if self == ro or ro in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc = run(train, train_args(voc, tmp_path / "ro" / "run", *SHORT, "--max-iters", "1"))
    assert_user_error(capsys, rc, "cannot write", "Read-only file system")


def test_a_loader_worker_killed_by_the_os_is_named_with_its_image(
    voc, tmp_path, monkeypatch, capsys
):
    from torch.utils.data import get_worker_info

    from datasets.voc import VOCTrainDataset

    real_getitem = VOCTrainDataset.__getitem__

    def oom_killed(self, index):
        if get_worker_info() is not None and self.names[index] == "img_c":
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
        return real_getitem(self, index)

    monkeypatch.setattr(VOCTrainDataset, "__getitem__", oom_killed)
    work = tmp_path / "run"
    rc = run(
        train,
        train_args(
            voc, work, *SHORT, "--max-iters", "4", "--eval-every", "4", "--num-workers", "2"
        ),
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")][0]
    assert "data-loader worker" in line and "killed by SIGKILL" in line, line
    assert "(img_c)" in line and "image index" in line and "rerun" in line, line


def tampered(finished: Path, work: Path, change) -> None:
    state = load_checkpoint(finished)
    change(state)
    (work / "checkpoints").mkdir(parents=True)
    torch.save(state, work / "checkpoints" / "last.pt")


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda s: s.pop("trainer"), ["lacks trainer"]),
        (
            lambda s: s.update(format=CHECKPOINT_FORMAT + 1),
            ["checkpoint format 2", "reads format 1"],
        ),
        (
            lambda s: (
                s["model"].pop("classifier.conv.weight"),
                s["model"].update({"old_head.weight": torch.zeros(1)}),
            ),
            ["missing classifier.conv.weight", "unexpected old_head.weight"],
        ),
        (
            lambda s: s["model"].update({"classifier.conv.weight": torch.zeros(3, 3)}),
            ["shape mismatch classifier.conv.weight (3, 3)"],
        ),
        (lambda s: s["trainer"].pop("optimizer"), ["training state does not fit", "optimizer"]),
    ],
)
def test_checkpoint_from_another_version_names_the_keys(
    voc, finished, tmp_path, capsys, change, needles
):
    work = tmp_path / "run"
    tampered(finished, work, change)
    rc = run(train, train_args(voc, work, *SHORT, "--max-iters", "2", "--eval-every", "2"))
    assert_user_error(capsys, rc, str(work / "checkpoints" / "last.pt"), *needles)


def test_wandb_dying_mid_run_does_not_stop_training(voc, tmp_path, monkeypatch):
    import wandb

    class DyingRun:
        id = "dying"

        def __init__(self):
            self.calls = 0
            self.summary = {}

        def log(self, *a, **k):
            self.calls += 1
            if self.calls >= 2:
                raise BrokenPipeError(32, "wandb service process died")

        def finish(self):
            raise BrokenPipeError(32, "wandb service process died")

    monkeypatch.setattr(wandb, "init", lambda *a, **k: DyingRun())
    work = tmp_path / "run"
    assert (
        run(
            train,
            train_args(
                voc, work, *SHORT, "--max-iters", "3", "--eval-every", "3", "--wandb", "online"
            ),
        )
        == 0
    )
    log = (work / "train.log").read_text()
    assert "wandb log failed (BrokenPipeError" in log and (work / "COMPLETE").exists()
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "total" in r] == [1, 2, 3]
    assert load_checkpoint(work / "checkpoints" / "last.pt")["wandb_id"] == "dying"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_exports_and_dataset_files_get_the_users_mode(finished, tmp_path, umask):
    from datasets.files import write_bytes_atomic
    from toco.export import export_release

    old = os.umask(umask)
    try:
        expected = 0o666 & ~umask
        assert atomic.default_file_mode() == expected
        ckpt = tmp_path / "c.pt"
        save_checkpoint({"model": {}, "config": {}}, ckpt)
        out = export_release(str(finished), str(tmp_path / "m.safetensors"))
        write_bytes_atomic(tmp_path / "d.json", b"{}")
        plain = tmp_path / "plain"
        torch.save({}, plain)  # the reference: what torch.save would give
        for path in (ckpt, out, tmp_path / "d.json", plain):
            assert path.stat().st_mode & 0o777 == expected, path
    finally:
        os.umask(old)


def test_stability_script_counts_steps_with_non_finite_gradients():
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "stability.py"
    spec = importlib.util.spec_from_file_location("stability", script)
    stability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stability)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    watch = stability.GradientWatch()
    try:
        for grad in ([1.0, 2.0], [1.0, float("nan")], [float("inf"), 0.0], [0.5, 0.5]):
            w.grad = torch.tensor(grad)
            opt.step()
    finally:
        watch.close()
    assert (watch.steps, watch.nonfinite, watch.first) == (4, 2, 1)
    opt.step()  # removed: no longer counted
    assert watch.steps == 4
    assert stability.spread([1.0, 3.0]) == {
        "mean": 2.0,
        "std": 1.0,
        "min": 1.0,
        "max": 3.0,
        "range": 2.0,
    }


def test_release_file_with_foreign_weights_names_the_keys(finished, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from toco.errors import UserError
    from toco.export import export_release, load_release

    out = export_release(str(finished), str(tmp_path / "m.safetensors"))
    with safe_open(str(out), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["classifier.conv.weight"] = torch.zeros(2, 2, 1, 1)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(UserError, match=r"shape mismatch classifier.conv.weight \(2, 2, 1, 1\)"):
        load_release(str(tmp_path / "bad.safetensors"))
    load_release(str(out))  # the untouched file still loads
