"""Metrics sinks: `RUN_DIR/metrics.jsonl`, TensorBoard events, optional Weights & Biases, and a
tqdm progress bar. Only process 0 writes.

`metrics.jsonl` holds one JSON object per line with `step` and that step's metrics; held-out
accuracy is `eval/accuracy`. A run that starts from the checkpoint of step S (S = 0: no
checkpoint) passes `start_step=S`: lines past S are dropped and TensorBoard is told to discard
its events past S, so both read as if the run had never stopped, also when it was killed
before its first checkpoint.

Writes happen in the calling thread (TensorBoard events too: tensorboardX's `SummaryWriter`
queues them to a thread that dies on a write error, after which its bounded queue blocks the
caller forever). A failed write (disk full, quota, permissions) raises `RunWriteError` naming the
file and the OS error; lines already written stay (a torn last line is skipped on reading).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from typing import Iterable, Optional

import numpy as np

from srft_jax.faults import MissingDataError, RunWriteError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


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
        raise MissingDataError(f"no {METRICS_FILE} in run directory {run_dir!r}")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
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
    """Keeps only records with step <= last_step: call it with the step a run continues from
    (0 when it starts without a checkpoint). `last_record`, the checkpointed step's own record,
    is appended when the file lacks it (the run was killed between the checkpoint and the
    write). Atomic: the file is rewritten and renamed, so a failure (RunWriteError) leaves it
    as it was."""
    path = os.path.join(run_dir, METRICS_FILE)
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step] if os.path.isfile(path) else []
    if last_record is not None and not any(r.get("step") == last_step for r in keep):
        keep.append({k: _plain(v) for k, v in last_record.items()})
    if not keep and not os.path.isfile(path):
        return
    tmp = path + ".tmp"
    with _writing("the metrics log", path):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)


class MetricsWriter:
    """Writes step metrics to JSONL (+ TensorBoard / W&B when enabled).

    start_step: the step this run continues from (its checkpoint's step; 0 without one):
      metrics.jsonl is cut to steps <= start_step and TensorBoard discards later events. None
      leaves existing files as they are. last_record: the checkpointed step's own record
      (see `truncate_metrics`).
    Raises RunWriteError (from the constructor or `write`) when a file cannot be written; after
    that, `close` releases the files without raising again.
    """

    def __init__(self, run_dir: str, *, start_step: Optional[int] = None,
                 last_record: Optional[dict] = None, enabled: bool = True,
                 tensorboard: bool = True, wandb_project: Optional[str] = None,
                 config: Optional[dict] = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._tb: Optional[EventFile] = None
        self._wandb = None
        self._file = None
        self._failed = False
        if not enabled:
            return
        with _writing("the run directory", run_dir):
            os.makedirs(run_dir, exist_ok=True)
        if start_step is not None:
            truncate_metrics(run_dir, start_step, last_record)
        with _writing("the metrics log", self.path):
            self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = EventFile(os.path.join(run_dir, TENSORBOARD_DIR), start_step)
        if wandb_project:
            import wandb  # optional extra

            self._wandb = wandb.init(project=wandb_project, dir=run_dir, config=config, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        try:
            with _writing("the metrics log", self.path):
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            if self._tb is not None:
                self._tb.scalars(step, scalars)
        except RunWriteError:
            self._failed = True
            raise
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Closes every sink; raises RunWriteError if the final flush fails (unless a write
        failed before: that was the error to report)."""
        sinks = [(self._file, "the metrics log", self.path)]
        if self._tb is not None:
            sinks.append((self._tb, "TensorBoard events", self._tb.path))
        self._file = self._tb = None
        failure = None
        for sink, what, path in sinks:
            if sink is None:
                continue
            try:
                with _writing(what, path):
                    sink.close()
            except RunWriteError as e:
                failure = failure or e
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if failure is not None and not self._failed:
            raise failure


class EventFile:
    """Scalars in a TensorBoard event file, written and flushed by the calling thread.

    start_step S (not None): a SessionLog START event at step S + 1 makes TensorBoard drop the
    events of earlier files at steps > S (what a previous, interrupted run logged past the
    checkpoint this run continues from).
    """

    def __init__(self, logdir: str, start_step: Optional[int] = None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import RecordWriter

        self._event = Event
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        with _writing("TensorBoard events", self.path):
            os.makedirs(logdir, exist_ok=True)
            self._writer = RecordWriter(self.path)
            self._writer.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
            if start_step is not None:
                self._writer.write(Event(wall_time=time.time(), step=start_step + 1, session_log=SessionLog(
                    status=SessionLog.START)).SerializeToString())
            self._writer.flush()

    def scalars(self, step: int, values: dict) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        event = self._event(wall_time=time.time(), step=int(step), summary=summary)
        with _writing("TensorBoard events", self.path):
            self._writer.write(event.SerializeToString())
            self._writer.flush()

    def close(self) -> None:
        with _writing("TensorBoard events", self.path):
            self._writer.close()


@contextlib.contextmanager
def _writing(what: str, path: str):
    """Turns an OSError into RunWriteError naming `what` and `path`."""
    try:
        yield
    except OSError as e:
        raise RunWriteError.from_exception(what, path, e) from None


class Progress:
    """A tqdm bar over training steps showing step, reward, accuracy and ETA (and reward
    timeouts, in steps that had any)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                         dynamic_ncols=True, desc="srft")

    def update(self, metrics: dict, keys: Iterable[str] = ("reward/rollout", "eval/accuracy", "loss")):
        shown = {}
        for k in keys:
            if k in metrics:
                shown[k.split("/")[-1] if k != "eval/accuracy" else "acc"] = f"{float(metrics[k]):.3f}"
        if metrics.get("reward/timeouts"):
            shown["timeouts"] = str(int(metrics["reward/timeouts"]))
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
