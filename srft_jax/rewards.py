"""Outcome rewards for SRFT: Math-Verify answers and multiple-choice letters.

The paper's rule (srft-method.md, "Training setup"): the reward of a response is 1 when
the text after ``</think>`` verifies against the ground truth with Math-Verify, else 0; a
response without ``</think>`` scores 0. The answer is the content of the last complete
``\\boxed{...}`` of that tail (nested braces handled); when the tail has no box, the whole
tail goes to Math-Verify, which then finds the last expression itself.

Model output is untrusted. Nothing here passes it to ``eval``/``exec``/``sympify``:
answers go through Math-Verify's LaTeX grammar (an ANTLR parser) and its plain-expression
regex, which only admits digits, dots, whitespace and ``+-*/^()×÷`` before SymPy sees it.
Parsing can still be made arbitrarily slow (``10^{10^{10^{10}}}``, deep nesting, huge
strings), so batch scoring runs in :class:`RewardPool`: long-lived worker processes (plain
``subprocess`` children running this module, so the parent's threads, JAX state and
``__main__`` are never forked or re-imported) with a per-item timeout. A worker first
interrupts a slow item itself (an interval timer on its main thread); a worker stuck in C
code past ``timeout + kill_grace`` is killed and replaced. Either way the item is tried once
more with a longer limit (on a loaded machine a correct answer can be slow), then scores 0
and is reported as timed out; the pool keeps working. This module imports no JAX.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

# Seconds a response may take to score, in training and evaluation alike. Math-Verify's own
# parsing/verification timeouts are 5 s each, so a legitimate answer on a busy machine fits.
DEFAULT_REWARD_TIMEOUT = 10.0

THINK_CLOSE = "</think>"
KINDS = ("math", "mc")
MC_LETTERS = "ABCDEFGHIJ"  # MMLU-Pro has up to 10 options

# --------------------------------------------------------------------------------------
# Answer extraction (pure string functions, linear time)
# --------------------------------------------------------------------------------------

# A box opener, an escaped character (\{ \} \\ ... never count as braces), or a brace.
_BOX_TOKENS = re.compile(r"\\boxed\s*\{|\\.|[{}]", re.DOTALL)


def response_tail(response: str) -> Optional[str]:
    """Text after the last ``</think>``, or None when the response has none."""
    cut = response.rfind(THINK_CLOSE)
    if cut < 0:
        return None
    return response[cut + len(THINK_CLOSE):]


def last_boxed_content(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{...}`` in ``text`` (the one closing last).

    Nested braces are matched, escaped braces (``\\{``) are content. An unclosed box (a
    truncated response) is ignored, so an earlier complete box still counts. Linear time.
    """
    stack: list[Optional[int]] = []  # per open brace: content start if it opened a box
    best: Optional[tuple[int, int]] = None
    for match in _BOX_TOKENS.finditer(text):
        token = match.group()
        if token.startswith("\\boxed"):
            stack.append(match.end())
        elif token == "{":
            stack.append(None)
        elif token == "}":
            if stack:
                start = stack.pop()
                if start is not None:
                    best = (start, match.start())
    if best is None:
        return None
    return text[best[0]:best[1]]


def extract_math_answer(response: str) -> Optional[str]:
    """The string handed to Math-Verify for a response, or None (no ``</think>``).

    ``\\boxed{last box content}`` when the tail has a complete box, else the whole tail.
    """
    tail = response_tail(response)
    if tail is None:
        return None
    boxed = last_boxed_content(tail)
    if boxed is None:
        return tail
    return "\\boxed{" + boxed + "}"


_MATH_DELIMITERS = ("\\boxed", "$", "\\(", "\\[")


def gold_for_parse(ground_truth: str) -> str:
    """Wrap a bare ground-truth answer in ``\\boxed{}`` so Math-Verify's LaTeX path sees it.

    Math-Verify only extracts LaTeX inside delimiters; a bare ``\\frac12`` or ``(1,2]``
    would otherwise parse to nothing. Answers that already carry delimiters pass as is.
    """
    gold = ground_truth.strip()
    if any(d in gold for d in _MATH_DELIMITERS):
        return gold
    return "\\boxed{" + gold + "}"


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm|texttt)\s*\{([^{}]*)\}")
_LETTER_IN_BOX = re.compile(r"^\(?([A-Z])\)?(?:$|[\s.:)\]]|\\)")
_ANSWER_IS = re.compile(
    r"answer\s*(?:is\s*:?|:)\s*(?:\*\*)?\s*(?:option\s*)?(?:\(([A-Za-z])\)|\b([A-Z])\b)",
    re.IGNORECASE,
)


def extract_choice_letter(response: str, letters: str = MC_LETTERS) -> Optional[str]:
    """The option letter a response chose, or None.

    Looks at the text after ``</think>`` when present, else at the whole response. The
    last complete ``\\boxed{...}`` wins (``\\boxed{C}``, ``\\boxed{(C)}``,
    ``\\boxed{\\text{C}}``, ``\\boxed{C. 42}``); without a box, the last "answer is (C)" /
    "answer is C" / "Answer: C". A bare lower-case letter only counts in parentheses.
    """
    tail = response_tail(response)
    text = response if tail is None else tail
    boxed = last_boxed_content(text)
    if boxed is not None:
        inner = boxed
        for _ in range(3):  # unwrap nested \text{...}
            inner = _TEXT_WRAPPER.sub(r"\1", inner)
        inner = inner.strip().strip("{}").strip()
        m = _LETTER_IN_BOX.match(inner)
        if m and m.group(1) in letters:
            return m.group(1)
        return None
    found = None
    for m in _ANSWER_IS.finditer(text):
        letter = m.group(1).upper() if m.group(1) else m.group(2)
        if letter in letters:
            found = letter
    return found


# --------------------------------------------------------------------------------------
# Single-item rewards
# --------------------------------------------------------------------------------------


def _math_verify_timeouts() -> Optional[int]:
    """Math-Verify's own signal-based timeout only works on a main thread."""
    if threading.current_thread() is threading.main_thread():
        return 5
    return None


def _math_reward(response: str, ground_truth: str, mv_timeout: Optional[int]) -> float:
    from math_verify import parse, verify  # imported lazily: sympy is slow to import

    if not isinstance(response, str) or not isinstance(ground_truth, str):
        return 0.0
    answer = extract_math_answer(response)
    if answer is None or not ground_truth.strip():
        return 0.0
    gold = parse(gold_for_parse(ground_truth), parsing_timeout=mv_timeout)
    if not gold:
        return 0.0
    pred = parse(answer, parsing_timeout=mv_timeout)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=mv_timeout) else 0.0


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if the answer after ``</think>`` verifies against ``ground_truth``, else 0.0.

    ``verify(parse(gold), parse(answer))`` with Math-Verify. In-process: on a main thread
    Math-Verify's own 5 s timeouts apply; off the main thread there is no timeout, so
    score untrusted batches with :class:`RewardPool` / :func:`batch_math_rewards`.
    """
    return _math_reward(response, ground_truth, _math_verify_timeouts())


def _normalise_letter(letter: str) -> str:
    return letter.strip().strip("()").strip().upper()


def multiple_choice_reward(response: str, correct_letter: str) -> float:
    """1.0 if the letter the response chose equals ``correct_letter``, else 0.0."""
    if not isinstance(response, str) or not isinstance(correct_letter, str):
        return 0.0
    correct = _normalise_letter(correct_letter)
    if len(correct) != 1:
        return 0.0
    chosen = extract_choice_letter(response)
    return 1.0 if chosen == correct else 0.0


def _score_one(kind: str, response: str, truth: str, mv_timeout: Optional[int]) -> float:
    if kind == "math":
        return _math_reward(response, truth, mv_timeout)
    if kind == "mc":
        return multiple_choice_reward(response, truth)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# --------------------------------------------------------------------------------------
# Worker process (runs `python -c "from srft_jax.rewards import _worker_main; ..."`)
# --------------------------------------------------------------------------------------


class _ItemTimeout(BaseException):
    """Raised by the worker's interval timer; BaseException so `except Exception` in
    Math-Verify / SymPy cannot swallow it."""


def _on_alarm(signum, frame):  # pragma: no cover - runs in the worker
    raise _ItemTimeout()


def _worker_score(request: dict) -> tuple[float, str]:
    timeout = float(request["timeout"])
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            score = _score_one(request["kind"], request["response"], request["truth"], None)
            return score, "ok"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return 0.0, "timeout"
    except Exception as exc:  # a grader bug must not kill the worker
        return 0.0, f"error:{type(exc).__name__}"


def _worker_main() -> None:  # pragma: no cover - runs in the worker (tested end to end)
    """Serve JSON-line requests on stdin, answer on the original stdout."""
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    sys.stdout = sys.stderr
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    signal.signal(signal.SIGALRM, _on_alarm)
    # The parent decides when we stop: a Ctrl-C or SIGTERM sent to the whole process group
    # must not kill the workers the parent's last step still needs (EOF on stdin ends us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _score_one("math", "</think> \\boxed{\\frac{1}{2}}", "0.5", None)  # warm caches
    proto_out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("stop"):
            break
        score, status = _worker_score(request)
        proto_out.write(json.dumps({"score": score, "status": status}) + "\n")


# --------------------------------------------------------------------------------------
# Pool
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class PoolStats:
    """Counters over the pool's lifetime (`metrics(since)` gives the per-step figures)."""

    scored: int = 0
    soft_timeouts: int = 0  # attempts the worker interrupted itself at the item's timeout
    killed: int = 0  # attempts whose worker was stuck past timeout + kill_grace (killed, replaced)
    retried: int = 0  # timed-out items given a second attempt with the longer budget
    timeout_zeros: int = 0  # items scored 0 because their retry timed out too
    crashed: int = 0  # the worker died on an item (the item is retried once)
    errors: int = 0  # the grader raised; item scored 0
    restarts: int = 0  # workers started to replace a killed or dead one

    @property
    def timeouts(self) -> int:
        """Timed-out attempts, first tries and retries."""
        return self.soft_timeouts + self.killed

    def metrics(self, since: Optional["PoolStats"] = None) -> dict[str, float]:
        """`reward/timeouts` (timed-out attempts), `reward/timeout_zeros` (items scored 0 after
        their retry timed out too) and `reward/worker_restarts`, counted since `since` (a
        `RewardPool.snapshot()`), or over the pool's lifetime."""
        base = since or PoolStats()
        return {"reward/timeouts": float(self.timeouts - base.timeouts),
                "reward/timeout_zeros": float(self.timeout_zeros - base.timeout_zeros),
                "reward/worker_restarts": float(self.restarts - base.restarts)}


@dataclasses.dataclass(frozen=True)
class ScoreReport:
    """Rewards in input order, and per item whether its 0 comes from a timeout (the first try
    and the retry both timed out): such a reward says nothing about the answer, so do not cache
    it. `timeouts` / `worker_restarts`: what happened during this call."""

    rewards: list[float]
    timed_out: list[bool]
    timeouts: int
    worker_restarts: int


_MAX_INFLIGHT = 2  # items handed to a worker at once: the running one + one queued
_PIPE_BUFFER_BYTES = 65536  # Linux pipe capacity
_PIPELINE_BYTES = _PIPE_BUFFER_BYTES // 2


def _encode(message: dict) -> bytes:
    return (json.dumps(message) + "\n").encode("utf-8")


class _Worker:
    """One child process and its line buffer."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from srft_jax.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()
        self.inflight: deque[int] = deque()  # items sent, in the order it scores them
        self.deadline = 0.0  # for the item it is scoring now (the head of inflight)

    def send_bytes(self, payload: bytes) -> None:
        self.proc.stdin.write(payload)
        self.proc.stdin.flush()

    def send(self, message: dict) -> None:
        self.send_bytes(_encode(message))

    def read_lines(self) -> tuple[list[dict], bool]:
        """Messages available now, and whether the pipe reached EOF (worker gone)."""
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()], eof

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _default_num_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _child_env() -> dict[str, str]:
    """The parent's environment, with this package importable and one thread per worker."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


class RewardPool:
    """Worker processes that score responses with a per-item timeout, keeping order.

    Usage::

        with RewardPool(num_workers=4, timeout=5.0) as pool:
            rewards = pool.score(responses, ground_truths)            # math
            rewards = pool.score(responses, letters, kind="mc")       # multiple choice
            report = pool.score_report(responses, ground_truths)      # + which items timed out

    Workers start once (about a second each, in parallel) and serve every later call.
    An item gets ``timeout`` seconds (one value, or one per item). A worker interrupts an item
    at its timeout itself; one still stuck ``kill_grace`` seconds later (inside C code) is
    killed and replaced. A timed-out item is tried once more, on the next free worker, with
    ``retry_factor`` times its timeout (a timeout on a busy machine is usually just slowness);
    if that times out too it scores 0 and is reported as timed out. Each call that met a
    timeout logs one warning line; ``stats`` counts everything (``stats.metrics(since)`` for
    the per-step ``reward/timeouts``, ``reward/timeout_zeros``, ``reward/worker_restarts``).
    ``score`` is not re-entrant (a lock serialises concurrent callers).
    """

    def __init__(
        self,
        num_workers: Optional[int] = None,
        timeout: float = DEFAULT_REWARD_TIMEOUT,
        kill_grace: float = 1.0,
        start_timeout: float = 120.0,
        retry_factor: float = 4.0,
    ):
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 or None, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if kill_grace < 0:
            raise ValueError(f"kill_grace must be >= 0 seconds, got {kill_grace}")
        if not retry_factor >= 1:
            raise ValueError(f"retry_factor must be >= 1, got {retry_factor}")
        self.num_workers = num_workers or _default_num_workers()
        self.timeout = float(timeout)
        self.kill_grace = float(kill_grace)
        self.start_timeout = float(start_timeout)
        self.retry_factor = float(retry_factor)
        self.stats = PoolStats()
        self._env = _child_env()
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [_Worker(self._env) for _ in range(self.num_workers)]
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (politely, then by force); waits for a running ``score``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_workers()

    def _stop_workers(self) -> None:
        for worker in self._workers:
            try:
                worker.send({"stop": True})
            except (BrokenPipeError, OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            worker.kill()
        self._finalizer.detach()

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Block until every worker has started (call once at start-up to hide the
        workers' import time; ``score`` otherwise waits for them itself)."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        with self._lock:
            while not all(w.ready for w in self._workers):
                for worker in self._workers:
                    if worker.ready:
                        continue
                    messages, eof = worker.read_lines()
                    if any(m.get("ready") for m in messages):
                        worker.ready = True
                    elif eof:
                        raise RuntimeError(_startup_failure(worker))
                if time.monotonic() > deadline:
                    raise TimeoutError("reward workers did not start in time")
                time.sleep(0.01)

    # -- scoring -----------------------------------------------------------------------

    def snapshot(self) -> PoolStats:
        """A copy of the counters, to pass to ``stats.metrics(since=...)`` later."""
        return dataclasses.replace(self.stats)

    def score(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        kind: str | Sequence[str] = "math",
        timeout: float | Sequence[float] | None = None,
    ) -> list[float]:
        """Rewards for ``responses`` against ``ground_truths``, in input order.

        ``kind`` is "math" (Math-Verify) or "mc" (ground truth is the correct letter), or
        one such string per item. ``timeout`` overrides the pool's per-item timeout (one
        value, or one per item).
        """
        return self.score_report(responses, ground_truths, kind, timeout).rewards

    def score_report(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        kind: str | Sequence[str] = "math",
        timeout: float | Sequence[float] | None = None,
    ) -> ScoreReport:
        """``score`` plus, per item, whether its 0 comes from timeouts (see ``ScoreReport``)."""
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"responses ({len(responses)}) and ground_truths ({len(ground_truths)}) "
                "must have the same length"
            )
        kinds = [kind] * len(responses) if isinstance(kind, str) else list(kind)
        if len(kinds) != len(responses):
            raise ValueError(f"kind has {len(kinds)} entries for {len(responses)} responses")
        for k in set(kinds):
            if k not in KINDS:
                raise ValueError(f"kind must be one of {KINDS}, got {k!r}")
        if timeout is None:
            timeouts = [self.timeout] * len(responses)
        elif isinstance(timeout, (int, float)):
            timeouts = [float(timeout)] * len(responses)
        else:
            timeouts = [float(t) for t in timeout]
            if len(timeouts) != len(responses):
                raise ValueError(f"timeout has {len(timeouts)} entries for {len(responses)} responses")
        if not all(t > 0 for t in timeouts):
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool is closed")
            before = self.snapshot()
            rewards, timed_out = self._run(list(responses), list(ground_truths), kinds, timeouts)
        report = ScoreReport(rewards, timed_out, self.stats.timeouts - before.timeouts,
                             self.stats.restarts - before.restarts)
        if report.timeouts:
            logger.warning(
                "reward scoring: %d timed-out attempt(s) among %d items (limit %s s, retry %gx); "
                "%d item(s) scored 0 after the retry timed out too; %d worker restart(s)",
                report.timeouts, len(rewards), f"{min(timeouts):g}" if len(set(timeouts)) == 1
                else f"{min(timeouts):g}-{max(timeouts):g}", self.retry_factor, sum(timed_out),
                report.worker_restarts)
        return report

    def _run(self, responses, truths, kinds, timeouts) -> tuple[list[float], list[bool]]:
        n = len(responses)
        results = [0.0] * n
        timed_out = [False] * n
        pending: deque[int] = deque()
        for i, (response, truth) in enumerate(zip(responses, truths)):
            # Wrong types score 0 here: only strings cross the process boundary.
            if isinstance(response, str) and isinstance(truth, str):
                pending.append(i)
        done_count = n - len(pending)
        crashes = [0] * n
        retried = [False] * n
        budget = list(timeouts)  # this attempt's limit; raised for the retry

        def finish(i: int, score: float) -> None:
            nonlocal done_count
            results[i] = score
            done_count += 1

        def requeue(items: list[int]) -> None:
            pending.extendleft(reversed(items))

        def on_timeout(i: int) -> None:
            """Retry once with the longer budget, then score 0."""
            if not retried[i]:
                retried[i] = True
                budget[i] = timeouts[i] * self.retry_factor
                self.stats.retried += 1
                requeue([i])
            else:
                timed_out[i] = True
                self.stats.timeout_zeros += 1
                finish(i, 0.0)

        def start_next(worker: _Worker) -> None:
            if worker.inflight:  # the queued item starts now (or a little earlier)
                worker.deadline = time.monotonic() + budget[worker.inflight[0]] + self.kill_grace

        selector = selectors.DefaultSelector()
        try:
            for worker in self._workers:
                selector.register(worker.fd, selectors.EVENT_READ, worker)
            while done_count < n:
                self._assign(pending, responses, truths, kinds, budget)
                now = time.monotonic()
                wake = [w.deadline for w in self._workers if w.inflight]
                wake += [w.started + self.start_timeout for w in self._workers if not w.ready]
                wait = max(0.0, min(wake) - now) if wake else None
                for key, _ in selector.select(timeout=wait):
                    worker = key.data
                    messages, eof = worker.read_lines()
                    for message in messages:
                        if message.get("ready"):
                            worker.ready = True
                        elif worker.inflight:
                            i = worker.inflight.popleft()
                            self._count(message["status"])
                            if message["status"] == "timeout":
                                on_timeout(i)
                            else:
                                finish(i, float(message["score"]))
                            start_next(worker)
                    if eof:
                        if worker.inflight:
                            # Retry the item being scored once on a fresh worker (the death
                            # may be unrelated to it); an item that kills two workers
                            # scores 0. Items queued behind it are simply re-queued.
                            self.stats.crashed += 1
                            logger.warning("a reward worker died (exit code %s); replacing it",
                                           worker.proc.poll())
                            head = worker.inflight.popleft()
                            crashes[head] += 1
                            if crashes[head] < 2:
                                requeue([head])
                            else:
                                finish(head, 0.0)
                            requeue(list(worker.inflight))
                        elif not worker.ready:
                            raise RuntimeError(_startup_failure(worker))
                        self._replace(worker, selector)
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.inflight and now > worker.deadline:
                        # Stuck in C code past its own timer: kill, replace, retry or score 0.
                        self.stats.killed += 1
                        head = worker.inflight.popleft()
                        requeue(list(worker.inflight))
                        on_timeout(head)
                        self._replace(worker, selector)
                    elif not worker.ready and now > worker.started + self.start_timeout:
                        raise RuntimeError(
                            f"a reward worker did not start within {self.start_timeout:.0f} s"
                        )
        finally:
            selector.close()
        self.stats.scored += n
        return results, timed_out

    def _assign(self, pending, responses, truths, kinds, budget) -> None:
        """Hand pending items to ready workers, up to _MAX_INFLIGHT each.

        A second item is queued behind the running one (so the worker never waits for
        this process to be scheduled) only when it fits the pipe buffer, so the write can
        never block on a busy worker; larger items wait for an idle worker.
        """
        for worker in self._workers:
            while worker.ready and pending and len(worker.inflight) < _MAX_INFLIGHT:
                i = pending[0]
                payload = _encode({"kind": kinds[i], "response": responses[i],
                                   "truth": truths[i], "timeout": budget[i]})
                if worker.inflight and len(payload) > _PIPELINE_BYTES:
                    break
                pending.popleft()
                if not worker.inflight:
                    worker.deadline = time.monotonic() + budget[i] + self.kill_grace
                worker.inflight.append(i)
                try:
                    worker.send_bytes(payload)
                except (BrokenPipeError, OSError):
                    break  # seen as EOF by the caller

    def _count(self, status: str) -> None:
        if status == "timeout":
            self.stats.soft_timeouts += 1
        elif status.startswith("error"):
            self.stats.errors += 1

    def _replace(self, worker: _Worker, selector: selectors.BaseSelector) -> None:
        selector.unregister(worker.fd)
        worker.kill()
        fresh = _Worker(self._env)
        self._workers[self._workers.index(worker)] = fresh
        selector.register(fresh.fd, selectors.EVENT_READ, fresh)
        self.stats.restarts += 1


def _startup_failure(worker: _Worker) -> str:
    return (
        f"a reward worker exited during start-up (exit code {worker.proc.wait()}); run "
        "`python -c \"import srft_jax.rewards, math_verify\"` to see the error"
    )


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        try:
            worker.kill()
        except Exception:  # interpreter shutdown: best effort
            pass


# --------------------------------------------------------------------------------------
# Module-level convenience pool
# --------------------------------------------------------------------------------------

_shared_pool: Optional[RewardPool] = None
_shared_lock = threading.Lock()


def _close_shared_pool() -> None:
    global _shared_pool
    if _shared_pool is not None:
        _shared_pool.close()
        _shared_pool = None


atexit.register(_close_shared_pool)


def batch_math_rewards(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    timeout: float = DEFAULT_REWARD_TIMEOUT,
    num_workers: Optional[int] = None,
) -> list[float]:
    """Math rewards for a batch, in order, via a shared :class:`RewardPool`.

    The pool is created on first use and reused by later calls (re-created when
    ``num_workers`` changes); it is closed at interpreter exit.
    """
    global _shared_pool
    with _shared_lock:
        wanted = num_workers or _default_num_workers()
        if _shared_pool is None or _shared_pool.num_workers != wanted:
            _close_shared_pool()
            _shared_pool = RewardPool(num_workers=wanted, timeout=timeout)
        pool = _shared_pool
    return pool.score(responses, ground_truths, kind="math", timeout=timeout)

