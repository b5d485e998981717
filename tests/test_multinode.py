"""Two torchrun node ranks (c10d rendezvous, gloo, on this machine) train, checkpoint and resume
and end where one process with the same global batch ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.fixtures import make_standard_voc_tree
from tests.test_cli import train_args
from tests.test_reliability_kill import assert_same_tensors
from toco.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
COMMON = [
    "--warmup-iters",
    "2",
    "--seg-start-iter",
    "2",
    "--lr",
    "1e-4",
    "--log-every",
    "1",
    "--max-iters",
    "4",
    "--eval-every",
    "4",
    "--save-every",
    "100",
    "--batch-size",
    "4",
    "--loss-group-size",
    "2",
]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], timeout: int = 180) -> list[subprocess.CompletedProcess]:
    """Start the same command as node 0 and node 1 of a 2-node job; wait for both."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"localhost:{port}",
        "--rdzv_id",
        "multinode-test",
        str(REPO / "train.py"),
        *args,
    ]
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(cmd, p.returncode, out) for p, out in zip(procs, outs)]


def state(work: Path) -> dict:
    return load_checkpoint(work / "checkpoints" / "last.pt")


def test_two_nodes_stop_resume_and_match_one_node(tmp_path):
    voc = make_standard_voc_tree(tmp_path / "VOC2012")
    one_node = tmp_path / "one_node"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "train.py"),
            *train_args(voc, one_node, *COMMON),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    nodes = tmp_path / "nodes"
    for extra in (["--stop-at", "2"], []):  # the second launch resumes the stopped run
        results = two_nodes(train_args(voc, nodes, *COMMON, *extra))
        for r in results:
            assert r.returncode == 0, r.stdout[-4000:]
        assert sum("cpu x2" in r.stdout for r in results) == 1  # rank 0 logs, on one node
    assert sum("resuming from" in r.stdout for r in results) == 1
    a, b = state(one_node), state(nodes)
    assert a["iteration"] == b["iteration"] == 4
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["trainer"], b["trainer"], "trainer")
