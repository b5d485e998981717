"""Run records: a JSONL metrics file always, and a wandb dashboard when asked for.

Only rank 0 tracks. If wandb cannot start (not installed, no network, not logged in), the
run goes on with the JSONL file and says so once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

log = logging.getLogger("toco")


def git_commit() -> Optional[str]:
    """The commit of the code being run, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """Writes `metrics.jsonl` and mirrors everything to wandb when enabled."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        mode: str = "disabled",
        project: str = "wsss-toco",
        name: Optional[str] = None,
        tags: Sequence[str] = (),
        resume_id: Optional[str] = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.run = None
        self._run_id = resume_id
        if mode == "disabled":
            return
        try:
            import wandb

            wandb_dir = run_dir / "wandb_files"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=project,
                name=name or run_dir.name,
                tags=list(tags),
                mode=mode,
                dir=str(wandb_dir),
                config={**config, "git_commit": git_commit()},
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
            self._run_id = self.run.id
        except Exception as err:  # any failure to start wandb must not stop training
            log.warning(
                "wandb could not start (%s: %s); continuing with metrics.jsonl only",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            self.run = None

    @property
    def run_id(self) -> Optional[str]:
        """The wandb run's id (kept after wandb failed, so a resumed run continues it)."""
        return self._run_id

    def _wandb(self, what: str, call: Callable[[Any], Any]) -> None:
        """call(run) unless wandb is off; any failure (its process died, the network went
        away) turns wandb off for the rest of the run instead of stopping training."""
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as err:
            log.warning(
                "wandb %s failed (%s: %s); disabling wandb for this run, metrics.jsonl goes on",
                what,
                type(err).__name__,
                err,
            )
            self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"iter": step, **metrics}) + "\n")
        self._wandb(
            "log", lambda run: run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        )

    def log_validation(
        self,
        summary: dict[str, dict],
        class_names: Sequence[str],
        step: int,
        panels: Optional[list[dict[str, Any]]] = None,
    ) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"iter": step, "val": summary}) + "\n")
        self._wandb(
            "log",
            lambda run: run.log(self._validation_payload(summary, class_names, panels), step=step),
        )

    @staticmethod
    def _validation_payload(
        summary: dict[str, dict], class_names: Sequence[str], panels: Optional[list[dict[str, Any]]]
    ) -> dict[str, Any]:
        import wandb

        columns = ["class"] + list(summary)
        rows = [[c] + [summary[k]["iou"].get(c) for k in summary] for c in class_names]
        payload: dict[str, Any] = {f"val/{k}_miou": v["miou"] for k, v in summary.items()}
        payload["val/iou_table"] = wandb.Table(columns=columns, data=rows)
        if panels:
            labels = dict(enumerate(class_names))
            labels[255] = "ignore"
            payload["val/panels"] = [
                wandb.Image(
                    p["image"],
                    caption=p["caption"],
                    masks={
                        k: {"mask_data": v, "class_labels": labels} for k, v in p["masks"].items()
                    },
                )
                for p in panels
            ]
            payload["val/cam_heatmaps"] = [
                wandb.Image(p["heatmap"], caption=p["caption"]) for p in panels
            ]
        return payload

    def summary(self, values: dict[str, Any]) -> None:
        self._wandb("summary", lambda run: run.summary.update(values))

    def finish(self) -> None:
        self._wandb("finish", lambda run: run.finish())
        self.run = None


def gpu_memory_gb(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


os.environ.setdefault("WANDB_SILENT", "true")
