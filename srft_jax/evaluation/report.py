"""Evaluation outputs: results.json, the paper's Table 2 as Markdown, and run comparison.

Table columns are exactly those of the paper (srft-method.md "Results to reproduce"):

    | model | AIME24 | AMC | MATH500 | Minerva | Olympiad | avg | ARC-c | GPQA-D | MMLU-Pro | OOD avg |

Values are accuracy in percent with one decimal (avg@n: the mean over the n samples of each
item, then over items). "avg" is the unweighted mean over the in-distribution math
benchmarks present, "OOD avg" over the out-of-distribution ones present; a benchmark that
was not evaluated shows "-" and is left out of its average. Benchmarks outside the paper's
table (e.g. a held-out split) get a second table.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from srft_jax.faults import MissingDataError

IN_DISTRIBUTION = (("aime24", "AIME24"), ("amc", "AMC"), ("math500", "MATH500"),
                   ("minerva", "Minerva"), ("olympiad", "Olympiad"))
OUT_OF_DISTRIBUTION = (("arc_c", "ARC-c"), ("gpqa_diamond", "GPQA-D"), ("mmlu_pro", "MMLU-Pro"))
COLUMNS = (("model",) + tuple(c for _, c in IN_DISTRIBUTION) + ("avg",)
           + tuple(c for _, c in OUT_OF_DISTRIBUTION) + ("OOD avg",))
PAPER_BENCHMARKS = tuple(n for n, _ in IN_DISTRIBUTION + OUT_OF_DISTRIBUTION)
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def averages(accuracies: dict[str, float]) -> dict[str, Optional[float]]:
    """``{"avg": ..., "ood_avg": ...}`` over the benchmarks present (None if none is)."""
    return {
        "avg": _mean([accuracies[n] for n, _ in IN_DISTRIBUTION if n in accuracies]),
        "ood_avg": _mean([accuracies[n] for n, _ in OUT_OF_DISTRIBUTION if n in accuracies]),
    }


def table_values(accuracies: dict[str, float]) -> list[Optional[float]]:
    """The ten numeric cells of a row (fractions; None = not evaluated)."""
    avg = averages(accuracies)
    return ([accuracies.get(n) for n, _ in IN_DISTRIBUTION] + [avg["avg"]]
            + [accuracies.get(n) for n, _ in OUT_OF_DISTRIBUTION] + [avg["ood_avg"]])


def _cell(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_table(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    """The paper's table for ``(model name, {benchmark: accuracy fraction})`` rows."""
    return _markdown(COLUMNS, [[name] + [_cell(v) for v in table_values(acc)] for name, acc in rows])


def render_other_table(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    """A table of the benchmarks outside the paper's columns ("" when there are none)."""
    others = sorted({b for _, acc in rows for b in acc if b not in PAPER_BENCHMARKS})
    if not others:
        return ""
    return _markdown(["model"] + others,
                     [[name] + [_cell(acc.get(b)) for b in others] for name, acc in rows])


def results_json(results) -> dict:
    """The content of results.json for an :class:`~srft_jax.evaluation.harness.EvalResults`."""
    import dataclasses

    acc = results.accuracies()
    return {
        "model": results.model,
        "protocol": dataclasses.asdict(results.protocol),
        "benchmarks": {name: b.to_json() for name, b in results.benchmarks.items()},
        "averages": averages(acc),
        "table": dict(zip(COLUMNS[1:], table_values(acc))),
    }


def write_outputs(results, out_dir: str) -> tuple[str, str]:
    """Writes ``results.json`` and ``table.md`` (atomically) and returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    payload = json.dumps(results_json(results), indent=1, ensure_ascii=False) + "\n"
    row = [(results.model, results.accuracies())]
    table = render_table(row)
    other = render_other_table(row)
    if other:
        table += "\nOther benchmarks (accuracy %):\n\n" + other
    paths = []
    for name, text in ((RESULTS_FILE, payload), (TABLE_FILE, table)):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths[0], paths[1]


def find_results(path: str) -> str:
    """results.json of a run: ``path`` itself, ``path/results.json`` or ``path/eval/results.json``."""
    for candidate in (path, os.path.join(path, RESULTS_FILE),
                      os.path.join(path, "eval", RESULTS_FILE)):
        if os.path.isfile(candidate):
            return candidate
    raise MissingDataError(f"no {RESULTS_FILE} at {path!r} (nor in {path}/ or {path}/eval/)")


def load_accuracies(path: str) -> tuple[str, dict[str, float]]:
    """(model name, {benchmark: accuracy}) from a results.json (or a directory holding one)."""
    with open(find_results(path), encoding="utf-8") as f:
        data = json.load(f)
    return data["model"], {n: b["metrics"]["accuracy"] for n, b in data["benchmarks"].items()}


def compare(path_a: str, path_b: str) -> str:
    """Two evaluated runs side by side in the paper's table, with a row of B - A."""
    name_a, acc_a = load_accuracies(path_a)
    name_b, acc_b = load_accuracies(path_b)
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    va, vb = table_values(acc_a), table_values(acc_b)
    diff = [None if a is None or b is None else b - a for a, b in zip(va, vb)]
    rows = [[name_a] + [_cell(v) for v in va], [name_b] + [_cell(v) for v in vb],
            ["B - A"] + [_cell(v, signed=True) for v in diff]]
    text = _markdown(COLUMNS, rows)
    other = render_other_table([(name_a, acc_a), (name_b, acc_b)])
    if other:
        text += "\n" + other
    return text
