"""scripts/gpu_report.py --smoke: every part of the GPU report runs on the CPU at a tiny size
and lands in report.json / report.md; a part over its budget is killed and recorded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import scripts.gpu_report as gpu_report

REPO = Path(__file__).resolve().parent.parent


def test_smoke_runs_every_part_and_writes_the_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    res = subprocess.run(
        [sys.executable, "-m", "scripts.gpu_report", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = json.loads((tmp_path / "report.json").read_text())
    assert list(state["parts"]) == list(gpu_report.PARTS)
    assert all(p["status"] == "ok" and p["result"] for p in state["parts"].values())
    parts = {k: v["result"] for k, v in state["parts"].items()}
    for name in ("train_fp32", "train_bf16", "train_bf16_compile"):
        r = parts[name]
        assert r["train_images_per_s"] == r["config"]["batch_size"] / r["train_s_per_iter"]
        assert r["config"]["crop_size"] == 64 and r["peak_memory_gb"] > 0
    assert parts["train_fp32"]["config"]["amp"] == "none"
    assert parts["train_bf16_compile"]["config"]["compile"] == "default"
    assert [r["configuration"] for r in parts["eval"]["results"]] == [
        "train-val",
        "train-val +CRF",
        "voc-ms",
        "voc-ms +CRF",
    ]
    assert set(parts["loader"]["recipes"]["voc"]["images_per_s"]) == {"0", "1"}
    runs = parts["agreement"]["runs"]
    fp32, bf16 = runs["fp32"]["losses"], runs["bf16"]["losses"]
    assert [r["iter"] for r in fp32] == [r["iter"] for r in bf16] == [1, 2, 3, 4]
    # the same first step in two precisions: the same loss to bf16's ~3 significant digits
    assert math.isclose(fp32[0]["total"], bf16[0]["total"], rel_tol=0.02)
    assert set(runs["fp32"]["miou"]) == set(runs["bf16"]["miou"]) >= {"seg_miou", "cam_miou"}
    md = (tmp_path / "report.md").read_text()
    for heading in ("## Training step", "## Training loader", "## Evaluation", "## bf16 vs fp32"):
        assert heading in md
    assert (tmp_path / "logs" / "agreement.log").is_file()


def test_a_part_over_its_budget_is_killed_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_report, "SMOKE_BUDGET", 1)  # torch alone takes longer to import
    state = gpu_report.report(
        gpu_report.parse_args(["--smoke", "--out", str(tmp_path), "--parts", "train_fp32"])
    )
    part = state["parts"]["train_fp32"]
    assert part["status"] == "timed out after 1 s" and part["result"] is None
    assert "log_tail" in part
    assert json.loads((tmp_path / "report.json").read_text())["parts"]["train_fp32"][
        "status"
    ].startswith("timed out")
    assert "| train_fp32 | timed out after 1 s |" in (tmp_path / "report.md").read_text()
