"""benchmarks/mini_table2.py: the whole machinery on a smoke setting (a base pretrained for
2 steps, two methods of 2 steps, 4 problems per set), the outputs' shapes, and the
aggregation (LR choice, mean/std over seeds) against hand-computed values."""

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import mini_table2_report as report  # noqa: E402

SETS = ("val", "id", "ood_operands", "ood_operator", "ood_phrasing")


def fake_eval(value):
    return {s: {"t0.6": value + i / 100, "greedy": value / 2} for i, s in enumerate(SETS)}


def test_lr_choice_reads_validation_only_and_prefers_the_smaller_lr_on_ties():
    search = [{"method": "sft", "lr": 1e-4, "eval": {"val": {"t0.6": 0.5}}},
              {"method": "sft", "lr": 3e-4, "eval": {"val": {"t0.6": 0.7}}},
              {"method": "grpo", "lr": 1e-4, "eval": {"val": {"t0.6": 0.4}}},
              {"method": "grpo", "lr": 3e-4, "eval": {"val": {"t0.6": 0.4}}}]
    assert report.choose_lrs(search, ["sft", "grpo"], [1e-4, 3e-4]) == {"sft": 3e-4, "grpo": 1e-4}
    assert report.choose_lrs([], ["sft"], [2e-4]) == {"sft": 2e-4}


def test_results_json_shape_and_seed_statistics():
    records = [{"method": "sft", "seed": s, "eval": fake_eval(v)} for s, v in enumerate((0.2, 0.4, 0.9))]
    out = report.results_json(fake_eval(0.1), records, ["sft", "grpo"])
    assert set(out) == {"base", "methods"} and set(out["base"]) == {"id", "ood"}
    assert list(out["methods"]) == ["sft"]  # a method with no run is left out
    entry = out["methods"]["sft"]
    assert set(entry) == {"id", "id_std", "ood", "ood_std", "seeds", "per_set"}
    ids = [0.2 + 0.01, 0.4 + 0.01, 0.9 + 0.01]  # "id" is the second set
    oods = [v + 0.03 for v in (0.2, 0.4, 0.9)]  # mean of +0.02, +0.03, +0.04
    assert entry["seeds"] == 3
    assert entry["id"] == pytest.approx(statistics.mean(ids)) and entry["id_std"] == pytest.approx(statistics.stdev(ids))
    assert entry["ood"] == pytest.approx(statistics.mean(oods)) and entry["ood_std"] == pytest.approx(statistics.stdev(oods))
    assert entry["per_set"]["ood_operator"]["greedy"] == pytest.approx(statistics.mean([0.1, 0.2, 0.45]))
    assert out["base"] == pytest.approx({"id": 0.11, "ood": 0.13})


def test_smoke_run_writes_every_output(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "mini_table2.py"), "--smoke", "--out", str(out),
           "--cache", str(cache), "--methods", "sft_grpo,srft_paper"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"base", "methods"} and set(results["methods"]) == {"sft_grpo", "srft_paper"}
    for entry in results["methods"].values():
        assert entry["seeds"] == 1 and entry["id_std"] == 0.0
        assert all(0.0 <= entry[k] <= 1.0 for k in ("id", "ood"))
        assert set(entry["per_set"]) == set(SETS)
    table = (out / "table.md").read_text()
    assert "| SFT -> RL |" in table and "| SRFT (paper) |" in table and "Ablation" in table
    assert (out / "fig6_dynamics.png").stat().st_size > 0
    summary = json.loads((out / "analysis" / "summary.json").read_text())
    assert set(summary["models"]) == {"srft_paper"} and summary["models"]["srft_paper"]["tokens"] > 0
    # SFT -> RL: two runs with the same code, the second starting from the first.
    stages = sorted(os.listdir(out / "runs" / "sft_grpo_lr0.0003_s0"))
    assert [s for s in stages if s.startswith("stage")] == ["stage1_sft", "stage2_grpo"]
    # The base is cached: every method started from it, and a second invocation reuses it.
    (base_dir,) = [d for d in os.listdir(cache) if d != "xla"]
    assert os.path.isdir(cache / base_dir / "base" / "checkpoints")
