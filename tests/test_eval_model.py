"""`srft-jax eval` end to end on a tiny random model with the project's sampler on 8 CPU
devices: well-formed outputs (accuracy not asserted), batching-independent samples, and the
in-training evaluation metrics."""

import json

import jax
import pytest

from srft_jax.data.eval_sets import load_benchmark
from srft_jax.data.synthetic import make_synthetic_tokenizer
from srft_jax.evaluation import EvalProtocol, evaluate
from srft_jax.evaluation.policy import (
    ModelPolicy,
    evaluate_during_training,
)
from srft_jax.evaluation.report import COLUMNS
from srft_jax.mesh import MeshConfig, make_mesh
from srft_jax.models import ModelConfig, create_sharded_model, save_pretrained
from srft_jax.rewards import RewardPool
from srft_jax.data.prompts import PromptTemplate
from srft_jax.runs import load_model

MATH = [{"id": f"m{i}", "question": f"What is {a} + {b} ?", "answer": str(a + b)}
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (7, 1)])]
MC = [{"id": "q1", "question": "What is 1 + 1 ?", "options": ["1", "2", "3", "4"], "answer": "B"},
      {"id": "q2", "question": "What is 2 + 1 ?", "options": ["3", "5", "6", "9"], "answer": "A"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_synthetic_tokenizer()
    model = create_sharded_model(ModelConfig.tiny(vocab_size=len(tokenizer)), None, seed=0)
    save_pretrained(model, str(root / "model"), tokenizer=tokenizer)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "math500.jsonl", MATH)
    write_jsonl(data / "arc_c.jsonl", MC)
    return root


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=1, timeout=10.0) as p:
        yield p


def test_cli_eval_on_tiny_model(model_dir):
    import argparse

    from srft_jax.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    out = model_dir / "out"
    args = parser.parse_args([
        "--model", str(model_dir / "model"), "--benchmarks", "math500,arc_c",
        "--data-dir", str(model_dir / "data"), "--out", str(out), "--limit", "4",
        "--max-new-tokens", "8", "--n", "2", "--temperature", "1.0", "--batch-size", "4",
        "--system-prompt", "Think step by step , then put the answer in \\boxed{ } .",
        "--reward-workers", "1", "--no-progress"])
    assert eval_cmd.run(args) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "model" and set(results["benchmarks"]) == {"math500", "arc_c"}
    math = results["benchmarks"]["math500"]
    assert (math["num_items"], math["num_samples"]) == (4, 2)
    assert 0.0 <= math["metrics"]["accuracy"] <= 1.0
    assert set(math["metrics"]) == {"accuracy", "avg@2", "pass@1", "pass@2", "maj@2"}
    assert 1 <= math["mean_length"] <= 8
    records = [json.loads(line) for line in (out / "math500.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["m0", "m1", "m2", "m3"]
    for r in records:
        assert len(r["responses"]) == len(r["rewards"]) == len(r["lengths"]) == 2
        assert all(isinstance(t, str) for t in r["responses"])
        assert all(1 <= n <= 8 for n in r["lengths"]) and set(r["rewards"]) <= {0.0, 1.0}
        assert all(n == 8 for t, n in zip(r["truncated"], r["lengths"]) if t)  # cut at the cap
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |"
    assert table[2].startswith("| model | - | - | ") and table[2].count("|") == len(COLUMNS) + 1
    assert len((out / "arc_c.jsonl").read_text().splitlines()) == 2
    assert results["benchmarks"]["arc_c"]["num_samples"] == 2


def test_samples_do_not_depend_on_batching_and_training_metrics(model_dir, pool):
    mesh = make_mesh(MeshConfig(fsdp=-1))
    model, tokenizer, template = load_model(str(model_dir / "model"), mesh)
    assert template == PromptTemplate()  # an HF directory: the paper's prompt
    text = "3 + 5 = 8 . </think> \\boxed{ 8 }"  # the saved synthetic tokenizer, not Qwen2's
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    items = {"math500": load_benchmark("math500", path=str(model_dir / "data" / "math500.jsonl"))}
    policy = ModelPolicy(model, tokenizer, mesh)
    runs = []
    for batch_size in (3, 10):
        protocol = EvalProtocol(max_new_tokens=8, default_samples=2, batch_size=batch_size,
                                temperature=1.0)
        runs.append(evaluate(policy, items, tokenizer, None, protocol, pool=pool, progress=False))
    a, b = (r.benchmarks["math500"].records for r in runs)
    assert [r["responses"] for r in a] == [r["responses"] for r in b]
    assert len({t for r in a for t in r["responses"]}) > 1  # sampling, not one repeated string

    protocol = EvalProtocol(max_new_tokens=8, default_samples=2, batch_size=10, temperature=1.0)
    metrics = evaluate_during_training(model, tokenizer, items, protocol, mesh, seed=3,
                                       sampler=policy.sampler, pool=pool)
    # Every batch is padded to a multiple of the 8 batch shards (the sampler's per-shard queues):
    # one prefill and one decode program, reused by both batchings and the training eval.
    assert policy.sampler.stats.compiles == 2
    assert {"eval/math500/accuracy", "eval/math500/pass@1", "eval/math500/response_length",
            "eval/math_avg"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0.0 <= metrics["eval/math500/accuracy"] <= 1.0
    assert jax.device_count() == 8


@pytest.mark.slow
def test_load_training_run_directory(tmp_path):
    """A run directory gives its latest checkpoint's parameters, tokenizer and prompt."""
    import dataclasses
    import os

    import numpy as np
    from flax import nnx

    from srft_jax.checkpoint import Checkpointer
    from srft_jax.config import load_config, resolve_config_path, to_yaml

    run = str(tmp_path / "run")
    os.makedirs(run)
    cfg = load_config(resolve_config_path("demo"), [f"train.run_dir={run}"])
    tokenizer = make_synthetic_tokenizer(os.path.join(run, "tokenizer"))
    model_cfg = ModelConfig.tiny(vocab_size=len(tokenizer))
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    with open(os.path.join(run, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(model_cfg), f)
    params = nnx.to_pure_dict(nnx.state(create_sharded_model(model_cfg, None, seed=1)))
    ckpt = Checkpointer(run, async_save=False)
    ckpt.save(5, params, {"count": np.zeros((), np.int32)}, {"step": 5})
    ckpt.close()

    model, tok, template = load_model(run, make_mesh(MeshConfig(fsdp=-1)))
    assert template == cfg.data.template
    assert len(tok) == len(tokenizer)
    loaded = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(loaded, jax.tree.leaves(params)))
