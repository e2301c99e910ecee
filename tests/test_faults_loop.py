"""Faults met by the whole training loop (issue 15), on the demo config with a tiny model:
every interrupted run, once rerun with the same command, ends exactly as an uninterrupted run
(the same metrics, apart from timers, and the same parameters bit for bit).

- SIGKILL right after checkpoint 2 is committed (possibly inside the next asynchronous save);
- SIGTERM in the middle of the run: the step in progress finishes, is checkpointed, one line
  says where, exit code 75;
- SIGKILL before the first checkpoint: the rerun starts afresh and metrics.jsonl holds each
  step once;
- the newest checkpoint damaged: it is moved aside with a warning, the previous one is used;
- a metrics write failing (no space left on device): one `error:` line naming the file and the
  OS error, exit 1, the previous checkpoint intact, and the rerun continues from it.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from srft_jax.cli import main as cli_main
from srft_jax.metrics import read_metrics
from test_train_loop import SMALL, VOLATILE, _params

pytestmark = pytest.mark.compat

STEPS = 8
PATIENCE_S = 600  # only ever waited out when something is broken


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "srft_jax.cli", "--log-level", "WARNING", "train", "--config", "demo",
            f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.checkpoint_every=2",
            "eval.every=0", "train.export_hf=false", "train.tensorboard=false", *SMALL,
            "train.optim.schedule=constant", *extra]  # runs of different lengths, one schedule


def _stable(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(str(run_dir))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    ref = tmp_path_factory.mktemp("faults") / "ref"
    subprocess.run(_cmd(ref), check=True, timeout=PATIENCE_S, capture_output=True)
    return ref


def _same_as_reference(run_dir, reference):
    got = _stable(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got == _stable(reference)
    for a, b in zip(_params(run_dir, STEPS), _params(reference, STEPS)):
        np.testing.assert_array_equal(a, b)


def _start(run_dir, *extra):
    return subprocess.Popen(_cmd(run_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)


def _wait_for(proc, ready):
    deadline = time.time() + PATIENCE_S
    while not ready():
        assert proc.poll() is None, "the run ended before the fault could be injected"
        assert time.time() < deadline
        time.sleep(0.02)


def _logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def test_sigkill_after_a_checkpoint_resumes_exactly(tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(run)
    try:
        _wait_for(proc, lambda: os.path.isdir(run / "checkpoints" / "2"))
    finally:
        _kill(proc)
    assert max(r["step"] for r in read_metrics(str(run))) < STEPS
    subprocess.run(_cmd(run), check=True, timeout=PATIENCE_S, capture_output=True)
    _same_as_reference(run, reference)


def test_sigterm_finishes_the_step_checkpoints_it_and_exits_75(tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(run)
    try:
        _wait_for(proc, lambda: _logged_steps(run) >= 3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=PATIENCE_S)
    finally:
        _kill(proc)
    assert proc.returncode == 75, out
    stopped = [line for line in out.splitlines() if line.startswith("stopped after step")]
    assert len(stopped) == 1, out
    step = int(stopped[0].split()[3])
    assert 3 <= step < STEPS and "Traceback" not in out
    assert f"checkpoint saved to {run / 'checkpoints' / str(step)}" in stopped[0]
    assert os.path.isdir(run / "checkpoints" / str(step))
    assert [r["step"] for r in read_metrics(str(run))] == list(range(1, step + 1))
    subprocess.run(_cmd(run), check=True, timeout=PATIENCE_S, capture_output=True)
    _same_as_reference(run, reference)


def test_sigkill_before_the_first_checkpoint_logs_each_step_once(tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(run, "train.checkpoint_every=100")  # the first checkpoint is the last step's
    try:
        _wait_for(proc, lambda: _logged_steps(run) >= 2)
    finally:
        _kill(proc)
    assert not glob.glob(str(run / "checkpoints" / "[0-9]*"))
    subprocess.run(_cmd(run, "train.checkpoint_every=100"), check=True, timeout=PATIENCE_S,
                   capture_output=True)
    _same_as_reference(run, reference)


def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, reference):
    run = tmp_path / "run"
    subprocess.run(_cmd(run, "train.steps=4"), check=True, timeout=PATIENCE_S, capture_output=True)
    files = (glob.glob(str(run / "checkpoints" / "4" / "params" / "ocdbt.process_*" / "d" / "*"))
             + glob.glob(str(run / "checkpoints" / "4" / "params" / "d" / "*")))
    assert files
    for path in files:  # every parameter data file truncated to half
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    out = subprocess.run(_cmd(run), check=True, timeout=PATIENCE_S, capture_output=True, text=True)
    warning = [line for line in out.stdout.splitlines() + out.stderr.splitlines()
               if "checkpoint step 4 does not restore" in line]
    assert len(warning) == 1 and "checkpoints.bad" in warning[0]
    assert len(glob.glob(str(run / "checkpoints.bad" / "4-*"))) == 1  # kept, not deleted
    _same_as_reference(run, reference)


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, path):
        self.path = path

    def write(self, text):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

    def flush(self):
        pass

    def close(self):
        pass


def test_a_failed_metrics_write_ends_the_run_with_one_line(tmp_path, reference, monkeypatch, capsys):
    from srft_jax import metrics

    run = tmp_path / "run"
    write = metrics.MetricsWriter.write

    def write_until_the_disk_fills(self, step, values):
        if step == 3:  # the metrics file's writes fail from step 3 on
            self._file = _FullDisk(self.path)
        return write(self, step, values)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write_until_the_disk_fills)
    rc = cli_main(_cmd(run)[3:])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "metrics.jsonl" in lines[0]
    assert "Traceback" not in err
    assert [r["step"] for r in read_metrics(str(run))] == [1, 2]
    assert os.path.isdir(run / "checkpoints" / "2")
    monkeypatch.undo()
    subprocess.run(_cmd(run), check=True, timeout=PATIENCE_S, capture_output=True)
    _same_as_reference(run, reference)
