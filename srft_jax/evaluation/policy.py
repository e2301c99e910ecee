"""The model-backed policy for the evaluation harness, model loading, and in-training eval.

Dims: B = prompts per sampler call (padded to a power of two, then so that B*G rows split
evenly over the mesh's batch shards), P = prompt width (the sampler rounds it up to its
prompt bucket), G = samples per prompt, R = response width (<= max_new_tokens). Sampler rows
are prompt-major: row b*G+g is sample g of prompt b.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import jax
import numpy as np

from srft_jax import distributed
from srft_jax.data.eval_sets import EvalItem
from srft_jax.data.tokenizer import decode_response, stop_token_ids
from srft_jax.evaluation.harness import Completion, EvalProtocol, Sampling, evaluate
from srft_jax.evaluation.report import averages
from srft_jax.sampler import Sampler, SamplerConfig
from srft_jax.shapes import left_pad, padded_count

log = logging.getLogger(__name__)


class ModelPolicy:
    """Samples with the project's :class:`~srft_jax.sampler.Sampler` on ``mesh``.

    Each prompt's seed becomes its ``prompt_ids`` entry, from which the sampler derives the
    random stream of each of its rows, so an item's draws do not depend on its batch.
    Prompt counts are bucketed (powers of two) so a long evaluation compiles a handful of
    shapes; padding prompts repeat the first prompt and their samples are dropped. Pass the
    training loop's ``sampler`` to reuse its compiled programs.
    """

    def __init__(self, model: Any, tokenizer: Any, mesh, sampler: Optional[Sampler] = None,
                 sampler_config: Optional[SamplerConfig] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        if sampler is None:
            sampler = Sampler(sampler_config or SamplerConfig(), self.stop_ids, self.pad_id)
        self.sampler = sampler

    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, seeds: Sequence[int],
                 sampling: Sampling) -> list[list[Completion]]:
        if not prompts:
            return []
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        b = padded_count(len(prompts), num_samples, distributed.batch_shards(self.mesh))
        pad = b - len(prompts)
        padded = list(prompts) + [prompts[0]] * pad
        ids = np.asarray(list(seeds) + [0] * pad, np.int64).astype(np.int32)  # [B]
        # Several processes: each samples its share of the prompts in one global sampler call,
        # then every process receives all rows (the harness scores and reports on each).
        shard = self._shard()
        mine = distributed.host_shard(range(b), shard.index, shard.count, equal=False)
        tokens, mask = left_pad([padded[i] for i in mine], max(len(p) for p in prompts), self.pad_id)
        out = self.sampler.generate(
            self.model, tokens, mask, num_samples=num_samples, rng=0, prompt_ids=ids[mine],
            temperature=sampling.temperature, top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens, mesh=self.mesh)
        out_tokens, out_lengths, out_stopped = self._all_rows(out, b, num_samples, shard)
        results = []
        for i in range(len(prompts)):
            samples = []
            for g in range(num_samples):
                row = i * num_samples + g
                n = int(out_lengths[row])
                text = decode_response(self.tokenizer, out_tokens[row, :n], self.stop_ids)
                samples.append(Completion(text, n, truncated=not bool(out_stopped[row])))
            results.append(samples)
        return results

    def _shard(self) -> distributed.DataShard:
        if jax.process_count() == 1:
            return distributed.DataShard(0, 1)
        return distributed.data_shard(self.mesh)

    def _all_rows(self, out, b: int, g: int, shard: distributed.DataShard):
        """(tokens [B*G,R], lengths [B*G], finished_by_stop [B*G]) of every prompt, from this
        process's rows of `out` and (several processes) the other processes' rows."""
        if jax.process_count() == 1:
            return out.tokens, out.lengths, out.finished_by_stop
        per = -(-b // shard.count) * g  # rows of the largest share
        r = out.tokens.shape[1]
        local = np.zeros((per, r + 2), np.int32)  # rows past this process's share stay unused
        n = out.tokens.shape[0]
        local[:n] = np.concatenate([out.tokens, out.lengths[:, None], out.finished_by_stop[:, None]],
                                   axis=1)
        gathered = distributed.all_gather(local)  # [processes, per, R + 2]
        full = np.zeros((b * g, r + 2), np.int32)
        for process in range(jax.process_count()):
            theirs = distributed.data_shard(self.mesh, process).index
            prompts = distributed.host_shard(range(b), theirs, shard.count, equal=False)
            rows = [i * g + k for i in prompts for k in range(g)]
            full[rows] = gathered[process, :len(rows)]
        return full[:, :r], full[:, r], full[:, r + 1].astype(bool)


def evaluate_during_training(model: Any, tokenizer: Any, benchmarks: dict[str, Sequence[EvalItem]],
                             protocol: EvalProtocol, mesh, seed: int, *,
                             sampler: Optional[Sampler] = None, pool=None) -> dict[str, float]:
    """Accuracy on (a subset of) benchmarks, as metrics for the training log.

    Returns ``eval/<benchmark>/accuracy`` (avg@n), ``eval/<benchmark>/pass@k`` and
    ``maj@n`` for every benchmark, ``eval/<benchmark>/response_length``, and
    ``eval/math_avg`` / ``eval/ood_avg`` when the paper's benchmarks are present. Nothing
    is written to disk. ``seed`` replaces ``protocol.seed`` (pass one per step); reuse the
    loop's ``sampler`` and reward ``pool`` to avoid recompiling and restarting workers.
    """
    import dataclasses

    protocol = dataclasses.replace(protocol, seed=seed)
    policy = ModelPolicy(model, tokenizer, mesh, sampler=sampler)
    results = evaluate(policy, dict(benchmarks), tokenizer, None, protocol, pool=pool,
                       progress=False)
    metrics: dict[str, float] = {}
    for name, bench in results.benchmarks.items():
        for key, value in bench.metrics.items():
            metrics[f"eval/{name}/{key}"] = float(value)
        metrics[f"eval/{name}/response_length"] = float(bench.mean_length)
        metrics[f"eval/{name}/truncated"] = float(bench.truncated)
    for key, value in averages(results.accuracies()).items():
        if value is not None:
            metrics[f"eval/{'math_avg' if key == 'avg' else key}"] = float(value)
    return metrics


def evaluate_model(model_path: str, benchmarks: Sequence[str], protocol_for, *, data_dir=None,
                   limit: Optional[int] = None, out: Optional[str] = None, name: Optional[str] = None,
                   mesh_config=None, progress: bool = True):
    """`srft-jax eval`: a model (HF directory or run directory) on named benchmarks.

    ``protocol_for(template)`` builds the `EvalProtocol` from the model's prompt template (a
    run directory's own, else the paper's). Results (per-item cache, results.json, table.md)
    go to ``out`` (default ``<model>/eval``); returns ``(EvalResults, out)``. Every process of
    a multi-host job calls it; process 0 writes.
    """
    import os

    from srft_jax import mesh as mesh_lib, runs
    from srft_jax.evaluation.harness import load_benchmarks

    mesh = mesh_lib.make_mesh(distributed.initialize(mesh_config or mesh_lib.MeshConfig()))
    model, tokenizer, template = runs.load_model(model_path, mesh)
    items = load_benchmarks(list(benchmarks), data_dir, limit)
    out = out or os.path.join(model_path, "eval")
    name = name or os.path.basename(os.path.normpath(model_path))
    results = evaluate(ModelPolicy(model, tokenizer, mesh), items, tokenizer, out, protocol_for(template),
                       model_name=name, write=jax.process_index() == 0, progress=progress)
    return results, out
