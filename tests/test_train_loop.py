"""The training loop end to end on the demo config: outputs, exact resume after SIGKILL."""

import json
import os
import sys

import numpy as np
import pytest

from srft_jax.cli import main as cli_main
from srft_jax.metrics import read_metrics
from test_config_fields import assert_every_field_read, record_config_reads

pytestmark = pytest.mark.compat

SMALL = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
    "model.num_heads=2", "model.num_kv_heads=1",
    "train.prompts_per_step=4", "train.rollouts_per_prompt=3", "train.updates_per_step=2",
    "train.micro_batch_size=8", "train.optim.lr=1e-3", "train.optim.warmup_steps=0",
    "train.progress_bar=false", "train.reward_workers=1",
    "eval.num_examples=8", "eval.batch_size=8",
]
VOLATILE = ("time/", "throughput/", "compile/")


def _stable(record):
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


def _params(run_dir, step):
    """Parameters of a checkpoint as flat numpy arrays (read with orbax)."""
    import orbax.checkpoint as ocp

    path = os.path.join(run_dir, "checkpoints", str(step), "params")
    tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_demo_config_runs_and_writes_everything(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "demo"
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    with open(bench_dir / "math500.jsonl", "w") as f:  # a tiny local benchmark file
        for i, (q, a) in enumerate([("What is 2 + 3 ?", "5"), ("What is 7 - 4 ?", "3")]):
            f.write(json.dumps({"id": f"m{i}", "question": q, "answer": a}) + "\n")
    reads = record_config_reads(monkeypatch)  # every config field must be read (test_config_fields)
    rc = cli_main(["train", "--config", "demo", f"train.run_dir={run_dir}", "train.steps=2",
                   "eval.every=2", "train.checkpoint_every=2", "eval.benchmarks=[math500]",
                   f"eval.benchmark_dir={bench_dir}", *SMALL])
    assert rc == 0
    out = capsys.readouterr().out
    assert str(run_dir) in out and "final held-out accuracy" in out
    records = read_metrics(str(run_dir))
    assert [r["step"] for r in records] == [1, 2]
    last = records[-1]
    for key in ("loss", "reward/rollout", "reward/demo", "demo/entropy", "rollout/entropy",
                "demo/w_sft", "rollout/w_rl", "rollout/length", "eval/accuracy",
                "throughput/train_tokens_per_s", "time/sample_s", "time/update_s",
                "eval/math500/accuracy"):
        assert key in last, key
    assert last["reward/demo"] == 1.0  # the synthetic demonstrations verify
    assert os.path.isdir(run_dir / "checkpoints" / "2")
    assert os.path.isfile(run_dir / "hf" / "config.json")
    assert os.path.isfile(run_dir / "plots" / "overview.png")
    assert os.path.isfile(run_dir / "config.yaml")
    assert_every_field_read(reads)
    # The phase timers add up to the step time.
    phases = ("sample", "score", "assemble", "update", "eval", "checkpoint")
    for r in records:
        assert r["time/step_s"] == pytest.approx(sum(r[f"time/{p}_s"] for p in phases), rel=1e-9)
    # The logged learning rate is the cosine schedule's at the step's last update (update k of
    # 4: 2 steps x 2 updates; no warmup in SMALL), not the configured peak.
    import math

    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 3)]
    assert [r["train/lr"] for r in records] == pytest.approx(cosine, rel=1e-6)


def _train_cmd(run_dir, steps):
    return [sys.executable, "-m", "srft_jax.cli", "--log-level", "WARNING", "train", "--config", "demo",
            f"train.run_dir={run_dir}", f"train.steps={steps}", "train.checkpoint_every=2",
            "eval.every=0", "train.export_hf=false", "train.tensorboard=false", *SMALL]


def test_local_prompt_indices_split_every_update_between_shards():
    """Each data shard takes every S-th prompt of each update, so update u trains on the same
    prompts [u * n, (u + 1) * n) whatever the number of processes."""
    from srft_jax.distributed import DataShard
    from srft_jax.train import local_prompt_indices

    np.testing.assert_array_equal(local_prompt_indices(8, 2, DataShard(0, 1)), np.arange(8))
    shards = [local_prompt_indices(12, 3, DataShard(s, 2)) for s in range(2)]
    np.testing.assert_array_equal(shards[0], [0, 2, 4, 6, 8, 10])
    np.testing.assert_array_equal(shards[1], [1, 3, 5, 7, 9, 11])
    for u in range(3):  # update u: the u-th third of each shard's prompts
        together = np.concatenate([s[2 * u:2 * u + 2] for s in shards])
        assert sorted(together) == list(range(4 * u, 4 * u + 4))
    with pytest.raises(ValueError, match="train.prompts_per_step / train.updates_per_step=3"):
        local_prompt_indices(6, 2, DataShard(0, 2))


def test_sampler_logprobs_serve_as_old_logprobs(tmp_path):
    """With `train.recompute_old_logprobs=false` the ratio forms read the sampler's raw
    log-probs: on the first update (same parameters that sampled) every ratio is 1 up to
    float noise, so the loss equals the one with recomputed log-probs. LUFFY's unclipped
    ratio term with the demonstration in each group gives the rollouts non-zero advantages."""
    records = {}
    for recompute in (True, False):
        run_dir = tmp_path / f"recompute_{recompute}"
        rc = cli_main(["--log-level", "WARNING", "train", "--config", "demo",
                       f"train.run_dir={run_dir}", "train.steps=1", "eval.every=0",
                       "train.export_hf=false", "train.tensorboard=false", "loss.preset=luffy",
                       f"train.recompute_old_logprobs={str(recompute).lower()}", *SMALL,
                       "train.updates_per_step=1", "train.micro_batch_size=16"])
        assert rc == 0
        records[recompute] = read_metrics(str(run_dir))[0]
    fresh, reused = records[True], records[False]
    assert fresh["reward/rollout"] == reused["reward/rollout"]  # the same rollouts
    assert abs(reused["loss"] - fresh["loss"]) <= 1e-4 * max(1.0, abs(fresh["loss"]))
