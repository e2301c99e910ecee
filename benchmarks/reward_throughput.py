"""Reward throughput: answers verified per second, RewardPool vs one process.

    python benchmarks/reward_throughput.py [--n 1000] [--workers N] [--seed 0]

Builds ``n`` realistic responses (a paragraph of reasoning, ``</think>``, a final answer
in one of many LaTeX forms: integers, fractions, radicals, multiples of pi, intervals,
sets, polynomials, units; about half correct, a few without ``</think>`` or a box), scores
them with ``math_reward`` in this process, one after another, and with a ``RewardPool``
(both warmed on 200 other responses first; runs alternate, best of ``--repeats``), checks
both give the same rewards, and prints both rates and their ratio (the last line is the
comparable number). CPU-ms per answer are printed too: on a machine shared with other
jobs, wall-clock rates mostly measure the share of the CPUs each side got.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from srft_jax.rewards import RewardPool, _default_num_workers, math_reward

FILLER = (
    "Let me set up the problem carefully. We substitute the given values and simplify "
    "step by step, checking each intermediate result. Wait, let me double-check the "
    "second step: expanding the product gives the same expression, so the computation "
    "is consistent. Therefore we can conclude. "
)


def _answer_pair(rng: random.Random) -> tuple[str, str, str]:
    """(gold, correct answer LaTeX, wrong answer LaTeX) of a random form."""
    a, b, c = rng.randint(2, 97), rng.randint(2, 97), rng.randint(1, 9)
    forms = [
        (str(a * b), str(a * b), str(a * b + 1)),
        (f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{a}}}{{{b}}}", f"\\frac{{{a + 1}}}{{{b}}}"),
        (f"{c}\\sqrt{{{b}}}", f"\\sqrt{{{c * c * b}}}", f"{c + 1}\\sqrt{{{b}}}"),
        (f"{a}\\pi", f"{a} \\pi", f"{a + 1}\\pi"),
        (f"({-a}, {b}]", f"\\left({-a}, {b}\\right]", f"[{-a}, {b}]"),
        (f"\\{{{a}, {b + 100}\\}}", f"\\{{{b + 100}, {a}\\}}", f"\\{{{a}, {b}\\}}"),
        (f"x^2 + {2 * c}x + {c * c}", f"(x+{c})^2", f"(x-{c})^2"),
        (str(a), f"{a}\\text{{ cm}}", f"{a + 2}\\text{{ cm}}"),
        (f"{a}.{c}", f"{a}.{c}0", f"{a}.{c + 1}"),
    ]
    return rng.choice(forms)


def make_responses(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, golds = [], []
    for _ in range(n):
        gold, right, wrong = _answer_pair(rng)
        answer = right if rng.random() < 0.5 else wrong
        thinking = FILLER * rng.randint(1, 8)
        roll = rng.random()
        if roll < 0.05:
            text = f"<think>\n{thinking}"  # truncated: no </think>
        elif roll < 0.10:
            text = f"<think>\n{thinking}</think>\n\nThe final answer is ${answer}$."
        else:
            text = f"<think>\n{thinking}</think>\n\nSo the answer is $\\boxed{{{answer}}}$."
        responses.append(text)
        golds.append(gold)
    return responses, golds


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc), for contended machines."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    responses, golds = make_responses(args.n, args.seed)
    workers = args.workers or _default_num_workers()

    # Warm both paths on a different batch first: the trainer's pool is long-lived, so
    # the steady state (imports done, SymPy/ANTLR caches warm) is what matters.
    warm_r, warm_g = make_responses(200, args.seed + 1)
    for r, g in zip(warm_r, warm_g):
        math_reward(r, g)
    serial_runs, pool_runs = [], []  # (wall s, CPU s); alternated to share the noise
    with RewardPool(num_workers=workers, timeout=5.0) as pool:
        pool.wait_ready()
        pool.score(warm_r, warm_g)
        for _ in range(args.repeats):
            cpu0, start = time.process_time(), time.perf_counter()
            serial = [math_reward(r, g) for r, g in zip(responses, golds)]
            serial_runs.append((time.perf_counter() - start, time.process_time() - cpu0))

            pids = pool.worker_pids()
            cpu0, start = sum(map(_cpu_seconds, pids)), time.perf_counter()
            pooled = pool.score(responses, golds)
            wall = time.perf_counter() - start
            same = pids == pool.worker_pids()
            pool_runs.append((wall, sum(map(_cpu_seconds, pids)) - cpu0 if same else float("nan")))
            if pooled != serial:
                diff = sum(a != b for a, b in zip(pooled, serial))
                raise SystemExit(f"pool and single-process rewards differ on {diff} responses")

    n = args.n
    serial_s, serial_cpu = min(serial_runs)
    pool_s, pool_cpu = min(pool_runs)
    print(f"responses: {n}, mean reward {sum(serial) / n:.3f}, best of {args.repeats} runs each")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"single process: {n / serial_s:8.1f} answers/s ({serial_s:.2f} s wall, "
          f"{1000 * serial_cpu / n:.1f} CPU-ms per answer)")
    print(f"pool ({workers} workers): {n / pool_s:8.1f} answers/s ({pool_s:.2f} s wall, "
          f"{1000 * pool_cpu / n:.1f} worker CPU-ms per answer)")
    print(f"pool / single-process throughput: {serial_s / pool_s:.2f}x")


if __name__ == "__main__":
    main()
