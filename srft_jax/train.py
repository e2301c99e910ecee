"""The SRFT training loop, as the paper's algorithm box (srft-method.md; design.md section 1).

    srft-jax train --config configs/demo.yaml [key=value ...]

    run = setup_run(cfg)                       # mesh, tokenizer, data, sampler, reward pool, writers
    state = init_or_restore(run)               # parameters, optimiser state, step, data position
    for step in range(state.step + 1, cfg.train.steps + 1):
        prompts = next_prompts(run)                             # this process's share of the step
        rollouts = sample_rollouts(run, state, prompts, step)   # G rollouts per prompt
        scored = score(run, prompts, rollouts)                  # verified rewards, demos included
        minibatches = assemble(run, prompts, rollouts, scored)  # mixed batch, group advantages
        state, metrics = update(run, state, minibatches)        # the jitted train step (Eq. 13)
        metrics |= evaluate(run, state, step)                   # held-out split and benchmarks
        save_and_log(run, state, step, metrics)                 # checkpoint, metrics.jsonl, progress
    finish(run, state)                                          # HF export and plots

Each phase is a function of typed values (`Run`, `TrainState`, `StepPrompts`, `Rollouts`,
`Scores`, `MiniBatches`) that a test can call on its own; `train(cfg)` is exactly the box
above (plus the phase timers). The sampler reads the same parameters the update writes: there
is no second engine and no weight copy. A run restarted with the same command continues from its
latest complete checkpoint exactly as if it had not stopped.

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
from jax.sharding import NamedSharding

from srft_jax import distributed, mesh as mesh_lib, runs
from srft_jax.batch import MixedBatch, build_mixed_batch, to_micro_batches
from srft_jax.checkpoint import Checkpointer
from srft_jax.config import Config, to_yaml
from srft_jax.data.eval_sets import EvalItem
from srft_jax.data.iterator import PromptIterator
from srft_jax.data.tokenizer import decode_response, stop_token_ids
from srft_jax.data.training import Example, load_training_examples_from_config
from srft_jax.evaluation.harness import EvalProtocol, load_benchmarks
from srft_jax.evaluation.policy import evaluate_during_training
from srft_jax.losses import SRFTLossConfig
from srft_jax.faults import RunError, RunWriteError
from srft_jax.metrics import MetricsWriter, Progress
from srft_jax.models.lora import describe as describe_lora, split_params
from srft_jax.preemption import StopSignals
from srft_jax.rewards import PoolStats, RewardPool
from srft_jax.sampler import Sampler
from srft_jax.shapes import bucket_length, left_pad
from srft_jax.train_step import (
    jit_train_step,
    make_logprob_fn,
    make_optimizer,
    make_schedule,
    make_train_step,
    opt_state_shardings,
    param_shardings,
)

log = logging.getLogger(__name__)

HELDOUT = "heldout"  # the held-out split's name among the evaluation sets
PEFT_DIR = "peft"  # RUN_DIR/peft: a LoRA run's adapters as a PEFT adapter directory


# ---- the values that flow between phases ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How a step's rows split into updates and micro-batches (fixed for a run).

    Every update trains on `prompts_per_update` prompts, `group_rows` rows each (the
    rollouts, then the demonstration); this process builds the rows of `local_prompts` of
    them, padded to `local_rows`, a multiple of its share `local_micro` of the `micro_batch`
    rows of one micro-batch.
    """

    rollouts: int  # G rollouts per prompt (0 without on-policy RL)
    demos: bool  # a demonstration joins each group
    prompts_per_update: int
    local_prompts: int
    micro_batch: int
    local_micro: int
    local_rows: int

    @property
    def group_rows(self) -> int:
        return self.rollouts + int(self.demos)

    @classmethod
    def of(cls, tcfg, loss: SRFTLossConfig, shard: distributed.DataShard) -> "BatchLayout":
        rollouts = tcfg.rollouts_per_prompt if loss.use_onpolicy_rl else 0
        demos = loss.use_sft or loss.use_demo_rl
        per_update = tcfg.prompts_per_step // tcfg.updates_per_step
        local_prompts = shard.local_size(per_update, "train.prompts_per_step / train.updates_per_step")
        group_rows = rollouts + int(demos)
        if group_rows == 0:
            raise ValueError("the loss uses neither rollouts nor demonstrations (check loss.use_*)")
        micro = min(tcfg.micro_batch_size, per_update * group_rows)
        local_micro = shard.local_size(micro, "train.micro_batch_size (at most the rows of an update)")
        local_rows = -(-(local_prompts * group_rows) // local_micro) * local_micro
        return cls(rollouts, demos, per_update, local_prompts, micro, local_micro, local_rows)


@dataclasses.dataclass
class Run:
    """What a training run sets up once (`setup_run`) and every phase reads."""

    cfg: Config
    mesh: Any
    shard: distributed.DataShard
    tokenizer: Any
    stop_ids: tuple[int, ...]
    pad_id: int
    iterator: PromptIterator
    eval_sets: dict[str, list[EvalItem]]  # "heldout" (the data's eval.split) and benchmarks
    eval_protocol: EvalProtocol
    layout: BatchLayout
    sampler: Sampler
    pool: RewardPool
    checkpointer: Checkpointer
    progress: Progress
    updates: "UpdateFunctions"
    writer: Optional[MetricsWriter] = None  # opened by `init_or_restore`, which knows the step
    demo_rewards: dict[str, float] = dataclasses.field(default_factory=dict)  # verified, never timed out
    compiled: set = dataclasses.field(default_factory=set)  # (P, R) widths of the train step
    lora_base: Optional[dict] = None  # LoRA: the base model's path and fingerprint (checkpoint record)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def close(self, failed: bool = False) -> None:
        """Releases everything; waits for the last checkpoint save. When the run is already
        failing (`failed`), errors of closing are logged, not raised over the original one."""
        for close in (self.progress.close, self.pool.close,
                      self.writer.close if self.writer else None, self.checkpointer.close):
            if close is None:
                continue
            try:
                close()
            except Exception as e:
                if not failed:
                    raise
                log.debug("while stopping after an error: %s", e)


@dataclasses.dataclass
class TrainState:
    """The policy and its optimiser after `step` steps."""

    step: int
    model: nnx.Module  # the live policy: the sampler reads it, `update` writes it
    params: Any  # its trained parameters as a pure dict (the jitted update's input): all of
    # them, or with LoRA only the adapters
    opt_state: Any
    skipped_updates: int = 0  # non-finite updates skipped so far
    frozen: Any = None  # with LoRA: the base parameters (read by the update, never written)


@dataclasses.dataclass(frozen=True)
class StepPrompts:
    """This process's prompts of a step, update by update (`layout.local_prompts` each)."""

    examples: list[Example]
    index: np.ndarray  # int32: their places among the step's prompts (the sampler's prompt ids)
    width: int  # P: the step's prompt bucket (the same on every process)


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """G responses per prompt, prompt-major (row i*G + g is sample g of prompt i)."""

    tokens: list[list[int]]
    old_logprobs: list[np.ndarray]  # the sampler's temperature-1 log-probs of each token
    stopped: np.ndarray  # bool: ended with a stop token (else truncated)
    texts: list[str]  # decoded responses, as the reward reads them


@dataclasses.dataclass(frozen=True)
class Scores:
    rollouts: list[float]  # per rollout row
    demos: list[float]  # per prompt (0 when demonstrations are not used)


@dataclasses.dataclass(frozen=True)
class MiniBatches:
    """One global mixed batch per update, micro-batched [M, b, ...]."""

    batches: list[MixedBatch]
    widths: tuple[int, int]  # (P, R)
    tokens: float  # response tokens trained on, all processes


# ---- set-up ---------------------------------------------------------------------------------
class UpdateFunctions:
    """The jitted update and old-log-prob programs of a run: one `jax.jit` each, with the
    run's shardings; jit compiles one program per (P, R) width pair it meets."""

    def __init__(self, tcfg, loss: SRFTLossConfig, graphdef, abstract_params, mesh, layout: BatchLayout,
                 lora: bool = False):
        self.schedule = make_schedule(tcfg.optim, tcfg.steps, tcfg.updates_per_step)
        self.tx = make_optimizer(tcfg.optim, tcfg.steps, tcfg.updates_per_step)
        self.lora = lora
        frozen_shardings = None
        if lora:  # train the adapters; the base is a separate, frozen argument
            abstract_params, abstract_frozen = split_params(abstract_params)
            frozen_shardings = param_shardings(abstract_frozen, mesh)
        self.param_shardings = param_shardings(abstract_params, mesh)
        self.opt_shardings = opt_state_shardings(self.tx, abstract_params, self.param_shardings, mesh)
        # Micro-batched arrays [M, b, ...]: b over ('data', 'fsdp'); b is fixed for the run.
        spec = mesh_lib.logical_to_spec((None, "batch"), (1, layout.micro_batch), mesh)
        batch_sharding = NamedSharding(mesh, spec)
        step_fn = make_train_step(graphdef, self.tx, loss, chunk_size=tcfg.loss_chunk_size, seed=tcfg.seed)
        self.train_step = jit_train_step(step_fn, self.param_shardings, self.opt_shardings,
                                         batch_sharding, mesh, frozen_shardings)
        extra = () if frozen_shardings is None else (frozen_shardings,)
        self.logprobs = jax.jit(make_logprob_fn(graphdef, chunk_size=tcfg.loss_chunk_size),
                                in_shardings=(self.param_shardings, batch_sharding) + extra)
        self.init_opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)


def setup_run(cfg: Config) -> Run:
    """Mesh, tokenizer, data, sampler, reward pool, checkpointer and metric sinks of a run."""
    runs.check_run_sources(cfg.model, cfg.data.source)  # a bad path fails before anything starts
    cfg = cfg.replace(mesh=distributed.initialize(cfg.mesh))
    run_dir = cfg.train.run_dir
    os.makedirs(run_dir, exist_ok=True)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    log.info("mesh: %s", mesh_lib.describe(mesh))
    shard = distributed.data_shard(mesh)
    layout = BatchLayout.of(cfg.train, cfg.loss, shard)
    # Process 0 writes the run directory's shared files (tokenizer, synthetic data) first.
    tokenizer = _main_first(lambda: runs.load_run_tokenizer(cfg.model, cfg.data.source, run_dir),
                            "tokenizer")
    data = _main_first(lambda: runs.prepare_data(cfg.data, run_dir), "data")
    examples, stats = load_training_examples_from_config(data, tokenizer)
    log.info("training data: %s", stats.summary())
    model_cfg = runs.model_config_for(cfg.model, len(tokenizer))
    if jax.process_index() == 0:
        _write_run_files(cfg, model_cfg, tokenizer, run_dir)
    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: _new_decoder(model_cfg))
        graphdef, abstract_state = nnx.split(abstract)
        updates = UpdateFunctions(cfg.train, cfg.loss, graphdef, nnx.to_pure_dict(abstract_state), mesh, layout,
                                  lora=bool(model_cfg.lora_rank))
    if model_cfg.lora_rank:
        log.info("model: %s", describe_lora(model_cfg))
    return Run(
        cfg=cfg, mesh=mesh, shard=shard, tokenizer=tokenizer, stop_ids=tuple(stop_ids), pad_id=pad_id,
        iterator=PromptIterator(examples, cfg.train.prompts_per_step, seed=cfg.data.seed,
                                shuffle=cfg.data.shuffle),
        eval_sets=_eval_sets(cfg.eval, data, tokenizer),
        eval_protocol=_eval_protocol(cfg.eval, cfg.data, cfg.train.reward_timeout), layout=layout,
        sampler=Sampler(cfg.sampler, stop_ids=stop_ids, pad_id=pad_id),
        pool=RewardPool(num_workers=cfg.train.reward_workers, timeout=cfg.train.reward_timeout),
        checkpointer=Checkpointer(run_dir, keep=cfg.train.keep_checkpoints),
        progress=Progress(cfg.train.steps, enabled=jax.process_index() == 0 and cfg.train.progress_bar),
        updates=updates)


def _new_decoder(model_cfg):
    from srft_jax.models.decoder import Decoder

    return Decoder(model_cfg, rngs=nnx.Rngs(0))


def _write_run_files(cfg: Config, model_cfg, tokenizer, run_dir: str) -> None:
    with open(os.path.join(run_dir, runs.CONFIG_FILE), "w") as f:
        f.write(to_yaml(cfg))
    with open(os.path.join(run_dir, runs.MODEL_CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(model_cfg), f, indent=1)
    if not os.path.isdir(os.path.join(run_dir, runs.TOKENIZER_DIR)):
        tokenizer.save_pretrained(os.path.join(run_dir, runs.TOKENIZER_DIR))


def _eval_sets(ecfg, data, tokenizer) -> dict[str, list[EvalItem]]:
    """The held-out split of the training source (`eval.split`, if it has one) and the
    benchmarks (`eval.benchmarks`), as evaluation items."""
    if not ecfg.every:
        return {}
    sets: dict[str, list[EvalItem]] = {}
    try:
        heldout, _ = load_training_examples_from_config(
            dataclasses.replace(data, split=ecfg.split, max_rows=None), tokenizer)
        heldout = heldout[: ecfg.num_examples or None]
        sets[HELDOUT] = [EvalItem(e.id, e.question, e.ground_truth, None, "math") for e in heldout]
    except (FileNotFoundError, ValueError) as e:
        log.warning("no held-out split %r in %s (%s): held-out accuracy is not logged",
                    ecfg.split, data.source, e)
    if ecfg.benchmarks:
        sets.update(load_benchmarks(list(ecfg.benchmarks), ecfg.benchmark_dir, ecfg.benchmark_limit or None))
    return sets


def _eval_protocol(ecfg, data, reward_timeout: float) -> EvalProtocol:
    return EvalProtocol(temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens or data.max_response_len,
                        default_samples=ecfg.samples, samples=(), batch_size=ecfg.batch_size,
                        template=data.template, reward_timeout=reward_timeout)


def init_or_restore(run: Run) -> TrainState:
    """The policy and optimiser state: from the newest checkpoint of the run directory that
    restores (damaged ones are moved aside), data position and counters included; else from
    `model` (random, HF, or a run). Opens the metrics log as it was at that step."""
    cfg = run.cfg
    with jax.set_mesh(run.mesh):
        model_cfg = runs.model_config_for(cfg.model, len(run.tokenizer))
        model = runs.init_model(cfg.model, model_cfg, run.mesh, seed=cfg.train.seed)
        params, frozen = nnx.to_pure_dict(nnx.state(model)), None
        if run.updates.lora:  # checkpoints hold the adapters (+ their optimiser state) only
            params, frozen = split_params(params)
            run.lora_base = runs.lora_base_record(cfg.model, frozen)
        opt_state = run.updates.init_opt_state(params)
        restored = run.checkpointer.restore_latest(params, opt_state, meta_keys=("data",))
    if restored is None:
        state, meta = TrainState(0, model, params, opt_state, frozen=frozen), {}
    else:
        meta = restored.meta
        if run.updates.lora:
            runs.check_lora_base(meta, run.lora_base, f"checkpoint step {restored.step} of {run.checkpointer.directory}")
        nnx.update(model, restored.params)
        run.iterator.load_state_dict(meta["data"])
        state = TrainState(restored.step, model, restored.params, restored.opt_state,
                           int(meta.get("skipped_updates", 0)), frozen)
        run.progress.advance_to(restored.step)
        log.info("resumed from %s at step %d", run.checkpointer.directory, restored.step)
    # The log as it was at that step (its own record included); without a checkpoint, empty.
    run.writer = MetricsWriter(cfg.train.run_dir, start_step=state.step, last_record=meta.get("metrics"),
                               enabled=run.is_main, tensorboard=cfg.train.tensorboard,
                               wandb_project=cfg.train.wandb_project)
    return state


# ---- one step -------------------------------------------------------------------------------
def next_prompts(run: Run) -> StepPrompts:
    """The step's prompts (the same on every process), and this process's share of them."""
    step_prompts = run.iterator.next_batch()
    index = local_prompt_indices(len(step_prompts), run.cfg.train.updates_per_step, run.shard)
    width = bucket_length(max(len(e.prompt_ids) for e in step_prompts), run.cfg.data.prompt_widths,
                          "data.prompt_buckets")
    return StepPrompts([step_prompts[i] for i in index], index, width)


def sample_rollouts(run: Run, state: TrainState, prompts: StepPrompts, step: int) -> Rollouts:
    """`layout.rollouts` samples per prompt from the current policy, with the `sampler`
    section's settings: one sampler call for the step's prompts (`sampler.decode_slots` bounds
    the rows decoded at once, and so the KV-cache memory)."""
    g = run.layout.rollouts
    if not g:
        return Rollouts([], [], np.zeros(0, bool), [])
    p_tok, p_mask = left_pad([e.prompt_ids for e in prompts.examples], prompts.width, run.pad_id)
    out = run.sampler.generate(state.model, p_tok, p_mask, num_samples=g,
                               seed=_step_seed(run.cfg.train.seed, step),
                               prompt_ids=prompts.index, mesh=run.mesh)
    tokens, old = [], []
    for row in range(out.num_rows):
        n = int(out.lengths[row])
        tokens.append(out.tokens[row, :n].tolist())
        old.append(out.raw_logprobs[row, :n])
    texts = [decode_response(run.tokenizer, ids, run.stop_ids) for ids in tokens]
    return Rollouts(tokens, old, np.asarray(out.finished_by_stop), texts)


def score(run: Run, prompts: StepPrompts, rollouts: Rollouts) -> Scores:
    """Verified rewards of the rollouts and of the demonstrations. A demonstration is scored
    once per run and remembered, unless its scoring timed out (then it is scored again the
    next time its prompt comes up)."""
    g = run.layout.rollouts
    truths = [e.ground_truth for e in prompts.examples for _ in range(g)]
    rollout_scores = run.pool.score(rollouts.texts, truths) if g else []
    demo_scores = [0.0] * len(prompts.examples)
    if run.layout.demos:
        known = {e.id: run.demo_rewards[e.id] for e in prompts.examples if e.id in run.demo_rewards}
        todo = list({e.id: e for e in prompts.examples if e.id not in known}.values())
        if todo:
            texts = [decode_response(run.tokenizer, e.demo_ids, run.stop_ids) for e in todo]
            report = run.pool.score_report(texts, [e.ground_truth for e in todo])
            for e, reward, timed_out in zip(todo, report.rewards, report.timed_out):
                known[e.id] = reward
                if not timed_out:
                    run.demo_rewards[e.id] = reward
        demo_scores = [known[e.id] for e in prompts.examples]
    return Scores(list(rollout_scores), demo_scores)


def assemble(run: Run, prompts: StepPrompts, rollouts: Rollouts, scores: Scores) -> MiniBatches:
    """One mixed batch per update, with group advantages over each augmented group: this
    process builds its rows of each (padded to `layout.local_rows`), joined into global arrays."""
    lay, g = run.layout, run.layout.rollouts
    per_prompt = lambda rows: [rows[i * g:(i + 1) * g] for i in range(len(prompts.examples))]
    demos = [list(e.demo_ids) if lay.demos else None for e in prompts.examples]
    longest = max([len(t) for t in rollouts.tokens] + [len(d or ()) for d in demos] + [1])
    r_width = bucket_length(distributed.process_max(longest), run.cfg.data.response_widths,
                            "data.response_buckets")
    old = None if run.cfg.train.recompute_old_logprobs else per_prompt(rollouts.old_logprobs)
    tokens, rewards = per_prompt(rollouts.tokens), per_prompt(scores.rollouts)
    local = []
    for u in range(run.cfg.train.updates_per_step):
        sl = slice(u * lay.local_prompts, (u + 1) * lay.local_prompts)
        batch = build_mixed_batch(
            [e.prompt_ids for e in prompts.examples[sl]], tokens[sl], rewards[sl], demos[sl],
            scores.demos[sl], prompt_width=prompts.width, response_width=r_width, pad_id=run.pad_id,
            loss_config=run.cfg.loss, rows_multiple=lay.local_rows,
            rollout_old_logprobs=None if old is None else old[sl])
        batch.group = distributed.offset_groups(batch.group, run.shard.index * lay.local_prompts)
        local.append(to_micro_batches(batch, lay.local_micro))
    n_tokens = float(sum(np.sum(m.response_mask) for m in local))
    (n_tokens,) = distributed.shard_sum([n_tokens], run.mesh)
    batches = [distributed.to_global(m, run.mesh, axis=1, shard=run.shard) for m in local]
    return MiniBatches(batches, (prompts.width, r_width), float(n_tokens))


def update(run: Run, state: TrainState, minibatches: MiniBatches) -> tuple[TrainState, dict]:
    """`train.updates_per_step` optimiser updates, one per mini-batch (old log-probs first
    recomputed by the policy that sampled, when `train.recompute_old_logprobs`)."""
    fns = run.updates
    metrics: dict[str, float] = {}
    if minibatches.widths not in run.compiled:
        run.compiled.add(minibatches.widths)
        log.info("compiling the train step for prompt width %d, response width %d, %d rows per "
                 "update in micro-batches of %d", *minibatches.widths,
                 run.layout.local_rows * run.shard.count, run.layout.micro_batch)
        metrics["compile/train_step"] = 1.0
    batches = minibatches.batches
    frozen = () if state.frozen is None else (state.frozen,)
    if run.cfg.train.recompute_old_logprobs and run.layout.rollouts:
        batches = [dataclasses.replace(m, old_logprobs=fns.logprobs(state.params, m, *frozen)) for m in batches]
    params, opt_state, per_update = state.params, state.opt_state, []
    for m in batches:
        params, opt_state, um = fns.train_step(params, opt_state, m, *frozen)
        per_update.append(um)
    per_update = jax.device_get(per_update)
    nnx.update(state.model, params)
    skipped = state.skipped_updates + int(sum(float(um["train/skipped"]) for um in per_update))
    step = state.step + 1
    for k in per_update[0]:
        metrics[k] = float(np.mean([float(um[k]) for um in per_update]))
    applied = step * run.cfg.train.updates_per_step - skipped  # optax counts applied updates
    metrics["train/lr"] = float(fns.schedule(max(applied - 1, 0)))  # the step's last update
    metrics["train/skipped_total"] = skipped
    return TrainState(step, state.model, params, opt_state, skipped, state.frozen), metrics


def rollout_metrics(run: Run, rollouts: Rollouts, scores: Scores, sample_seconds: float,
                    pool_before: PoolStats) -> dict:
    """Rewards, rollout lengths, sampling throughput and reward timeouts of the step (timeouts
    since `pool_before`), over every process's rows."""
    lengths = [len(t) for t in rollouts.tokens]
    timeouts = run.pool.stats.metrics(since=pool_before)
    sums = distributed.shard_sum([sum(scores.rollouts), sum(lengths), float(np.sum(~rollouts.stopped)),
                                  len(lengths), sum(scores.demos), *timeouts.values()], run.mesh)
    reward, length, truncated, count, demo_reward = (float(v) for v in sums[:5])
    metrics = dict(zip(timeouts, (float(v) for v in sums[5:])))
    if run.layout.rollouts:
        metrics.update({"reward/rollout": reward / count, "rollout/length": length / count,
                        "rollout/truncated": truncated / count,
                        "throughput/sample_tokens_per_s": length / max(sample_seconds, 1e-9)})
    if run.layout.demos:
        metrics["reward/demo"] = demo_reward / run.cfg.train.prompts_per_step
    return metrics


def evaluate(run: Run, state: TrainState, step: int) -> dict:
    """Every `eval.every` steps (and at the last): accuracy on the held-out split
    (`eval/accuracy`) and the benchmarks (`eval/<benchmark>/accuracy`, ...)."""
    every, last = run.cfg.eval.every, run.cfg.train.steps
    if not run.eval_sets or not every or (step % every and step != last):
        return {}
    metrics = evaluate_during_training(
        state.model, run.tokenizer, run.eval_sets, run.eval_protocol, run.mesh,
        seed=_step_seed(run.cfg.train.seed, step) + 1, sampler=run.sampler, pool=run.pool)
    for name in ("accuracy", "response_length"):  # the held-out split's keys of the metrics log
        if f"eval/{HELDOUT}/{name}" in metrics:
            metrics[f"eval/{name}"] = metrics[f"eval/{HELDOUT}/{name}"]
    if HELDOUT in run.eval_sets:
        metrics["eval/num_examples"] = len(run.eval_sets[HELDOUT])
    return metrics


def save_and_log(run: Run, state: TrainState, metrics: dict, clock: "StepClock", stop: bool) -> None:
    """The step's checkpoint (every `train.checkpoint_every`, at the last step, and when the
    run stops on a signal), then its metrics record with the phase timers (every
    `train.log_every`, at the last step, whenever it evaluated, and when it stops).

    A failed write (checkpoint, metrics, TensorBoard) raises `RunWriteError` naming the path and
    the OS error; with several processes all of them stop at the same step (one small
    all-gather per step tells them whether any process failed)."""
    tcfg, step = run.cfg.train, state.step
    logged = step % tcfg.log_every == 0 or step == tcfg.steps or stop or "eval/accuracy" in metrics
    failure: Optional[RunError] = None
    try:
        run.checkpointer.check()  # a background save that failed since the last step
        if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stop:
            # The record goes into the checkpoint too: a run killed after the checkpoint
            # commits but before the record is written gets it back on resume.
            record = {"step": step, **metrics, **clock.metrics()} if logged else None
            lora = {runs.LORA_META: run.lora_base} if run.lora_base else {}
            run.checkpointer.save(step, state.params, state.opt_state,
                                  {"step": step, "data": run.iterator.state_dict(),
                                   "skipped_updates": state.skipped_updates, "metrics": record, **lora})
        clock.lap("checkpoint")
        metrics = {**metrics, **clock.metrics()}
        if logged:
            run.writer.write(step, metrics)
    except RunWriteError as e:
        failure = e
    if distributed.process_max(int(failure is not None)):
        raise failure or RunWriteError("the run's files", tcfg.run_dir, None,
                                       "another process failed to write; see its log")
    run.progress.update(metrics)


def finish(run: Run, state: TrainState) -> tuple[Optional[str], list]:
    """The HF export (every process joins the gather; process 0 writes) and the plots."""
    export_dir, plots = None, []
    if run.cfg.train.export_hf:
        from srft_jax.models.weights import save_pretrained

        export_dir = os.path.join(run.cfg.train.run_dir, "hf")
        tok = run.tokenizer
        model = state.model
        if run.lora_base:  # the merged model, and the adapters alone as a PEFT directory
            from srft_jax.models.lora import merged_model, save_peft_adapter

            save_peft_adapter(model, os.path.join(run.cfg.train.run_dir, PEFT_DIR), run.cfg.model.path)
            model = merged_model(model, run.mesh)
        save_pretrained(model, export_dir, tokenizer=tok,
                        extra_config={"eos_token_id": list(run.stop_ids), "pad_token_id": run.pad_id,
                                      "bos_token_id": tok.bos_token_id})
    if run.is_main:
        from srft_jax.plot import plot_runs

        plots = plot_runs([run.cfg.train.run_dir], os.path.join(run.cfg.train.run_dir, "plots"))
    return export_dir, plots


# ---- the loop -------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    run_dir: str
    final_step: int
    metrics: dict  # the last step's
    export_dir: Optional[str]
    plots: list
    stopped: bool = False  # by a signal, after a checkpoint of `final_step`


def train(cfg: Config) -> TrainResult:
    """Runs (or continues) the training run of `cfg`: the algorithm box of the module docstring.

    SIGTERM or a first Ctrl-C stops the run after the step in progress, with a checkpoint of
    it (`TrainResult.stopped`; every process stops at the same step); a second Ctrl-C exits at
    once. Rerunning the same command continues from the latest checkpoint."""
    run = setup_run(cfg)
    metrics: dict = {}
    stopped = False
    with jax.set_mesh(run.mesh), StopSignals() as signals:
        try:
            state = init_or_restore(run)
            for step in range(state.step + 1, cfg.train.steps + 1):
                clock = StepClock()
                before = run.pool.snapshot()
                prompts = next_prompts(run)
                rollouts = sample_rollouts(run, state, prompts, step)
                clock.lap("sample")
                scores = score(run, prompts, rollouts)
                clock.lap("score")
                minibatches = assemble(run, prompts, rollouts, scores)
                clock.lap("assemble")
                state, metrics = update(run, state, minibatches)
                clock.lap("update")
                metrics |= evaluate(run, state, step)
                clock.lap("eval")
                metrics |= rollout_metrics(run, rollouts, scores, clock.seconds["sample"], before)
                metrics["throughput/train_tokens_per_s"] = minibatches.tokens / max(clock.seconds["update"], 1e-9)
                stopped = signals.should_stop(step)
                save_and_log(run, state, metrics, clock, stop=stopped)
                if stopped:
                    break
        except BaseException:
            run.close(failed=True)
            raise
        run.close()
        if stopped:
            if run.is_main:
                print(signals.summary(state.step, os.path.join(run.checkpointer.directory, str(state.step))),
                      flush=True)
            return TrainResult(cfg.train.run_dir, state.step, metrics, None, [], stopped=True)
        export_dir, plots = finish(run, state)
    return TrainResult(cfg.train.run_dir, state.step, metrics, export_dir, plots)


class StepClock:
    """Contiguous phase timers: `lap(name)` closes the phase that ran since the previous lap,
    so `time/<phase>_s` add up to `time/step_s`."""

    def __init__(self):
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def metrics(self) -> dict[str, float]:
        out = {f"time/{phase}_s": s for phase, s in self.seconds.items()}
        out["time/step_s"] = sum(self.seconds.values())
        return out


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
