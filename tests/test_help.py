"""Every command-line entry point answers --help: exit 0, its grouped options, quickly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# entry point (as the docs write it) -> a flag its help must show
ENTRY_POINTS = {
    "train.py": "--grad-checkpointing",
    "evaluate.py": "--protocol",
    "-m toco.train.ablate": "--seeds",
    "-m toco.export": "--checkpoint",
    "-m toco.convert": "--from",
    "-m toco.evaluation.mcis": "--partners",
    "-m datasets.check": "--dataset",
    "-m datasets.coco": "--workers",
    "-m scripts.benchmark": "--iters",
    "-m scripts.bench_crf": "--photos",
    "-m scripts.bench_data": "--workers",
    "-m scripts.bench_eval": "--protocols",
    "-m scripts.bench_frozen": "--configs",
    "-m scripts.bench_plugins": "--steps",
    "-m scripts.bench_scale": "generate",
    "-m scripts.gpu_report": "--smoke",
    "-m scripts.make_official_fixture": "--official",
    "-m scripts.probe_cli_libs": "--library",
    "-m scripts.stability": "--seeds",
}
if (ROOT / "predict.py").exists():
    ENTRY_POINTS["predict.py"] = "--model"


def _modules_with_main() -> set[str]:
    found = set()
    for folder in ("toco", "datasets", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            if 'if __name__ == "__main__"' in path.read_text():
                found.add("-m " + ".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def test_every_entry_point_is_listed():
    scripts = {p.name for p in ROOT.glob("*.py")}
    listed = set(ENTRY_POINTS)
    assert {
        f"-m scripts.{p.stem}"
        for p in (ROOT / "scripts").glob("*.py")
        if 'if __name__ == "__main__"' in p.read_text()
    } <= listed  # the rest: helpers
    assert _modules_with_main() <= listed
    assert {s for s in scripts if 'if __name__ == "__main__"' in (ROOT / s).read_text()} <= listed


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_help(entry):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    tic = time.perf_counter()
    out = subprocess.run(
        [sys.executable, *entry.split(), "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - tic
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:") and "options:" in out.stdout
    assert ENTRY_POINTS[entry] in out.stdout
    assert seconds < 10, f"{entry} --help took {seconds:.1f} s"
