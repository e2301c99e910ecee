"""Aggregation and outputs of benchmarks/mini_table2.py (not run on its own):

    python benchmarks/mini_table2.py --out runs/mini_table2

results.json (the shape of issue 12; accuracies are fractions; the headline metric is the
paper's protocol, temperature 0.6 with avg@k; ID / OOD are averages over the sets, and std
is the sample standard deviation over seeds, 0 with one seed)::

    {"base": {"id": x, "ood": y},
     "methods": {"<name>": {"id": mean, "id_std": s, "ood": mean, "ood_std": s, "seeds": n,
                            "per_set": {"<set>": {"t0.6": m, "t0.6_std": s, "greedy": m,
                                                  "greedy_std": s}}}}}

table.md: the main table in the paper's Table 2 layout, the ablation, the greedy table, the
LR search and the token analysis; fig6_dynamics.png: the paper's Fig. 6 quantities.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Optional, Sequence

OOD_SETS = ("ood_operands", "ood_operator", "ood_phrasing")
ID_SETS = ("id",)
LABELS = {"sft": "SFT", "grpo": "RL (GRPO)", "sft_grpo": "SFT -> RL", "luffy": "LUFFY",
          "srft_paper": "SRFT (paper)", "srft_official": "SRFT (official)",
          "srft_fixed_wsft": "SRFT (paper), w_sft = 1", "srft_fixed_wrl": "SRFT (paper), w_rl = 1"}
MAIN = ("sft", "grpo", "sft_grpo", "luffy", "srft_paper", "srft_official")
ABLATION = ("srft_paper", "srft_fixed_wsft", "srft_fixed_wrl")
CURVES = ("srft_paper", "srft_official", "grpo", "luffy")
CURVE_METRICS = (("reward/rollout", "Training reward (rollouts)"),
                 ("rollout/length", "Rollout response length (tokens)"),
                 ("rollout/entropy", "Rollout entropy (nats / token)"))
HEADLINE = "t0.6"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def ood_average(evals: dict, key: str = HEADLINE) -> float:
    return statistics.fmean(evals[s][key] for s in OOD_SETS)


def choose_lrs(search: list[dict], methods: Sequence[str], lrs: Sequence[float]) -> dict[str, float]:
    """Per method, the LR with the best validation accuracy (temperature 0.6); the smaller
    LR on a tie; the only LR when there was no search."""
    if len(lrs) == 1:
        return {m: lrs[0] for m in methods}
    chosen = {}
    for m in methods:
        scores = {r["lr"]: r["eval"]["val"][HEADLINE] for r in search if r["method"] == m}
        chosen[m] = max(sorted(scores), key=lambda lr: scores[lr])
    return chosen


def results_json(base_eval: dict, records: list[dict], methods: Sequence[str]) -> dict:
    out = {"base": {"id": statistics.fmean(base_eval[s][HEADLINE] for s in ID_SETS),
                    "ood": ood_average(base_eval)}, "methods": {}}
    for m in methods:
        runs = sorted((r for r in records if r["method"] == m), key=lambda r: r["seed"])
        if not runs:
            continue
        id_mean, id_std = _mean_std([statistics.fmean(r["eval"][s][HEADLINE] for s in ID_SETS) for r in runs])
        ood_mean, ood_std = _mean_std([ood_average(r["eval"]) for r in runs])
        per_set = {}
        for s in ("val",) + ID_SETS + OOD_SETS:
            per_set[s] = {}
            for key in (HEADLINE, "greedy"):
                mean, std = _mean_std([r["eval"][s][key] for r in runs])
                per_set[s][key], per_set[s][f"{key}_std"] = mean, std
        out["methods"][m] = {"id": id_mean, "id_std": id_std, "ood": ood_mean, "ood_std": ood_std,
                             "seeds": len(runs), "per_set": per_set}
    return out


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def main_table(results: dict, base_eval: dict, key: str, rows: Sequence[str]) -> str:
    header = "| model | ID | OOD operands | OOD operator | OOD phrasing | OOD avg |\n|---|---|---|---|---|---|\n"
    lines = ["| base | " + " | ".join(f"{100 * base_eval[s][key]:.1f}" for s in ID_SETS + OOD_SETS)
             + f" | {100 * ood_average(base_eval, key):.1f} |"]
    for m in rows:
        if m not in results["methods"]:
            continue
        entry = results["methods"][m]
        ps = entry["per_set"]
        cells = [_pm(ps[s][key], ps[s][f"{key}_std"]) for s in ID_SETS + OOD_SETS]
        if key == HEADLINE:
            ood = _pm(entry["ood"], entry["ood_std"])
        else:  # the greedy OOD average over seeds, recomputed from the per-set means
            ood = f"{100 * statistics.fmean(ps[s][key] for s in OOD_SETS):.1f}"
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {ood} |")
    return header + "\n".join(lines) + "\n"


def ablation_table(results: dict) -> str:
    lines = ["| model | ID | OOD avg |", "|---|---|---|"]
    for m in ABLATION:
        if m in results["methods"]:
            e = results["methods"][m]
            lines.append(f"| {LABELS[m]} | {_pm(e['id'], e['id_std'])} | {_pm(e['ood'], e['ood_std'])} |")
    return "\n".join(lines) + "\n"


def lr_table(search: list[dict], chosen: dict, lrs: Sequence[float]) -> str:
    if not search:
        return "No search; the LRs: " + ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()) + ".\n"
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
             "|---" * (len(lrs) + 2) + "|"]
    for m, lr_best in chosen.items():
        cells = []
        for lr in lrs:
            rec = [r for r in search if r["method"] == m and r["lr"] == lr]
            cells.append(f"{100 * rec[0]['eval']['val'][HEADLINE]:.1f}" if rec else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {lr_best:g} |")
    return "\n".join(lines) + "\n"


def analysis_table(analysis: Optional[dict]) -> str:
    if not analysis:
        return "(no analysis)\n"
    lines = ["| model | responses | tokens | mean abs prob change | tokens changed > "
             f"{analysis['threshold']} | of them up / down | entropy (base -> tuned) | on changed tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in analysis["models"].items():
        for source, f in [("all", m)] + sorted(m["by_source"].items()):
            lines.append(
                f"| {name} | {source} | {f['tokens']} | {f['mean_abs_prob_change']:.3f} | "
                f"{100 * f['frac_tokens_changed']:.1f}% | {100 * f['frac_increased']:.1f}% / "
                f"{100 * f['frac_decreased']:.1f}% | {f['base_mean_entropy']:.3f} -> {f['mean_entropy']:.3f} | "
                f"{f['changed_base_entropy']:.3f} -> {f['changed_entropy']:.3f} |")
    return "\n".join(lines) + "\n"


def read_curves(records: list[dict], method: str) -> dict[str, list[list[tuple[int, float]]]]:
    """Per metric, one [(step, value)] series per seed of `method`."""
    from srft_jax.metrics import read_metrics

    out: dict[str, list] = {k: [] for k, _ in CURVE_METRICS}
    for r in sorted((r for r in records if r["method"] == method), key=lambda r: r["seed"]):
        metrics = read_metrics(r["final"])
        for key, _ in CURVE_METRICS:
            out[key].append([(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))])
    return out


def plot_dynamics(records: list[dict], path: str, smooth: int = 5) -> Optional[str]:
    """Fig. 6: mean over seeds (moving average of `smooth` steps), band = min..max of seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in CURVES if any(r["method"] == m for r in records)]
    if not methods:
        return None
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5.5 * len(CURVE_METRICS), 4))
    for method in methods:
        curves = read_curves(records, method)
        for ax, (key, title) in zip(axes, CURVE_METRICS):
            series = [s for s in curves[key] if s]
            if not series:
                continue
            n = min(len(s) for s in series)
            steps = np.asarray([p[0] for p in series[0][:n]])
            values = np.asarray([[p[1] for p in s[:n]] for s in series])  # [seeds, steps]
            kernel = np.ones(min(smooth, n)) / min(smooth, n)
            sm = np.stack([np.convolve(v, kernel, mode="valid") for v in values])
            x = steps[len(kernel) - 1:]
            line, = ax.plot(x, sm.mean(0), label=f"{LABELS[method]} ({len(series)} seeds)")
            if len(series) > 1:
                ax.fill_between(x, sm.min(0), sm.max(0), color=line.get_color(), alpha=0.15)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(out: str, base_eval: dict, records: list[dict], search: list[dict], chosen: dict,
              budget, analysis: Optional[dict], timings: dict, methods: Sequence[str]) -> None:
    import dataclasses

    results = results_json(base_eval, records, methods)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    seeds = max((e["seeds"] for e in results["methods"].values()), default=0)
    text = [f"# The paper's Table 2 in miniature (accuracy %, mean ± std over {seeds} seed(s))\n",
            f"Temperature 0.6, avg@{budget.eval_samples} (the paper's protocol):\n",
            main_table(results, base_eval, HEADLINE, MAIN),
            "\nAblation (the paper: SRFT 59.1; w_sft = 1: 55.1; w_rl = 1: 56.2):\n", ablation_table(results),
            "\nGreedy decoding:\n", main_table(results, base_eval, "greedy", MAIN + ABLATION[1:]),
            "\nLearning-rate search (validation accuracy %, temperature 0.6, seed 0):\n",
            lr_table(search, chosen, budget.lrs),
            "\nToken analysis (`srft-jax analyze`, seed-0 models against the base):\n", analysis_table(analysis),
            f"\nBudget: {json.dumps(dataclasses.asdict(budget))}\n",
            f"\nTimings (s): {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in timings.items()})}\n"]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("".join(text))
    with open(os.path.join(out, "lr_search.json"), "w") as f:
        json.dump({"lrs": list(budget.lrs), "chosen": chosen,
                   "validation": [{k: r[k] for k in ("method", "lr", "seed")} | {"val": r["eval"]["val"]}
                                  for r in search]}, f, indent=1)
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
    plot_dynamics(records, os.path.join(out, "fig6_dynamics.png"))
