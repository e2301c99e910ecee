"""metrics.jsonl and TensorBoard events after interruptions and write failures (issue 15).

A rerun that continues from step S (0: no checkpoint yet) rewrites metrics.jsonl to what an
uninterrupted run writes, and tells TensorBoard to discard later events. A write that fails
(disk full: a tiny tmpfs, skipped where mounting is not permitted; or an injected OSError)
raises RunWriteError naming the file and the OS error, with no thread left behind that could
block the caller (tensorboardX's queue thread once did).
"""

from __future__ import annotations

import errno
import glob
import os
import struct
import threading

import numpy as np
import pytest
from conftest import mount_tmpfs

from srft_jax.faults import RunWriteError
from srft_jax.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, read_metrics

pytestmark = pytest.mark.compat


def _run(run_dir, steps, start_step, tensorboard=True):
    w = MetricsWriter(str(run_dir), start_step=start_step, tensorboard=tensorboard)
    for s in steps:
        w.write(s, {"loss": 1.0 / s, "reward/rollout": s / 10, "note": "text"})
    w.close()


def _steps(run_dir):
    return [r["step"] for r in read_metrics(str(run_dir))]


def test_killed_before_the_first_checkpoint_restarts_the_log(tmp_path):
    _run(tmp_path / "ref", range(1, 6), start_step=0)
    _run(tmp_path / "run", range(1, 4), start_step=0)  # killed after step 3, no checkpoint
    with open(tmp_path / "run" / METRICS_FILE, "a") as f:
        f.write('{"step": 4, "lo')  # and in the middle of writing step 4
    _run(tmp_path / "run", range(1, 6), start_step=0)  # the rerun starts afresh
    assert (tmp_path / "run" / METRICS_FILE).read_text() == (tmp_path / "ref" / METRICS_FILE).read_text()


def test_resume_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    _run(tmp_path / "ref", range(1, 8), start_step=0)
    _run(tmp_path / "run", range(1, 6), start_step=0)  # checkpoint at 3, killed after 5
    _run(tmp_path / "run", range(4, 8), start_step=3)
    assert (tmp_path / "run" / METRICS_FILE).read_text() == (tmp_path / "ref" / METRICS_FILE).read_text()


def test_unreadable_lines_are_skipped(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_bytes(b'{"step": 1, "loss": 0.5}\n\xff\xfe garbage\n{"step": 2, "loss": 0.25}\n')
    assert _steps(tmp_path) == [1, 2]


def _events(path):
    """Records of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out, data = [], open(path, "rb").read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("Q", data[i:i + 8])
        out.append(Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


def test_tensorboard_events_and_the_restart_marker(tmp_path):
    from tensorboardX.proto.event_pb2 import SessionLog

    _run(tmp_path, [1, 2], start_step=0)
    _run(tmp_path, [2, 3], start_step=1)
    files = sorted(glob.glob(str(tmp_path / TENSORBOARD_DIR / "events.out.tfevents.*")))
    assert len(files) == 2
    first, second = (_events(f) for f in files)
    assert first[0].file_version == "brain.Event:2" and second[0].file_version == "brain.Event:2"
    # The rerun's marker: TensorBoard drops earlier events at steps >= 2.
    assert second[1].session_log.status == SessionLog.START and second[1].step == 2
    scalars = {(e.step, v.tag): v.simple_value for e in second[2:] for v in e.summary.value}
    f32 = lambda x: float(np.float32(x))  # TensorBoard scalars are float32
    assert scalars == {(2, "loss"): f32(1 / 2), (2, "reward/rollout"): f32(2 / 10),
                       (3, "loss"): f32(1 / 3), (3, "reward/rollout"): f32(3 / 10)}


# ---- write failures ------------------------------------------------------------------------------
class _FullDisk:
    """A file object whose writes fail like a full disk."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass

    def close(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _threads():
    return set(threading.enumerate())


def test_injected_jsonl_failure(tmp_path):
    before = _threads()
    w = MetricsWriter(str(tmp_path), start_step=0)
    w.write(1, {"loss": 1.0})
    w._file = _FullDisk()
    with pytest.raises(RunWriteError) as err:
        w.write(2, {"loss": 0.5})
    assert str(err.value) == (f"cannot write the metrics log ({tmp_path / METRICS_FILE}): "
                              "[Errno 28] No space left on device")
    w.close()  # releases everything without a second error
    assert _threads() <= before
    assert _steps(tmp_path) == [1]


def test_injected_tensorboard_failure(tmp_path, monkeypatch):
    from tensorboardX.record_writer import RecordWriter

    before = _threads()
    w = MetricsWriter(str(tmp_path), start_step=0)
    w.write(1, {"loss": 1.0})

    def fail(self, data):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(RecordWriter, "write", fail)
    with pytest.raises(RunWriteError, match=r"cannot write TensorBoard events \(.*tensorboard/events\.out\.tfevents"
                                            r".*\): \[Errno 122\] Disk quota exceeded"):
        w.write(2, {"loss": 0.5})
    w.close()
    assert _threads() <= before


@pytest.fixture
def tiny_disk(tmp_path):
    with mount_tmpfs(tmp_path / "disk", "64k") as mount:
        yield mount


@pytest.mark.parametrize("tensorboard", [True, False], ids=["with-tensorboard", "jsonl-only"])
def test_full_disk_ends_in_one_error_not_a_hang(tiny_disk, tensorboard):
    before = _threads()
    w = MetricsWriter(str(tiny_disk / "run"), start_step=0, tensorboard=tensorboard)
    payload = {f"metric/{i}": float(i) for i in range(40)}
    with pytest.raises(RunWriteError) as err:
        for step in range(1, 10_000):  # 64 KiB fill up after a few dozen steps
            w.write(step, payload)
    assert err.value.errno == errno.ENOSPC and str(tiny_disk / "run") in str(err.value)
    assert "\n" not in str(err.value)
    w.close()
    assert _threads() <= before
    steps = _steps(tiny_disk / "run")
    assert steps == list(range(1, len(steps) + 1))  # every complete line is a step, in order


def test_progress_bar_shows_reward_timeouts_when_there_are_any():
    from srft_jax.metrics import Progress

    bar = Progress(10, enabled=True)
    bar.update({"reward/rollout": 0.5, "reward/timeouts": 0.0})
    assert "timeouts" not in bar._bar.postfix
    bar.update({"reward/rollout": 0.5, "reward/timeouts": 3.0})
    assert "timeouts=3" in bar._bar.postfix
    bar.close()
