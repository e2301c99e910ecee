"""Metrics sinks: `RUN_DIR/metrics.jsonl`, TensorBoard (tensorboardX), optional Weights & Biases,
and a tqdm progress bar. Only process 0 writes.

`metrics.jsonl` holds one JSON object per line with `step` and that step's metrics; held-out
accuracy is `eval/accuracy`. On resume, lines past the restored step are dropped so the file
reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterable, Optional

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(run_dir: str) -> list[dict]:
    """All records of a run's metrics.jsonl (a torn last line from a crash is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in run directory {run_dir!r}")
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping a malformed line", path)
    return records


def truncate_metrics(run_dir: str, last_step: int, last_record: Optional[dict] = None) -> None:
    """Keeps only records with step <= last_step (a run resuming from checkpoint `last_step`,
    or starting afresh with 0). `last_record`, the checkpointed step's own record, is appended
    when the file lacks it (the run was killed between the checkpoint and the write)."""
    path = os.path.join(run_dir, METRICS_FILE)
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step] if os.path.isfile(path) else []
    if last_record is not None and not any(r.get("step") == last_step for r in keep):
        keep.append({k: _plain(v) for k, v in last_record.items()})
    if not keep and not os.path.isfile(path):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class MetricsWriter:
    """Writes step metrics to JSONL (+ TensorBoard / W&B when enabled). The JSONL file is
    opened at the first write, so a resumed run may truncate it after creating the writer."""

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self._file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._path = os.path.join(run_dir, METRICS_FILE)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            import wandb  # optional extra

            self._wandb = wandb.init(project=wandb_project, dir=run_dir, config=config, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self._file is None:
            self._file = open(self._path, "a", buffering=1)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """A tqdm bar over training steps showing step, reward, accuracy and ETA."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                         dynamic_ncols=True, desc="srft")

    def update(self, metrics: dict, keys: Iterable[str] = ("reward/rollout", "eval/accuracy", "loss")):
        shown = {}
        for k in keys:
            if k in metrics:
                shown[k.split("/")[-1] if k != "eval/accuracy" else "acc"] = f"{float(metrics[k]):.3f}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def advance_to(self, step: int) -> None:
        """Shows `step` steps as done (a resumed run), without counting them in the rate."""
        self._bar.initial = self._bar.n = step
        self._bar.refresh()

    def write(self, text: str) -> None:
        self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
