"""Stop signals: SIGTERM (spot preemption, TPU maintenance, SLURM, Kubernetes) and Ctrl-C end a
training run after the step in progress, with a checkpoint of that step.

    with StopSignals() as stop:
        for step in range(start + 1, steps + 1):
            ...                                  # the whole step
            if stop.should_stop(step):           # every process, once per step
                save a checkpoint of `step`; print(stop.summary(step, where)); exit EXIT_STOPPED

- The first SIGTERM or Ctrl-C prints one line at once (even while the main thread waits on the
  accelerator) and makes `should_stop` return True at the end of the current step. Later
  SIGTERMs change nothing.
- A second Ctrl-C exits at once with EXIT_INTERRUPTED (130) and no traceback; the run resumes
  from its latest checkpoint. Inside the `with` block Ctrl-C never raises KeyboardInterrupt.
- Leaving the block restores the previous handlers.

How: Python runs signal handlers only on the main thread, between bytecodes, so a handler would
wait for a long XLA call to return. Instead the handlers are no-ops and `signal.set_wakeup_fd`
makes CPython write each signal's number to a pipe from its C-level handler; a daemon thread
reads the pipe and acts at once.

Several processes (`jax.distributed`): JAX's coordination service has a preemption protocol made
for this (`multihost_utils.reached_preemption_sync_point`, which orbax's
`CheckpointManager.reached_preemption` also uses): `jax.distributed.initialize` installs a
SIGTERM handler that notifies the coordination service, which propagates the notice; every
process reports its step counter and all agree on the next step after the largest as the
stop step. `should_stop` therefore costs one local mutex per step and no collective; the
exchange happens once, in JAX's background thread, after a notice. This class leaves JAX's
SIGTERM handler in place and forwards a Ctrl-C on any process to it (the process sends itself
SIGTERM), so all processes stop after the same step whichever one got the signal. The line
printed on SIGTERM then appears when the processes stop (JAX's handler is not Python's). On
one process without `jax.distributed`, `should_stop` just reads the local flag.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional, TextIO

EXIT_STOPPED = 75  # stopped early by a signal, checkpoint written: rerun to continue (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # second Ctrl-C: stopped at once (128 + SIGINT, the shell's convention)


def _ignore(signum, frame):  # the watcher thread does the work
    pass


class StopSignals:
    """Context manager that turns SIGTERM / Ctrl-C into a stop after the current step."""

    def __init__(self, stream: Optional[TextIO] = None):
        self._stream = stream
        self._requested = threading.Event()
        self._reason: Optional[str] = None
        self._interrupts = 0
        self._calls = 0
        self._jax = False
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup = -1
        self._pipe: Optional[tuple[int, int]] = None
        self._thread: Optional[threading.Thread] = None

    # ---- context -----------------------------------------------------------------------------
    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignals must be entered on the main thread")
        self._jax = _jax_preemption_service()
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        signals = [signal.SIGINT] if self._jax else [signal.SIGINT, signal.SIGTERM]
        self._old_handlers = {s: signal.signal(s, _ignore) for s in signals}
        self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                                        name="srft-stop-signals")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        self._old_handlers = {}
        read_fd, write_fd = self._pipe
        os.close(write_fd)  # the watcher reads EOF and returns
        self._thread.join(timeout=5.0)
        os.close(read_fd)
        self._pipe = None

    # ---- the loop's side -----------------------------------------------------------------------
    def should_stop(self, step: int) -> bool:
        """Call once per step, after the step's work, on every process: True means save a
        checkpoint of `step` and stop (the same `step` on every process). `step` is only
        reported; agreement uses the number of calls, so all processes must start together."""
        self._calls += 1
        if self._jax:
            from jax.experimental import multihost_utils

            stop = multihost_utils.reached_preemption_sync_point(self._calls)
        else:
            stop = self._requested.is_set()
        return bool(stop)

    @property
    def requested(self) -> bool:
        """A stop signal reached this process (a SIGTERM under jax.distributed is not seen here)."""
        return self._requested.is_set()

    def summary(self, step: int, checkpoint: str) -> str:
        """The line to print once the checkpoint of `step` is saved."""
        why = self._reason or "a stop signal (SIGTERM or Ctrl-C) on one of the processes"
        return (f"stopped after step {step} on {why}; checkpoint saved to {checkpoint}; "
                f"rerun the same command to continue (exit code {EXIT_STOPPED})")

    # ---- the watcher thread ------------------------------------------------------------------
    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts >= 2:
                self._say("second Ctrl-C: stopping now, without a checkpoint of the step in progress; "
                          "rerun the same command to continue from the latest checkpoint")
                os._exit(EXIT_INTERRUPTED)
        if self._requested.is_set():
            return
        self._reason = name
        self._requested.set()
        self._say(f"{name}: finishing the current step, then saving a checkpoint and stopping "
                  "(Ctrl-C again to stop at once)")
        if self._jax and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells the other processes

    def _say(self, line: str) -> None:
        stream = self._stream or sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass


def _jax_preemption_service() -> bool:
    """True under jax.distributed, whose SIGTERM handler and preemption protocol are then used."""
    import jax

    if not jax.distributed.is_initialized():
        return False
    from jax.experimental import multihost_utils

    try:
        multihost_utils.reached_preemption_sync_point(0)  # the counter's initial value
    except RuntimeError:
        raise RuntimeError("stop signals on several processes need JAX's preemption service; "
                           "leave jax_enable_preemption_service on") from None
    return True
