"""Token-probability analysis (SRFT paper, Section 3): which tokens fine-tuning moved.

    srft-jax analyze --base runs/base --models runs/sft,runs/grpo,runs/srft \\
        --data responses.jsonl --out runs/analysis

Dims: N responses, P prompt width, R response width (both padded to power-of-two buckets).

On a fixed set of responses (rows in the training layout: the prompt, and ``target`` = the
response to score, e.g. held-out demonstrations and the base model's own rollouts), every
model scores each response token y_t: ``p(y_t | x, y_<t)`` and the entropy of its
next-token distribution (temperature 1, the training prompt). Against the base model, per
tuned model: ``delta[t] = p_model(y_t) - p_base(y_t)``; the paper's reading is that SFT
moves the probabilities of many tokens (coarse, global) and RL of few (fine, selective).

``summary.json``: ``{"threshold": thr, "base": name, "models": {name: {...}}}`` with, per
model, over all scored tokens:

  tokens                 number of response tokens scored
  mean_abs_prob_change   mean |delta|
  mean_prob_change       mean delta (signed)
  frac_tokens_changed    fraction with |delta| > thr
  frac_increased / frac_decreased   fractions with delta > thr / delta < -thr
  mean_entropy / base_mean_entropy  mean entropy of the model / of the base on these tokens
  changed_entropy / changed_base_entropy  the same on the changed tokens only
  by_source              these figures per row ``data_source`` (e.g. demos vs rollouts)
  by_kind                per token kind (number, symbol, word, special): tokens, fraction
                         changed, mean |delta|
  by_position            fraction changed per tenth of the response (relative position)
  top_changed_tokens     the tokens that change most often: [[token, count], ...]
  histogram              counts of delta in ``HIST_EDGES`` bins

A model compared with itself gives delta = 0 exactly (the same program on the same inputs).
Plots: ``analysis.png`` (delta histogram, changes by position, by token kind, entropy).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import types
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from srft_jax.data.prompts import PromptTemplate
from srft_jax.data.training import Example, load_training_examples
from srft_jax.shapes import bucket_length, default_buckets, left_pad, right_pad

log = logging.getLogger(__name__)

HIST_EDGES = tuple(np.round(np.linspace(-1.0, 1.0, 41), 3).tolist())
POSITION_BINS = 10
KINDS = ("number", "symbol", "word", "special")
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class TokenScores:
    """Per-token figures of one model over the response set, flattened in one fixed order.

    prob, entropy: float32[n]; the order is (response, position) for the real tokens only.
    """

    prob: np.ndarray
    entropy: np.ndarray


@dataclasses.dataclass
class ResponseSet:
    """The responses to score and, per token (flattened like `TokenScores`), what it is."""

    examples: list[Example]
    token_ids: np.ndarray   # int32[n]
    position: np.ndarray    # float32[n], t / len in [0, 1)
    source: np.ndarray      # object[n], the row's data_source


def load_responses(path: str, tokenizer: Any, template: PromptTemplate, max_prompt_len: int,
                   max_response_len: int, limit: Optional[int] = None) -> ResponseSet:
    """Rows of `path` (training layout) tokenised with the model's prompt `template`
    (`PromptTemplate`, as `srft_jax.runs.load_model` returns it)."""
    examples, stats = load_training_examples(path, tokenizer, max_prompt_len, max_response_len,
                                             max_rows=limit, template=template)
    log.info("responses: %s", stats.summary())
    ids, pos, src = [], [], []
    for e in examples:
        n = len(e.demo_ids)
        ids += list(e.demo_ids)
        pos += [t / n for t in range(n)]
        src += [e.data_source] * n
    return ResponseSet(examples, np.asarray(ids, np.int32), np.asarray(pos, np.float32),
                       np.asarray(src, dtype=object))


@functools.partial(jax.jit, static_argnums=(0, 6))
def _score(graphdef, state, prompt_tokens, prompt_mask, response_tokens, response_mask, chunk_size):
    """(prob [N,R], entropy [N,R]) of the response tokens (never holds [N,R,V] at once)."""
    from srft_jax.train_step import response_logprobs

    batch = types.SimpleNamespace(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
                                  response_tokens=response_tokens, response_mask=response_mask)
    lp, ent = response_logprobs(nnx.merge(graphdef, state), batch, chunk_size)
    return jnp.exp(lp), ent


def score_responses(model, responses: ResponseSet, pad_id: int, batch_size: int = 64,
                    chunk_size: int = 1024) -> TokenScores:
    """Token probabilities and entropies of `model` on every response token. Batches hold
    `batch_size` responses (the last one padded with copies), widths padded to buckets."""
    examples = responses.examples
    p_buckets = default_buckets(max(len(e.prompt_ids) for e in examples))
    r_buckets = default_buckets(max(len(e.demo_ids) for e in examples))
    rows_per_call = min(batch_size, len(examples))
    graphdef, state = nnx.split(model)
    probs, ents = [], []
    for start in range(0, len(examples), rows_per_call):
        real = examples[start:start + rows_per_call]
        chunk = real + [real[0]] * (rows_per_call - len(real))
        p_width = bucket_length(max(len(e.prompt_ids) for e in chunk), p_buckets)
        r_width = bucket_length(max(len(e.demo_ids) for e in chunk), r_buckets)
        pt, pm = left_pad([e.prompt_ids for e in chunk], p_width, pad_id)
        rt, rm = right_pad([e.demo_ids for e in chunk], r_width, pad_id)
        prob, ent = jax.device_get(_score(graphdef, state, pt, pm, rt, rm, chunk_size))
        for i, e in enumerate(real):
            probs.append(prob[i, :len(e.demo_ids)])
            ents.append(ent[i, :len(e.demo_ids)])
    return TokenScores(np.concatenate(probs).astype(np.float32), np.concatenate(ents).astype(np.float32))


def token_kind(token: str, special: set) -> str:
    """'special' (special / added markup tokens), 'number' (digits), 'symbol' (no letter or
    digit) or 'word'; sub-word prefixes (``##``, ``Ġ``, ``▁``) are ignored."""
    if token in special:
        return "special"
    core = re.sub(r"^(##|Ġ|▁)", "", token)
    if core.isdigit():
        return "number"
    if core and not any(c.isalnum() for c in core):
        return "symbol"
    return "word"


def token_kinds(tokenizer: Any, token_ids: np.ndarray) -> np.ndarray:
    """The kind of every token id (object[n])."""
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values()}
    cache: dict[int, str] = {}
    out = []
    for i in token_ids.tolist():
        if i not in cache:
            cache[i] = token_kind(tokenizer.convert_ids_to_tokens(i), special)
        out.append(cache[i])
    return np.asarray(out, dtype=object)


def _figures(delta: np.ndarray, ent: np.ndarray, base_ent: np.ndarray, thr: float) -> dict:
    changed = np.abs(delta) > thr
    n = int(delta.size)
    mean = lambda x: float(np.mean(x)) if x.size else 0.0  # noqa: E731
    return {
        "tokens": n,
        "mean_abs_prob_change": mean(np.abs(delta)),
        "mean_prob_change": mean(delta),
        "frac_tokens_changed": mean(changed.astype(np.float64)),
        "frac_increased": mean((delta > thr).astype(np.float64)),
        "frac_decreased": mean((delta < -thr).astype(np.float64)),
        "mean_entropy": mean(ent),
        "base_mean_entropy": mean(base_ent),
        "changed_entropy": mean(ent[changed]),
        "changed_base_entropy": mean(base_ent[changed]),
    }


def compare(base: TokenScores, model: TokenScores, responses: ResponseSet, kinds: np.ndarray,
            tokenizer: Any, threshold: float = 0.1) -> dict:
    """The summary figures of `model` against `base` (see the module docstring)."""
    delta = model.prob.astype(np.float64) - base.prob.astype(np.float64)
    out = _figures(delta, model.entropy, base.entropy, threshold)
    changed = np.abs(delta) > threshold
    out["by_source"] = {
        s: _figures(delta[responses.source == s], model.entropy[responses.source == s],
                    base.entropy[responses.source == s], threshold)
        for s in sorted(set(responses.source.tolist()))}
    out["by_kind"] = {}
    for k in KINDS:
        sel = kinds == k
        if sel.any():
            out["by_kind"][k] = {"tokens": int(sel.sum()),
                                 "frac_tokens_changed": float(changed[sel].mean()),
                                 "mean_abs_prob_change": float(np.abs(delta[sel]).mean())}
    bins = np.minimum((responses.position * POSITION_BINS).astype(int), POSITION_BINS - 1)
    out["by_position"] = [float(changed[bins == b].mean()) if (bins == b).any() else 0.0
                          for b in range(POSITION_BINS)]
    ids, counts = np.unique(responses.token_ids[changed], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:10]
    out["top_changed_tokens"] = [[tokenizer.convert_ids_to_tokens(int(ids[i])), int(counts[i])]
                                 for i in order]
    out["histogram"] = np.histogram(np.clip(delta, -1.0, 1.0), bins=np.asarray(HIST_EDGES))[0].tolist()
    out["_delta"] = delta  # for the plots; removed before writing
    return out


def analyze(base_path: str, model_paths: Sequence[str], data_path: str, out_dir: str, *,
            names: Optional[Sequence[str]] = None, threshold: float = 0.1, mesh=None,
            max_prompt_len: int = 4096, max_response_len: int = 8192, limit: Optional[int] = None,
            batch_size: int = 64) -> dict:
    """Scores the responses of `data_path` under the base and every model; writes
    `summary.json` and `analysis.png` to `out_dir` and returns the summary.

    Models are HF directories or training run directories (`srft_jax.runs.load_model`); the
    prompt template and tokenizer are the base model's (every model must share its tokenizer).
    """
    from srft_jax import mesh as mesh_lib
    from srft_jax.runs import load_model

    if not model_paths:
        raise ValueError("analyze: --models names no model")
    names = list(names) if names else [_name(p) for p in model_paths]
    if len(names) != len(model_paths) or len(set(names)) != len(names):
        raise ValueError(f"analyze: model names {names} must be unique, one per model")
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(mesh_lib.MeshConfig())
    base_model, tokenizer, template = load_model(base_path, mesh)
    responses = load_responses(data_path, tokenizer, template, max_prompt_len, max_response_len, limit)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with jax.set_mesh(mesh):
        base = score_responses(base_model, responses, pad_id, batch_size)
        kinds = token_kinds(tokenizer, responses.token_ids)
        models = {}
        for name, path in zip(names, model_paths):
            model, _, _ = load_model(path, mesh)
            models[name] = compare(base, score_responses(model, responses, pad_id, batch_size),
                                   responses, kinds, tokenizer, threshold)
    os.makedirs(out_dir, exist_ok=True)
    deltas = {name: m.pop("_delta") for name, m in models.items()}
    summary = {"base": _name(base_path), "data": data_path, "threshold": threshold,
               "responses": len(responses.examples), "histogram_edges": list(HIST_EDGES),
               "position_bins": POSITION_BINS, "models": models}
    with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    plot_analysis(summary, deltas, os.path.join(out_dir, "analysis.png"))
    return summary


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


def plot_analysis(summary: dict, deltas: dict[str, np.ndarray], path: str) -> str:
    """One PNG, four panels: |delta| histogram, changes by position, by token kind, entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    thr = summary["threshold"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    bins = np.linspace(-1, 1, 81)
    for name, d in deltas.items():
        ax.hist(d, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({100 * models[name]['frac_tokens_changed']:.1f}% > {thr})")
    ax.set_yscale("log")
    ax.set_title("Token probability change vs base")
    ax.set_xlabel("p_model(y_t) - p_base(y_t)")
    ax.legend(fontsize=8)
    ax = axes[1]
    x = (np.arange(summary["position_bins"]) + 0.5) / summary["position_bins"]
    for name, m in models.items():
        ax.plot(x, m["by_position"], marker="o", label=name)
    ax.set_title(f"Fraction of tokens with |change| > {thr}, by position")
    ax.set_xlabel("relative position in the response")
    ax.legend(fontsize=8)
    ax = axes[2]
    kinds = [k for k in KINDS if any(k in m["by_kind"] for m in models.values())]
    width = 0.8 / max(len(models), 1)
    for i, (name, m) in enumerate(models.items()):
        vals = [m["by_kind"].get(k, {}).get("frac_tokens_changed", 0.0) for k in kinds]
        ax.bar(np.arange(len(kinds)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(kinds)) + width * (len(models) - 1) / 2, kinds)
    ax.set_title(f"Fraction changed (> {thr}), by token kind")
    ax.legend(fontsize=8)
    ax = axes[3]
    names = list(models)
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [models[n]["base_mean_entropy"] for n in names], 0.4, label="base, all tokens")
    ax.bar(xs + 0.2, [models[n]["mean_entropy"] for n in names], 0.4, label="tuned, all tokens")
    ax.plot(xs - 0.2, [models[n]["changed_base_entropy"] for n in names], "k^", label="base, changed tokens")
    ax.plot(xs + 0.2, [models[n]["changed_entropy"] for n in names], "kv", label="tuned, changed tokens")
    ax.set_xticks(xs, names)
    ax.set_title("Mean token entropy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
