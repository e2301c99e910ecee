"""The whole training loop on two processes x 4 CPU devices (`jax.distributed`, gloo) matches
the same config on one process with 8 devices: metrics.jsonl and the checkpointed parameters.

Each process of the distributed run takes its share of every step's prompts, samples them in
one global sampler call (continuous batching: 8 slots for the 24 rollouts of a step, refilled on
the devices from per-shard queues), scores them, builds its rows of the mixed batch, evaluates
its share of the held-out examples, and saves its shards of the orbax checkpoints; process 0
alone writes metrics.jsonl, the plots and the HF export. The distributed run stops after step 2
(checkpoint 2); the slow test restarts it for step 3 from that checkpoint, and the reference
runs 3 steps straight. A third distributed run gets SIGTERM on process 1 only: both processes
stop after the same step with its checkpoint.

Sampled rollouts and held-out answers (their lengths, rewards) match exactly; losses, gradient
norms and parameters match to float32 rounding (about 1 ulp): the sums over devices inside the
update (gradients, loss normalisers) add the per-device partial sums in a different order in
one process (XLA's CPU collectives) than across two (gloo).

The processes are this file run as a script:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python tests/test_multihost_loop.py --process-id ID --port PORT --run-dir DIR --steps N
(port 0 with 8 devices: the one-process reference).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
STEPS = 3
TIMEOUT_S = 600  # only ever waited out when something is broken; then the processes get SIGKILL
# The same in every process on both sides of the comparison; about halves CPU compile time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The demo config, tiny: 8 prompts x (3 rollouts + 1 demonstration) per step in 2 updates of
# 16 rows (micro-batches of 8 rows: 4 from each process); 13 held-out examples in batches of 8
# (the second batch splits 3 + 2 between the processes), sampled at temperature 1 so that the
# response lengths of the untrained model vary.
OVERRIDES = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
    "model.num_heads=2", "model.num_kv_heads=1",
    "train.prompts_per_step=8", "train.rollouts_per_prompt=3", "train.updates_per_step=2",
    "train.micro_batch_size=8", "train.optim.lr=1e-3", "train.optim.warmup_steps=0", "train.checkpoint_every=2",
    "train.optim.schedule=constant",  # the runs stop at different train.steps; a cosine would differ
    "train.progress_bar=false", "train.reward_workers=1", "train.tensorboard=false",
    "eval.every=2", "eval.num_examples=13", "eval.batch_size=8", "eval.temperature=1.0",
    "data.max_rows=64",
    "sampler.decode_slots=8",  # 8 prompts x 3 rollouts = 24 rows through 8 slots (one per device)
]
VOLATILE = ("time/", "throughput/", "compile/")  # wall-clock figures; compiles restart on resume


# ---- the processes -------------------------------------------------------------------------------
def run_process(process_id: int, port: int, run_dir: str, steps: int) -> None:
    """One process of the distributed run (port > 0) or the one-process reference (port 0)."""
    import jax

    from srft_jax.config import load_config, resolve_config_path
    from srft_jax.train import train

    overrides = OVERRIDES + [f"train.run_dir={run_dir}", f"train.steps={steps}",
                             f"train.export_hf={'true' if port else 'false'}",
                             "eval.benchmarks=[math500]",
                             f"eval.benchmark_dir={os.path.join(os.path.dirname(run_dir), 'bench')}"]
    if port:
        overrides += [f"mesh.coordinator_address=127.0.0.1:{port}", f"mesh.num_processes={NUM_PROCESSES}",
                      f"mesh.process_id={process_id}"]
    result = train(load_config(resolve_config_path("demo"), overrides))
    assert jax.process_count() == (NUM_PROCESSES if port else 1)
    assert jax.device_count() == 8
    if result.stopped:  # by a signal: the exit code says so (see test_sigterm_to_one_process...)
        print(f"stopped at step {result.final_step}", flush=True)
        sys.exit(75)
    assert result.final_step == steps


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(process_id: int, port: int, devices: int, run_dir, steps: int, log_path) -> subprocess.Popen:
    """One process, its output to `log_path` (a pipe left unread could fill and block it)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--process-id", str(process_id), "--port", str(port),
           "--run-dir", str(run_dir), "--steps", str(steps)]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs: dict, deadline: float) -> None:
    """Waits for every process ({log path: Popen}); fails with the log of one that failed."""
    for p in procs.values():
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"processes did not finish in time; logs: {list(procs)}") from None
    for path, p in procs.items():
        if p.returncode != 0:
            with open(path) as f:
                raise AssertionError(f"{path} failed (exit {p.returncode}):\n{f.read()[-5000:]}")


def _distributed(run_dir, steps: int, log_dir) -> dict:
    port = _free_port()
    return {str(log_dir / f"process{i}-steps{steps}.log"):
            _start(i, port, DEVICES_PER_PROCESS, run_dir, steps, log_dir / f"process{i}-steps{steps}.log")
            for i in range(NUM_PROCESSES)}


def _kill(procs: dict) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- reading the runs ----------------------------------------------------------------------------
def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


def _params(run_dir, step: int) -> dict[str, np.ndarray]:
    """A checkpoint's parameters as numpy arrays by name (read on this one process)."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(run_dir, "checkpoints", str(step), "params"))
    reader = ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # not the saving devices
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          reader.metadata(path).item_metadata.tree)
    tree = reader.restore(path, target)
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ---- the tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes run steps 1-2 (held-out eval and checkpoint at step 2) while the reference
    runs steps 1-3 straight. Returns (directory, distributed run dir, reference run dir)."""
    root = tmp_path_factory.mktemp("multihost")
    multi, ref = root / "multi", root / "ref"
    (root / "bench").mkdir()
    with open(root / "bench" / "math500.jsonl", "w") as f:  # in-training benchmark eval, 5 items
        for i, (a, b) in enumerate([(2, 3), (7, 1), (4, 4), (9, 0), (1, 6)]):
            f.write(json.dumps({"id": f"m{i}", "question": f"What is {a} + {b} ?", "answer": str(a + b)}) + "\n")
    deadline = time.monotonic() + TIMEOUT_S
    reference = {str(root / "reference.log"): _start(0, 0, 8, ref, STEPS, root / "reference.log")}
    distributed = {}
    try:
        distributed = _distributed(multi, 2, root)
        _wait(distributed, deadline)
        _wait(reference, deadline)
    finally:
        _kill(distributed)
        _kill(reference)
    return root, multi, ref


def _compare_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        step = g["step"]
        assert sorted(g) == sorted(w), (step, set(g) ^ set(w))
        # From sampled tokens (lengths, rewards, held-out accuracy): exact.
        exact = [k for k in w if k.startswith(("reward/", "rollout/length", "rollout/truncated", "eval/"))]
        for key in exact + ["train/skipped_total", "train/lr"]:
            assert g[key] == w[key], (step, key, g[key], w[key])
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {key}")


def _compare_params(multi, ref, step: int) -> None:
    got, want = _params(multi, step), _params(ref, step)
    assert sorted(got) == sorted(want) and len(want) > 5
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6, err_msg=f"step {step} {name}")


def test_two_process_loop_matches_one_process(runs):
    _, multi, ref = runs
    got, want = _metrics(multi), _metrics(ref)
    # Written once (by process 0): one record per step.
    assert [r["step"] for r in got] == [1, 2]
    _compare_metrics(got, want[:2])
    assert "eval/accuracy" in got[1] and got[1]["eval/num_examples"] == 13
    # The benchmark's prompts are split between the processes and their samples gathered back.
    assert "eval/math500/accuracy" in got[1] and "eval/math500/response_length" in got[1]
    assert "eval/accuracy" not in got[0] and "reward/rollout" in got[0]
    # The checkpoint that both processes wrote, and process 0's export and plots.
    _compare_params(multi, ref, 2)
    assert os.path.isfile(multi / "hf" / "config.json")
    assert os.path.isfile(multi / "plots" / "overview.png")


def test_sigterm_to_one_process_stops_both_after_the_same_step(runs, tmp_path):
    """SIGTERM to process 1 only, after step 1: both processes finish the same step, write its
    checkpoint together and exit 75; what they logged is what the reference logged."""
    root, _, ref = runs
    run_dir = root / "stopped"
    procs = _distributed(run_dir, STEPS, tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline
            time.sleep(0.05)
        list(procs.values())[1].send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        _kill(procs)
    codes = [p.returncode for p in procs.values()]
    logs = [open(path).read() for path in procs]
    assert codes == [75, 75], (codes, [log[-3000:] for log in logs])
    steps = {int(line.split()[-1]) for log in logs for line in log.splitlines()
             if line.startswith("stopped at step")}
    assert len(steps) == 1, logs  # the same step on both processes
    (step,) = steps
    assert 2 <= step <= STEPS  # step 1 was logged before the signal: at least step 2
    got = _metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, step + 1))
    _compare_metrics(got, _metrics(ref)[:step])
    _compare_params(run_dir, ref, step)


@pytest.mark.slow
def test_two_process_run_resumes_exactly(runs):
    """The two processes restart with steps=3: both restore checkpoint 2 and continue as the
    reference did without stopping."""
    root, multi, ref = runs
    procs = _distributed(multi, STEPS, root)
    try:
        _wait(procs, time.monotonic() + TIMEOUT_S)
    finally:
        _kill(procs)
    got = _metrics(multi)
    assert [r["step"] for r in got] == [1, 2, 3]
    _compare_metrics(got, _metrics(ref))
    _compare_params(multi, ref, STEPS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    a = parser.parse_args()
    run_process(a.process_id, a.port, a.run_dir, a.steps)
