"""LoRA SRFT against full-fine-tuning SRFT, from the miniature world's pretrained base, on a CPU.

    python benchmarks/lora_vs_full.py --out runs/lora_vs_full            # LR search + 3 seeds
    python benchmarks/lora_vs_full.py --out /tmp/lora_smoke --smoke      # machinery check

The world, the base model and the budget are those of `benchmarks/mini_table2.py` (see
docs/mini-table2.md): the base is the demo's decoder SFT-pretrained on one-step problems, and
every variant fine-tunes it with the `paper` SRFT loss for 50 steps x 16 prompts (7 rollouts +
1 demonstration each, 2 updates per step, AdamW at a constant LR). The variants differ only in
what is trained:

- `full`: every parameter (the mini_table2 run `srft_paper`);
- `lora_r16`: rank-16 adapters (alpha 32) on all seven projections, the rest frozen;
- `lora_r4`: rank-4 adapters (alpha 8) on all seven projections;
- `lora_r16_dropout`: `lora_r16` with adapter dropout 0.05 (PEFT's `lora_dropout`).

Every variant gets the same LR search (seed 0, best validation accuracy at temperature 0.6,
avg@k, on the `val` split), then seeds 0..N-1 at its chosen LR are evaluated on the
in-distribution and out-of-distribution test sets. Also recorded: trainable parameters and the
size on disk of each run's final checkpoint (LoRA / full).

Outputs in `--out`: `results.json`, `table.md`, `runs/` (every run with its metrics and
evaluations). Finished runs and evaluations are skipped when the same command runs again;
the world, the base and XLA's compilation cache are shared with mini_table2 (`--cache`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mini_table2 as mt  # noqa: E402

log = logging.getLogger("lora_vs_full")

# variant -> overrides on top of mini_table2's config (the `paper` loss for all)
VARIANTS: dict[str, tuple[str, ...]] = {
    "full": (),
    "lora_r16": ("model.lora.rank=16", "model.lora.alpha=32", "model.lora.targets=['.*']"),
    "lora_r4": ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=['.*']"),
    "lora_r16_dropout": ("model.lora.rank=16", "model.lora.alpha=32", "model.lora.targets=['.*']",
                         "model.lora.dropout=0.05"),
}
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
HEADLINE = "t0.6"


# A job is mini_table2's (`method` holds the variant's name): one variant at one LR and seed.
Job = mt.Job


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run_job(job: Job, paths: mt.Paths, budget: mt.Budget) -> dict:
    run_dir = os.path.join(paths.runs, job.name)
    record_path = os.path.join(run_dir, "result.json")
    earlier: dict = {}
    if os.path.isfile(record_path):
        with open(record_path) as f:
            earlier = json.load(f)
        if set(job.sets) <= set(earlier["eval"]):
            return earlier
    t0 = time.perf_counter()
    mt.train_run(run_dir, paths.world["train_dir"], paths.tokenizer, loss={"preset": "paper"},
                 steps=budget.steps, budget=budget, lr=job.lr, seed=job.seed, init=paths.base,
                 extra=VARIANTS[job.method])
    t_train = time.perf_counter() - t0 + earlier.get("seconds", {}).get("train", 0.0)
    t1 = time.perf_counter()
    results = mt.evaluate_model(run_dir, paths, budget, job.sets, os.path.join(run_dir, "eval"))
    record = {"variant": job.method, "lr": job.lr, "seed": job.seed, "eval": results,
              "trainable": trainable_params(run_dir),
              "checkpoint_bytes": dir_bytes(os.path.join(run_dir, "checkpoints")),
              "seconds": {"train": t_train, "eval": time.perf_counter() - t1
                          + earlier.get("seconds", {}).get("eval", 0.0)}}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def trainable_params(run_dir: str) -> dict:
    """{"trained": parameters the optimiser updates, "total": all parameters} of a run."""
    import jax
    from flax import nnx

    from srft_jax import mesh as mesh_lib
    from srft_jax.runs import load_model

    model, _, _ = load_model(run_dir, mesh_lib.make_mesh(mesh_lib.MeshConfig()))
    count = lambda state: sum(x.size for x in jax.tree.leaves(state))
    lora = count(nnx.state(model, nnx.LoRAParam))
    total = count(nnx.state(model, nnx.Param))
    return {"trained": lora if lora else total, "base": total - lora, "adapters": lora}


def run_all(jobs, paths, budget, workers):
    return mt.run_all(jobs, paths, budget, workers, fn=run_job)


def mean_std(xs):
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(base_eval, search, records, chosen, variants, budget, timings) -> dict:
    from srft_jax.data.mini_world import EVAL_SETS

    ood = [s for s in EVAL_SETS if s != "id"]
    out = {"budget": dataclasses.asdict(budget), "lrs": list(budget.lrs), "chosen_lr": chosen,
           "base": {"id": base_eval["id"][HEADLINE], "ood": statistics.fmean(base_eval[s][HEADLINE] for s in ood),
                    "val": base_eval["val"][HEADLINE]},
           "search": {v: {f"{r['lr']:g}": r["eval"]["val"][HEADLINE] for r in search if r["variant"] == v}
                      for v in variants},
           "variants": {}, "timings": timings}
    for v in variants:
        runs = sorted((r for r in records if r["variant"] == v), key=lambda r: r["seed"])
        row = {"seeds": [r["seed"] for r in runs], "trainable": runs[0]["trainable"],
               "checkpoint_bytes": runs[0]["checkpoint_bytes"],
               "train_s": statistics.fmean(r["seconds"]["train"] for r in runs)}
        for key in (HEADLINE, "greedy"):
            ids = [r["eval"]["id"][key] for r in runs]
            oods = [statistics.fmean(r["eval"][s][key] for s in ood) for r in runs]
            row[key] = {"id": mean_std(ids), "ood": mean_std(oods), "id_per_seed": ids, "ood_per_seed": oods,
                        "per_set": {s: mean_std(r["eval"][s][key] for r in runs) for s in ("val",) + EVAL_SETS}}
        out["variants"][v] = row
    full = out["variants"].get("full")
    for v, row in out["variants"].items():
        if full:
            row["checkpoint_ratio"] = row["checkpoint_bytes"] / full["checkpoint_bytes"]
    return out


def table(res: dict) -> str:
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"
    lines = [f"Base: id {100 * res['base']['id']:.1f}%, ood {100 * res['base']['ood']:.1f}%, "
             f"val {100 * res['base']['val']:.1f}% (temperature 0.6, avg@k)", "",
             "| variant | trained params | LR (chosen on val) | id (t0.6) | ood (t0.6) | id (greedy) "
             "| ood (greedy) | checkpoint bytes | / full | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, row in res["variants"].items():
        lines.append(f"| {v} | {row['trainable']['trained']:,} | {res['chosen_lr'][v]:g} | {pct(row[HEADLINE]['id'])} "
                     f"| {pct(row[HEADLINE]['ood'])} | {pct(row['greedy']['id'])} | {pct(row['greedy']['ood'])} "
                     f"| {row['checkpoint_bytes']:,} | {row.get('checkpoint_ratio', 1):.3f} | {row['train_s']:.0f} |")
    lines += ["", "LR search (seed 0, val accuracy %, temperature 0.6):", "",
              "| variant | " + " | ".join(f"{lr:g}" for lr in res["lrs"]) + " |",
              "|---|" + "---|" * len(res["lrs"])]
    for v, scores in res["search"].items():
        lines.append(f"| {v} | " + " | ".join(f"{100 * scores[f'{lr:g}']:.1f}" if f"{lr:g}" in scores else ""
                                             for lr in res["lrs"]) + " |")
    lines += ["", "Per seed (id / ood, temperature 0.6, %):", ""]
    for v, row in res["variants"].items():
        pairs = ", ".join(f"s{s}: {100 * i:.1f} / {100 * o:.1f}" for s, i, o in
                          zip(row["seeds"], row[HEADLINE]["id_per_seed"], row[HEADLINE]["ood_per_seed"]))
        lines.append(f"- {v}: {pairs}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (machinery check)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds at the chosen LR")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--lrs", default=None, help="comma-separated LR search (default 1e-4,3e-4,1e-3,3e-3,1e-2)")
    parser.add_argument("--cache", default="runs/mini_table2_cache",
                        help="world, base model and XLA compilation cache (shared with mini_table2)")
    parser.add_argument("--workers", type=int, default=1, help="parallel training processes")
    args = parser.parse_args(argv)
    budget = mt.SMOKE if args.smoke else mt.FULL
    if args.lrs:
        lrs = tuple(float(x) for x in args.lrs.split(","))
    elif args.smoke:
        lrs = (3e-4, 3e-3)
    else:
        lrs = LRS
    budget = dataclasses.replace(budget, lrs=lrs, seeds=1 if args.smoke else args.seeds)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    mt.setup_process(os.path.abspath(os.path.join(args.cache, "xla")))
    t_start = time.perf_counter()
    paths, info = mt.prepare(args.cache, budget)
    paths = dataclasses.replace(paths, runs=os.path.join(args.out, "runs"))
    from srft_jax.data.mini_world import EVAL_SETS

    timings = {"workers": args.workers, **info}
    base_eval = mt.evaluate_model(paths.base, paths, budget, ("val",) + EVAL_SETS,
                                  os.path.join(args.out, "base_eval"))
    t0 = time.perf_counter()
    search = run_all([Job(v, lr, 0, ("val",)) for v in variants for lr in budget.lrs], paths, budget, args.workers)
    chosen = {}
    for v in variants:  # best val accuracy; the smaller LR on a tie
        scores = {r["lr"]: r["eval"]["val"][HEADLINE] for r in search if r["variant"] == v}
        chosen[v] = max(sorted(scores), key=lambda lr: scores[lr])
    timings["lr_search_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    final = [Job(v, chosen[v], s, ("val",) + EVAL_SETS) for s in range(budget.seeds) for v in variants]
    records = run_all(final, paths, budget, args.workers)
    timings["final_runs_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    res = summarise(base_eval, search, records, chosen, variants, budget, timings)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    text = table(res)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}/results.json and table.md; {timings['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
