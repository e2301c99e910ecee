"""`srft-jax plot`: which curves are drawn, and the files written."""

import json
import os

from srft_jax.plot import figure_series, plot_runs


def _write_run(path, records):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _srft(step):
    return {"step": step, "reward/rollout": 0.1 * step, "rollout/entropy": 1.0 / step,
            "demo/entropy": 0.5 / step, "demo/tokens": 40.0, "rollout/tokens": 100.0,
            "demo/w_sft": 0.6, "rollout/w_rl": 0.1, "loss/sft": 0.3, "loss/rl": 0.2,
            **({"eval/accuracy": 0.5} if step == 2 else {})}


def _grpo(step):  # no demonstrations: the loss reports demo figures as 0 over 0 tokens
    return {"step": step, "reward/rollout": 0.0, "rollout/entropy": 2.0, "demo/entropy": 0.0,
            "demo/tokens": 0.0, "rollout/tokens": 90.0, "demo/w_sft": 0.0, "rollout/w_rl": 0.2,
            "loss/sft": 0.0, "loss/rl": 0.1}


def test_curves_skip_sources_without_tokens_and_files_are_written(tmp_path):
    srft, grpo = str(tmp_path / "srft"), str(tmp_path / "grpo")
    _write_run(srft, [_srft(1), _srft(2)])
    _write_run(grpo, [_grpo(1), _grpo(2)])
    panels = {stem: dict(series) for stem, _, series in figure_series(
        {"srft": [_srft(1), _srft(2)], "grpo": [_grpo(1), _grpo(2)]})}
    assert set(panels["entropy"]) == {"srft: rollout/entropy", "srft: demo/entropy", "grpo: rollout/entropy"}
    assert panels["entropy"]["srft: demo/entropy"] == [(1, 0.5), (2, 0.25)]
    assert set(panels["weights"]) == {"srft: demo/w_sft", "srft: rollout/w_rl", "grpo: rollout/w_rl"}
    assert panels["accuracy"] == {"srft": [(2, 0.5)]}  # only steps that evaluated
    assert "grpo: loss/sft" in panels["loss"]  # a true 0 (no SFT term), not a missing source
    paths = plot_runs([srft, grpo], str(tmp_path / "out"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["reward.png", "accuracy.png", "entropy.png", "weights.png", "loss.png",
                            "overview.png"])
    assert all(os.path.getsize(p) > 1000 for p in paths)
