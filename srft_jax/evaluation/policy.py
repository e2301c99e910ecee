"""The model-backed policy for the evaluation harness, model loading, and in-training eval.

Dims: B = prompts per sampler call (padded to a power of two, then so that B*G rows split
evenly over the mesh's batch shards), P = prompt width (the sampler rounds it up to its
prompt bucket), G = samples per prompt, R = response width (<= max_new_tokens). Sampler rows
are prompt-major: row b*G+g is sample g of prompt b.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from srft_jax import distributed
from srft_jax.batch import left_pad
from srft_jax.data.eval_sets import EvalItem
from srft_jax.data.tokenizer import decode_response, load_tokenizer, stop_token_ids
from srft_jax.evaluation.harness import Completion, EvalProtocol, Sampling, evaluate
from srft_jax.evaluation.report import averages
from srft_jax.sampler import Sampler, SamplerConfig

log = logging.getLogger(__name__)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def padded_prompt_count(num_prompts: int, num_samples: int, shards: int) -> int:
    """B: a power of two >= ``num_prompts``, rounded up so that B * G rows divide evenly
    over ``shards`` (otherwise the sampler would replicate the rows on every shard)."""
    step = shards // math.gcd(shards, num_samples)
    return -(-_next_pow2(num_prompts) // step) * step



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
        b = padded_prompt_count(len(prompts), num_samples, distributed.batch_shards(self.mesh))
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


# Tokenizers saved from a plain `tokenizers` object (the synthetic task's, test doubles).
def load_model_for_eval(path: str, mesh) -> tuple[Any, Any, dict[str, str]]:
    """(model, tokenizer, prompt template fields) from an HF directory or a training run.

    A training run directory (it has ``checkpoints/``) gives its latest checkpoint, its
    saved tokenizer and the prompt it trained with (system prompt, user template, think
    prefix from its config.yaml); an HF directory gives its weights and tokenizer and an
    empty template (the paper's prompt).
    """
    import dataclasses

    from srft_jax.models.weights import load_pretrained

    if os.path.isdir(os.path.join(path, "checkpoints")):
        from srft_jax import train
        from srft_jax.config import load_config

        cfg = load_config(os.path.join(path, "config.yaml"))
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, path=path))
        tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
        with jax.set_mesh(mesh):
            model = train.init_model(cfg, train.model_config_for(cfg, len(tokenizer)), mesh)
        template = {"system_prompt": cfg.data.system_prompt, "user_template": cfg.data.user_template,
                    "think_prefix": cfg.data.think_prefix}
        return model, tokenizer, template
    tokenizer = load_tokenizer(path)
    with jax.set_mesh(mesh):
        model, _ = load_pretrained(path, mesh=mesh)
    return model, tokenizer, {}


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
