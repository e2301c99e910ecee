"""benchmarks/lora_vs_full.py: LoRA and full fine-tuning from the same pretrained base on a smoke
setting (2 steps, 4 problems per set), and its summary's seed statistics against hand-computed
values."""

import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import lora_vs_full  # noqa: E402
import mini_table2  # noqa: E402

SETS = ("val", "id", "ood_operands", "ood_operator", "ood_phrasing")


def _eval(value):
    return {s: {"t0.6": value + i / 100, "greedy": value / 2} for i, s in enumerate(SETS)}


def test_summary_means_spreads_and_checkpoint_ratio():
    def rec(variant, seed, value, ckpt):
        return {"variant": variant, "lr": 1e-3, "seed": seed, "eval": _eval(value), "checkpoint_bytes": ckpt,
                "trainable": {"trained": 10}, "seconds": {"train": 1.0}}

    records = [rec("full", 0, 0.5, 1000), rec("full", 1, 0.7, 1000), rec("lora_r4", 0, 0.6, 50), rec("lora_r4", 1, 0.6, 50)]
    search = [dict(r, lr=lr) for r in records[:1] for lr in (1e-4, 1e-3)]
    out = lora_vs_full.summarise(_eval(0.1), search, records, {"full": 1e-3, "lora_r4": 1e-3},
                                 ["full", "lora_r4"], mini_table2.SMOKE, {})
    full, lora = out["variants"]["full"], out["variants"]["lora_r4"]
    ids = [0.51, 0.71]
    assert full["t0.6"]["id"] == pytest.approx((statistics.mean(ids), statistics.stdev(ids)))
    oods = [statistics.mean([v + 0.02, v + 0.03, v + 0.04]) for v in (0.5, 0.7)]
    assert full["t0.6"]["ood"] == pytest.approx((statistics.mean(oods), statistics.stdev(oods)))
    assert lora["t0.6"]["id"] == pytest.approx((0.61, 0.0))
    assert lora["checkpoint_ratio"] == pytest.approx(0.05) and full["checkpoint_ratio"] == 1.0
    assert out["base"]["id"] == pytest.approx(0.11)
    assert "| lora_r4 | 10 | 0.001 | 61.0 ± 0.0 |" in lora_vs_full.table(out)


def test_smoke_run_trains_both_from_the_same_base(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "lora_vs_full.py"), "--smoke", "--out", str(out),
           "--cache", str(cache), "--variants", "full,lora_r4", "--lrs", "3e-3"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    full, lora = res["variants"]["full"], res["variants"]["lora_r4"]
    assert lora["trainable"]["adapters"] == lora["trainable"]["trained"] > 0
    assert full["trainable"]["adapters"] == 0 and full["trainable"]["trained"] == lora["trainable"]["base"]
    assert 0 < lora["checkpoint_ratio"] < 1
    for row in (full, lora):
        assert set(row["t0.6"]["per_set"]) == set(SETS)
        assert all(0.0 <= row[k][s][0] <= 1.0 for k in ("t0.6", "greedy") for s in ("id", "ood"))
    # Both started from the cached base: the LoRA run's checkpoint records it as its base.
    meta = out / "runs" / "lora_r4_lr0.003_s0" / "checkpoints" / "2" / "meta" / "metadata"
    base = json.loads(meta.read_text())["lora_base"]["path"]
    assert base.endswith(os.path.join("", "base")) and str(cache) in base
    assert "| lora_r4 |" in (out / "table.md").read_text()
