"""Stop signals (issue 15): SIGTERM and a first Ctrl-C end a loop after the step in progress, a
second Ctrl-C exits at once with code 130 and no traceback; on two processes joined by
`jax.distributed` (gloo), a signal to one process stops both after the same step.

The loops run in subprocesses: this file run as a script,
    python tests/test_faults_signals.py --out DIR [--port PORT --process-id ID]
Each step of the loop writes `begin K`, waits until the file DIR/release-K exists when the
test asked it to block (so a signal lands in the middle of a step, with the main thread
waiting), writes `end K` and then asks `should_stop(K)`. On two processes every step also
runs a small collective, as a training step does. Only deadlines for failure are used: nothing
assumes the machine is fast.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATIENCE_S = 120.0  # only ever waited out when something is broken


# ---- the loop (in the subprocess) --------------------------------------------------------------
def loop(out_dir: str, port: int, process_id: int) -> int:
    import jax

    import numpy as np

    from srft_jax import distributed

    if port:
        from srft_jax.mesh import MeshConfig

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        distributed.initialize(MeshConfig(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                          process_id=process_id))
    from srft_jax.preemption import EXIT_STOPPED, StopSignals

    log = open(os.path.join(out_dir, f"log{process_id}"), "a", buffering=1)
    with StopSignals() as stop:
        for step in range(1, 100_000):
            log.write(f"begin {step}\n")
            block = os.path.join(out_dir, f"block-{step}")
            release = os.path.join(out_dir, f"release-{step}")
            while os.path.exists(block) and not os.path.exists(release):
                time.sleep(0.01)
            if port:
                distributed.all_gather(np.int32(step))  # the step's collectives
            time.sleep(0.02)
            log.write(f"end {step}\n")
            if stop.should_stop(step):
                log.write(f"stopped {step}\n")
                print(stop.summary(step, "CKPT"), flush=True)
                return EXIT_STOPPED
    return 0


# ---- helpers (in the test) ---------------------------------------------------------------------
def _start(out_dir, port=0, process_id=0, devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, os.path.abspath(__file__), "--out", str(out_dir)]
    if port:
        args += ["--port", str(port), "--process-id", str(process_id)]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _lines(out_dir, process_id=0):
    path = os.path.join(out_dir, f"log{process_id}")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def _stderr_line(proc):
    """The child's next stderr line (fails after PATIENCE_S instead of hanging)."""
    ready, _, _ = select.select([proc.stderr], [], [], PATIENCE_S)
    assert ready, "no line on stderr"
    return proc.stderr.readline()


def _wait_for(predicate, what):
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(proc):
    try:
        out, err = proc.communicate(timeout=PATIENCE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the loop did not end:\n{err[-3000:]}") from None
    return proc.returncode, out, err


# ---- one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_stops_after_the_step_in_progress(tmp_path, sig):
    from srft_jax.preemption import EXIT_STOPPED

    (tmp_path / "block-3").touch()  # step 3 waits for the test
    proc = _start(tmp_path)
    try:
        _wait_for(lambda: "begin 3" in _lines(tmp_path), "step 3 to begin")
        proc.send_signal(sig)
        # The line comes at once, while the main thread is still inside step 3.
        line = _stderr_line(proc)
        assert ("SIGTERM" if sig == signal.SIGTERM else "Ctrl-C") in line
        assert "finishing the current step" in line
        assert "end 3" not in _lines(tmp_path)
        (tmp_path / "release-3").touch()
        rc, out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == EXIT_STOPPED, err
    assert _lines(tmp_path)[-3:] == ["begin 3", "end 3", "stopped 3"]
    assert "Traceback" not in err and err.strip() == ""
    assert out.strip() == (f"stopped after step 3 on {'SIGTERM' if sig == signal.SIGTERM else 'Ctrl-C'}; "
                           f"checkpoint saved to CKPT; rerun the same command to continue (exit code {EXIT_STOPPED})")


def test_second_ctrl_c_exits_at_once_without_traceback(tmp_path):
    from srft_jax.preemption import EXIT_INTERRUPTED

    (tmp_path / "block-2").touch()  # step 2 never ends unless the process exits
    proc = _start(tmp_path)
    try:
        _wait_for(lambda: "begin 2" in _lines(tmp_path), "step 2 to begin")
        proc.send_signal(signal.SIGINT)
        assert "Ctrl-C" in _stderr_line(proc)
        proc.send_signal(signal.SIGINT)
        rc, out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == EXIT_INTERRUPTED
    assert "second Ctrl-C: stopping now" in err and "Traceback" not in err
    assert "end 2" not in _lines(tmp_path)


def test_repeated_sigterm_changes_nothing(tmp_path):
    from srft_jax.preemption import EXIT_STOPPED

    (tmp_path / "block-2").touch()
    proc = _start(tmp_path)
    try:
        _wait_for(lambda: "begin 2" in _lines(tmp_path), "step 2 to begin")
        proc.send_signal(signal.SIGTERM)
        assert "SIGTERM" in _stderr_line(proc)
        proc.send_signal(signal.SIGTERM)
        (tmp_path / "release-2").touch()
        rc, out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == EXIT_STOPPED and err == ""
    assert _lines(tmp_path)[-1] == "stopped 2"


def test_handlers_are_restored():
    from srft_jax.preemption import StopSignals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGINT) is not before[0]
        assert not stop.requested and not stop.should_stop(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert signal.set_wakeup_fd(-1) == -1  # no wakeup fd left behind


# ---- two processes -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("target,sig", [(1, signal.SIGTERM), (0, signal.SIGINT)],
                         ids=["SIGTERM-to-process-1", "Ctrl-C-to-process-0"])
def test_two_processes_stop_after_the_same_step(tmp_path, target, sig):
    from srft_jax.preemption import EXIT_STOPPED

    port = _free_port()
    procs = [_start(tmp_path, port, pid) for pid in range(2)]
    try:
        _wait_for(lambda: "end 3" in _lines(tmp_path, target), f"process {target} to pass step 3")
        procs[target].send_signal(sig)
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for pid, (rc, out, err) in enumerate(results):
        assert rc == EXIT_STOPPED, f"process {pid} (exit {rc}):\n{err[-3000:]}"
        assert "Traceback" not in err
    stops = [[l for l in _lines(tmp_path, pid) if l.startswith("stopped")] for pid in range(2)]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    stop_step = int(stops[0][0].split()[1])
    assert stop_step > 3
    for pid in range(2):  # the stop step was completed, and nothing after it began
        assert _lines(tmp_path, pid)[-3:] == [f"begin {stop_step}", f"end {stop_step}", f"stopped {stop_step}"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--process-id", type=int, default=0)
    a = parser.parse_args()
    sys.exit(loop(a.out, a.port, a.process_id))
