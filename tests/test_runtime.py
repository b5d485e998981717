"""Training at scale: exact resume, atomic checkpoints, signals, NaN handling, torchrun, wandb,
release export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from tests.fixtures import make_standard_voc_tree
from tests.test_cli import run, train_args
from toco.checkpoint import load_checkpoint, save_checkpoint
from toco.train.sampling import ResumableSampler, SeededSamples

REPO = Path(__file__).resolve().parent.parent
SHORT = [
    "--warmup-iters",
    "2",
    "--seg-start-iter",
    "2",
    "--lr",
    "1e-4",
    "--log-every",
    "1",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_standard_voc_tree(tmp_path_factory.mktemp("runtime") / "VOC2012")


def weights(work: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(work / "checkpoints" / "last.pt")["model"]


def test_stop_and_resume_equals_uninterrupted(voc, tmp_path):
    common = SHORT + ["--max-iters", "5", "--eval-every", "5", "--save-every", "100"]
    assert run(train, train_args(voc, tmp_path / "full", *common)) == 0
    split = tmp_path / "split"
    assert run(train, train_args(voc, split, *common, "--stop-at", "3")) == 0
    assert load_checkpoint(split / "checkpoints" / "last.pt")["iteration"] == 3
    assert not (split / "COMPLETE").exists()
    assert run(train, train_args(voc, split, *common)) == 0  # auto-resumes the unfinished run
    full, resumed = weights(tmp_path / "full"), weights(split)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_checkpoint_killed_mid_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}, "iteration": 1}, path)

    def dying_save(obj, fh, *a, **k):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. the job killed while writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}, "iteration": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_nonfinite_loss_stops_with_the_term_named_or_is_skipped(voc, tmp_path, monkeypatch, capsys):
    from toco.method.losses import PatchTokenContrast

    original = PatchTokenContrast.compute

    def nan_at_iteration_2(self, state):
        out = original(self, state)
        return {"ptc": out["ptc"] * float("nan")} if state.iteration == 2 else out

    monkeypatch.setattr(PatchTokenContrast, "compute", nan_at_iteration_2)
    work = tmp_path / "stop"
    args = SHORT + ["--max-iters", "4", "--eval-every", "4", "--save-every", "2"]
    assert run(train, train_args(voc, work, *args)) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 2" in err and "ptc=nan" in err
    assert load_checkpoint(work / "checkpoints" / "last.pt")["iteration"] == 2
    skip = tmp_path / "skip"
    assert run(train, train_args(voc, skip, *args, "--nonfinite", "skip")) == 0
    final = json.loads((skip / "final.json").read_text())
    assert final["skipped_steps"] == 1 and final["iterations"] == 4


def test_sampler_is_deterministic_resumable_and_sharded():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(ResumableSampler(10, 2, seed=3), 14)  # 5 iterations per epoch, 7 iterations
    assert full == take(ResumableSampler(10, 2, seed=3), 14)
    assert take(ResumableSampler(10, 2, seed=3, start_iter=4), 6) == full[8:]
    assert sorted(k % 10 for k in full[:10]) == list(range(10))  # one epoch = a permutation
    assert all(k >= 10 for k in full[10:])  # keys of epoch 1 carry the epoch
    ranks = [take(ResumableSampler(10, 2, seed=3, rank=r, world_size=2), 4) for r in (0, 1)]
    single = take(ResumableSampler(10, 4, seed=3), 8)
    assert ranks[0][:2] + ranks[1][:2] == single[:4]  # global batch 0 split over two ranks
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(3, 2, seed=0, world_size=2)


def test_seeded_samples_do_not_depend_on_global_rng():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    ds = SeededSamples(Noise(), seed=1)
    torch.manual_seed(0)
    a = ds[5]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    b = ds[5]
    assert torch.equal(a, b) and not torch.equal(ds[5], ds[6])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left untouched


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }


def test_sigterm_saves_a_checkpoint_that_resumes(voc, tmp_path):
    work = tmp_path / "run"
    args = train_args(
        voc, work, *SHORT, "--max-iters", "400", "--eval-every", "400", "--save-every", "1000"
    )
    proc = subprocess.Popen(
        _python(str(REPO / "train.py"), *args),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        if "iter 3/400" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped at iteration" in out and "SIGTERM" in out
    stopped_at = load_checkpoint(work / "checkpoints" / "last.pt")["iteration"]
    assert 3 <= stopped_at < 400
    assert not (work / "COMPLETE").exists()


def test_torchrun_two_processes_on_cpu(voc, tmp_path):
    work = tmp_path / "ddp"
    args = train_args(
        voc,
        work,
        *SHORT,
        "--max-iters",
        "2",
        "--eval-every",
        "2",
        "--batch-size",
        "4",
        "--loss-group-size",
        "2",
    )
    cmd = _python(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        *args,
    )
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cpu x2" in res.stdout
    ckpt = load_checkpoint(work / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == 2 and {"model", "trainer", "config"} <= set(ckpt)
    assert (work / "COMPLETE").exists()
    assert res.stdout.count("validation at iteration 2") == 1  # only rank 0 reports


def test_wandb_offline_writes_history_and_images(voc, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    work = tmp_path / "wb"
    args = train_args(
        voc,
        work,
        *SHORT,
        "--max-iters",
        "2",
        "--eval-every",
        "2",
        "--wandb",
        "offline",
        "--num-vis",
        "2",
    )
    assert run(train, args) == 0
    runs = list((work / "wandb_files" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))


def test_wandb_failure_is_not_fatal(voc, tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    work = tmp_path / "wbfail"
    args = train_args(
        voc, work, *SHORT, "--max-iters", "2", "--eval-every", "2", "--wandb", "online"
    )
    assert run(train, args) == 0
    assert "wandb could not start" in (work / "train.log").read_text()
    assert (work / "metrics.jsonl").exists() and (work / "COMPLETE").exists()


def test_release_export_roundtrip(voc, tmp_path):
    from toco.export import export_release, load_release

    work = tmp_path / "rel"
    assert run(train, train_args(voc, work, *SHORT, "--max-iters", "1", "--eval-every", "1")) == 0
    out = export_release(str(work / "checkpoints" / "last.pt"), str(tmp_path / "m.safetensors"))
    model, cfg = load_release(str(out))
    assert cfg.max_iters == 1
    state = weights(work)
    for k, v in model.state_dict().items():
        if not k.startswith("proj_head_teacher."):  # training-only, not exported
            assert torch.equal(v, state[k]), k
