"""The reward pool: order, per-item timeouts, retries, dead and stuck workers, no code execution.

Robust on a busy machine: legitimate items always get a generous limit (LONG); short limits
(SHORT) are only given to items that can never finish (each adversarial answer below runs for
minutes), or to a worker frozen with SIGSTOP. Time bounds are lower bounds (a kill happens at
its deadline, not before) or generous upper bounds that only prove nothing hangs.
"""

import logging
import os
import signal
import time

import pytest

from srft_jax.rewards import RewardPool, batch_math_rewards, math_reward

SHORT = 1.0  # for items that can never finish
LONG = 60.0  # for legitimate items
GRACE = 1.0
RETRY = 2.0  # the fixture pool's retry_factor
NO_HANG_S = 90.0  # worker restarts on a loaded machine included
GOOD = r"</think> \boxed{\frac{1}{2}}"

ADVERSARIAL = {
    "tower": r"</think> \boxed{10^{10^{10^{10}}}}",
    "nested_brackets": "</think> \\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "nested_braces": "</think> \\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "megabyte": "</think> " + r"\frac{1}{x+\sqrt{" * 60_000 + "}" * 120_000,
    "factorial": r"</think> \boxed{(2^{1000000})!}",
    "python_power": "</think> the answer is 9**9**9**9 ",
}


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout=LONG, kill_grace=GRACE, retry_factor=RETRY) as p:
        yield p


def test_order_matches_in_process_rewards(pool):
    from tests.test_rewards import MATH_CASES

    responses = [r for r, _, _ in MATH_CASES]
    truths = [t for _, t, _ in MATH_CASES]
    expected = [e for _, _, e in MATH_CASES]
    assert pool.score(responses, truths) == expected
    assert [math_reward(r, t) for r, t in zip(responses, truths)] == expected


def test_mixed_kinds_keep_order(pool):
    responses = [GOOD, r"</think> \boxed{B}", r"</think> \boxed{3}", "</think> answer is (A)"]
    truths = ["0.5", "B", "4", "C"]
    assert pool.score(responses, truths, kind=["math", "mc", "math", "mc"]) == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_scores_zero_within_its_limits(pool, name):
    start = time.monotonic()
    report = pool.score_report([ADVERSARIAL[name], GOOD], ["1", "1/2"], timeout=[SHORT, LONG])
    assert report.rewards == [0.0, 1.0] and not report.timed_out[1]
    assert time.monotonic() - start < NO_HANG_S  # two short attempts, not minutes
    assert pool.score([GOOD], ["0.5"]) == [1.0]  # the pool keeps working


def test_timeouts_are_per_item(pool):
    batch = [ADVERSARIAL["tower"], GOOD, GOOD, ADVERSARIAL["factorial"], GOOD]
    truths = ["1", "0.5", "0.5", "1", "0.5"]
    start = time.monotonic()
    report = pool.score_report(batch, truths, timeout=[SHORT, LONG, LONG, SHORT, LONG])
    assert report.rewards == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert report.timed_out == [True, False, False, True, False]
    assert time.monotonic() - start < NO_HANG_S


def test_a_timeout_is_retried_counted_and_reported(pool, caplog):
    """An item that can never finish: first try at SHORT, retry at RETRY * SHORT, then 0."""
    before = pool.snapshot()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="srft_jax.rewards"):
        report = pool.score_report([ADVERSARIAL["python_power"], GOOD], ["1", "0.5"], timeout=[SHORT, LONG])
    assert time.monotonic() - start > SHORT + RETRY * SHORT - 0.1  # both attempts ran to their limit
    assert report.rewards == [0.0, 1.0] and report.timed_out == [True, False]
    assert report.timeouts == 2
    assert pool.stats.retried - before.retried == 1 and pool.stats.timeout_zeros - before.timeout_zeros == 1
    metrics = pool.stats.metrics(since=before)
    assert metrics["reward/timeouts"] == 2.0 and metrics["reward/timeout_zeros"] == 1.0
    assert metrics["reward/worker_restarts"] == report.worker_restarts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 timed-out attempt(s) among 2 items" in warnings[0]
    assert "1 item(s) scored 0" in warnings[0]


CANARY_PAYLOADS = [
    "__import__('os').system('touch {p}')",
    "exec(\"open('{p}', 'w').write('x')\")",
    "eval(\"__import__('os').system('touch {p}')\")",
    "(lambda: __import__('pathlib').Path('{p}').touch())()",
    "1 + __import__('os').system('touch {p}')",
]


@pytest.mark.parametrize("template", CANARY_PAYLOADS)
def test_canary_executes_nothing(pool, tmp_path, template):
    canary = tmp_path / "CANARY"
    payload = template.format(p=canary)
    responses = [
        "</think> \\boxed{" + payload + "}",
        "</think> The answer is " + payload,
        "</think> $" + payload + "$",
    ]
    assert pool.score(responses, ["0"] * 3) == [0.0] * 3
    assert pool.score([GOOD], [payload]) == [0.0]  # as a ground truth too
    for response in responses:
        assert math_reward(response, "0") == 0.0
        assert math_reward(GOOD, payload) == 0.0
    assert not canary.exists()


def test_dead_worker_is_replaced_and_item_retried(pool):
    restarts = pool.stats.restarts
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    time.sleep(0.2)
    assert pool.score([GOOD, GOOD, GOOD], ["0.5"] * 3) == [1.0, 1.0, 1.0]
    assert pool.stats.restarts == restarts + 1


def test_stuck_worker_is_killed_and_its_item_retried():
    # A worker frozen by SIGSTOP stands for one stuck in C code that ignores its own
    # timer: the parent must kill it at timeout + grace and carry on. The frozen worker
    # is first in line, so it receives item 0, whose first try can never finish; the retry
    # (on a healthy worker, with a limit that legitimate work always meets) scores it.
    with RewardPool(num_workers=2, timeout=SHORT, kill_grace=GRACE, retry_factor=LONG / SHORT) as p:
        p.wait_ready()
        stuck = p.worker_pids()[0]
        os.kill(stuck, signal.SIGSTOP)
        start = time.monotonic()
        report = p.score_report([GOOD, GOOD], ["0.5", "0.5"])
        assert time.monotonic() - start > SHORT + GRACE - 0.1  # killed at its deadline, not before
        assert report.rewards == [1.0, 1.0] and report.timed_out == [False, False]
        assert report.timeouts == 1 and report.worker_restarts == 1
        assert p.stats.killed == 1 and p.stats.retried == 1 and p.stats.timeout_zeros == 0
        assert stuck not in p.worker_pids()
        assert p.score([GOOD] * 4, ["0.5"] * 4, timeout=LONG) == [1.0] * 4


def test_bad_inputs(pool):
    assert pool.score([None, GOOD], ["1", None]) == [0.0, 0.0]
    assert pool.score([], []) == []
    with pytest.raises(ValueError, match="same length"):
        pool.score([GOOD], [])
    with pytest.raises(ValueError, match="kind"):
        pool.score([GOOD], ["1"], kind="code")
    with pytest.raises(ValueError, match="timeout"):
        pool.score([GOOD], ["1"], timeout=0)
    with pytest.raises(ValueError, match="timeout has 2 entries"):
        pool.score([GOOD], ["1"], timeout=[LONG, LONG])


def test_closed_pool_refuses_work_and_leaves_no_processes():
    p = RewardPool(num_workers=1, timeout=LONG)
    assert p.score([GOOD], ["0.5"]) == [1.0]
    procs = [w.proc for w in p._workers]
    p.close()
    assert all(proc.poll() is not None for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p.score([GOOD], ["0.5"])


def test_batch_math_rewards_keeps_order():
    responses = [GOOD, r"</think> \boxed{2}", r"\boxed{0.5}"]
    assert batch_math_rewards(responses, ["0.5", "3", "0.5"], timeout=LONG,
                              num_workers=1) == [1.0, 0.0, 0.0]


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout"):
        RewardPool(timeout=-1)
    with pytest.raises(ValueError, match="retry_factor"):
        RewardPool(retry_factor=0.5)
