"""The paper's Table 2, its ablation, its training dynamics (Fig. 6) and its token analysis
(Section 3), in miniature, from a pretrained base, on a CPU.

    python benchmarks/mini_table2.py --out runs/mini_table2              # full run, 3 seeds
    python benchmarks/mini_table2.py --out runs/mini_quick --quick       # 1 seed, the full run's LRs
    python benchmarks/mini_table2.py --out /tmp/mini_smoke --smoke       # machinery check (CI)

1. World and base (`srft_jax.data.mini_world`, cached in `--cache`, reused by every method
   and every later invocation with the same settings): a small decoder is SFT-trained on
   the pretraining mixture (one-step problems and 1% two-step ones) into the base model.
2. Fine-tuning, every method from the base's parameters with the same budget (steps,
   prompts per step, rollouts per prompt, demonstrations seen; `Budget`): `sft`, `grpo`,
   `sft_grpo` (SFT for half the steps, then GRPO for the other half from its checkpoint:
   two runs of the same code), `luffy`, `srft_paper`, `srft_official`, and the paper's
   ablations `srft_fixed_wsft` (w_sft = 1) and `srft_fixed_wrl` (w_rl = 1) of `srft_paper`.
3. Learning rate: every method trains once per value of `Budget.lrs` (seed 0); the value
   with the best validation accuracy (temperature 0.6, avg@k, the `val` split: never a
   test set) is kept, and seeds 1.. train with it. `--quick` skips the search and trains
   one seed at the LRs the full run chose (`FULL_RUN_LRS`).
4. Evaluation with the project's harness (`srft_jax.evaluation.evaluate`) on the in- and
   out-of-distribution sets, greedy and temperature 0.6 with avg@k.
5. Outputs in `--out`: `results.json` (the shape of issue 12), `table.md` (Table 2 layout,
   the ablation, greedy, the LR search, the token analysis), `fig6_dynamics.png` (training
   reward, rollout length and rollout entropy of srft_paper, srft_official, grpo, luffy),
   `analysis/` (`srft-jax analyze` of sft, grpo, srft_paper, srft_official against the
   base), `timings.json`, and `runs/` (every run directory with its metrics and evals).

Everything runs in this process (or `--workers` processes), so compiled programs are
reused; the XLA compilation cache in `--cache` makes later invocations start warm.
Interrupted? Run the same command again: finished runs and evaluations are skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mini_table2_report as report  # noqa: E402

log = logging.getLogger("mini_table2")


# The decoder of the demo (0.4M parameters); prompts and responses fit 24 tokens.
MODEL = dict(preset="tiny", hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=64)
MAX_LEN = 24
TEMPLATE = dict(system_prompt="", think_prefix="<think>")


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every method gets (and the base's pretraining)."""

    steps: int                  # fine-tuning steps (sft_grpo: steps // 2 SFT + the rest GRPO)
    prompts_per_step: int       # prompts per step (each with its one demonstration)
    rollouts_per_prompt: int    # rollouts per prompt for every method that samples
    updates_per_step: int       # optimiser updates per step (equal shares of the prompts)
    lrs: tuple[float, ...]      # the learning-rate search, the same for every method
                                # (empty: FULL_RUN_LRS, the full run's choices)
    seeds: int                  # training seeds (data order and sampling) at the chosen LR
    eval_limit: int             # problems per held-out set
    eval_samples: int           # k of avg@k at temperature 0.6
    pretrain_steps: int
    pretrain_prompts: int       # prompts per pretraining step
    hard_fraction: float        # share of two-step problems in the pretraining mixture
    model: dict = dataclasses.field(default_factory=lambda: dict(MODEL))  # the decoder's sizes


FULL = Budget(steps=50, prompts_per_step=16, rollouts_per_prompt=7, updates_per_step=2,
              lrs=(3e-5, 1e-4, 3e-4, 1e-3), seeds=3, eval_limit=120, eval_samples=4,
              pretrain_steps=150, pretrain_prompts=64, hard_fraction=0.015)
# --quick: one seed, no search; every method at the LR the full run's search chose.
QUICK = dataclasses.replace(FULL, lrs=(), seeds=1)
FULL_RUN_LRS = {"sft": 3e-4, "grpo": 1e-4, "sft_grpo": 1e-4, "luffy": 1e-4, "srft_paper": 3e-4,
                "srft_official": 3e-4, "srft_fixed_wsft": 3e-4, "srft_fixed_wrl": 3e-4}
SMOKE = dataclasses.replace(FULL, steps=2, prompts_per_step=4, rollouts_per_prompt=3, lrs=(3e-4,),
                            seeds=1, eval_limit=4, eval_samples=2, pretrain_steps=2, pretrain_prompts=4,
                            model={**MODEL, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1})

# method -> (loss preset, switches) per stage; sft_grpo has two stages.
METHODS: dict[str, tuple[tuple[str, dict], ...]] = {
    "sft": (("sft", {}),),
    "grpo": (("grpo", {}),),
    "sft_grpo": (("sft", {}), ("grpo", {})),
    "luffy": (("luffy", {}),),
    "srft_paper": (("paper", {}),),
    "srft_official": (("official", {}),),
    "srft_fixed_wsft": (("paper", {"sft_weight_sign": "none", "sft_coef": 1.0}),),
    "srft_fixed_wrl": (("paper", {"rl_weight_sign": "none", "rl_coef": 1.0}),),
}
ANALYSIS_MODELS = ("sft", "grpo", "srft_paper", "srft_official")


# ---- every config key the benchmark sets, in one place --------------------------------------
def config_overrides(run_dir: str, data_dir: str, tokenizer_dir: str, *, loss: dict, steps: int,
                     prompts: int, rollouts: int, updates: int, lr: float, seed: int,
                     init: Optional[str], model: dict, schedule: str = "constant",
                     extra: Sequence[str] = ()) -> list[str]:
    """Dotted overrides of the default config for one training run (port here when config
    keys move). `init`: a run directory to start from (None = random weights of `model`);
    `extra`: more overrides, applied last (e.g. `model.lora.rank=16`)."""
    group = rollouts + (1 if loss["preset"] != "grpo" else 0)
    out = [f"model.tokenizer={tokenizer_dir}", f"data.source={data_dir}",
           f"data.max_prompt_len={MAX_LEN}", f"data.max_response_len={MAX_LEN}",
           f"data.prompt_buckets=[{MAX_LEN}]", f"data.response_buckets=[{MAX_LEN}]",
           f"data.template.system_prompt='{TEMPLATE['system_prompt']}'",
           f"data.template.think_prefix={TEMPLATE['think_prefix']}", f"data.seed={seed}",
           f"train.run_dir={run_dir}", f"train.seed={seed}", f"train.steps={steps}",
           f"train.prompts_per_step={prompts}", f"train.rollouts_per_prompt={rollouts}",
           f"train.updates_per_step={updates}", f"train.micro_batch_size={prompts // updates * group}",
           "sampler.temperature=1.0", f"train.optim.lr={lr}", f"train.optim.schedule={schedule}",
           "train.optim.warmup_steps=0", "train.optim.weight_decay=0.01", "train.optim.grad_clip=1.0",
           f"train.checkpoint_every={steps}", "train.keep_checkpoints=1", "train.export_hf=false",
           "train.tensorboard=false", "train.progress_bar=false", "train.reward_workers=1",
           "eval.every=0"]
    out += [f"model.path={init}"] if init else [f"model.{k}={v}" for k, v in model.items()]
    return out + [f"loss.{k}={v}" for k, v in loss.items()] + list(extra)


# ---- jobs -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Paths:
    world: dict          # set name -> jsonl path (mini_world.write_world)
    tokenizer: str
    base: str            # the base model's run directory
    runs: str            # where fine-tuning runs go


@dataclasses.dataclass(frozen=True)
class Job:
    """One method at one LR and seed: its stage(s), then evaluation on `sets`."""

    method: str
    lr: float
    seed: int
    sets: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"


def run_job(job: Job, paths: Paths, budget: Budget) -> dict:
    """Trains `job` (skipping finished stages), evaluates it; returns its result record."""
    run_dir = os.path.join(paths.runs, job.name)
    record_path = os.path.join(run_dir, "result.json")
    earlier: dict = {}
    if os.path.isfile(record_path):  # e.g. the LR search's run, evaluated on `val` only
        with open(record_path) as f:
            earlier = json.load(f)
        if set(job.sets) <= set(earlier["eval"]):
            return earlier
    stages = METHODS[job.method]
    t0 = time.perf_counter()
    init = paths.base
    stage_dirs = []
    for i, (preset, switches) in enumerate(stages):
        steps = budget.steps // len(stages) if i < len(stages) - 1 else budget.steps - budget.steps // len(stages) * i
        stage_dir = run_dir if len(stages) == 1 else os.path.join(run_dir, f"stage{i + 1}_{preset}")
        train_run(stage_dir, paths.world["train_dir"], paths.tokenizer,
                  loss={"preset": preset, **switches}, steps=steps, budget=budget, lr=job.lr,
                  seed=job.seed, init=init)
        init = stage_dir
        stage_dirs.append(stage_dir)
    t_train = time.perf_counter() - t0 + earlier.get("seconds", {}).get("train", 0.0)
    t1 = time.perf_counter()
    results = evaluate_model(init, paths, budget, job.sets, os.path.join(run_dir, "eval"))
    record = {"method": job.method, "lr": job.lr, "seed": job.seed, "final": init,
              "stages": stage_dirs, "eval": results,
              "seconds": {"train": t_train, "eval": time.perf_counter() - t1
                          + earlier.get("seconds", {}).get("eval", 0.0)}}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def train_run(run_dir: str, data_dir: str, tokenizer_dir: str, *, loss: dict, steps: int,
              budget: Budget, lr: float, seed: int, init: Optional[str], prompts: Optional[int] = None,
              rollouts: Optional[int] = None, schedule: str = "constant",
              extra: Sequence[str] = ()) -> None:
    """One `srft_jax.train.train` run (resumed if it has a checkpoint, skipped if complete)."""
    from srft_jax import train
    from srft_jax.checkpoint import Checkpointer
    from srft_jax.config import load_config

    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        ckpt = Checkpointer(run_dir, async_save=False)
        done = ckpt.latest_step() == steps
        ckpt.close()
        if done:
            return
    rollouts = budget.rollouts_per_prompt if rollouts is None else rollouts
    if loss["preset"] == "sft":
        rollouts = 0
    cfg = load_config(None, config_overrides(
        run_dir, data_dir, tokenizer_dir, loss=loss, steps=steps,
        prompts=prompts or budget.prompts_per_step, rollouts=rollouts,
        updates=budget.updates_per_step, lr=lr, seed=seed, init=init, model=budget.model,
        schedule=schedule, extra=extra))
    log.info("training %s (%s, lr %g, seed %d, %d steps)", run_dir, loss, lr, seed, steps)
    train.train(cfg)


def evaluate_model(model_dir: str, paths: Paths, budget: Budget, sets, out_dir: str) -> dict:
    """{set: {"greedy": acc, "t0.6": avg@k acc}} with the project's harness (cached per item)."""
    from srft_jax import mesh as mesh_lib
    from srft_jax.data.eval_sets import load_benchmark
    from srft_jax.evaluation.harness import EvalProtocol, evaluate
    from srft_jax.evaluation.policy import ModelPolicy
    from srft_jax.runs import load_model
    from srft_jax.rewards import RewardPool

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig())
    model, tokenizer, template = load_model(model_dir, mesh)
    items = {name: load_benchmark("openr1", path=paths.world[name]) for name in sets}
    policy = ModelPolicy(model, tokenizer, mesh)
    out: dict = {name: {} for name in sets}
    with RewardPool(num_workers=1, timeout=10.0) as pool:
        for key, temperature, samples in (("greedy", 0.0, 1), ("t0.6", 0.6, budget.eval_samples)):
            protocol = EvalProtocol(temperature=temperature, max_new_tokens=MAX_LEN,
                                    default_samples=samples, samples=(), batch_size=512, template=template)
            res = evaluate(policy, items, tokenizer, os.path.join(out_dir, key), protocol,
                           model_name=os.path.basename(model_dir), pool=pool, progress=False)
            for name, bench in res.benchmarks.items():
                out[name][key] = bench.metrics["accuracy"]
                out[name][f"{key}_length"] = bench.mean_length
    return out


# ---- world and base -------------------------------------------------------------------------
def prepare(cache: str, budget: Budget) -> tuple[Paths, dict]:
    """The world's data, the tokenizer and the base model, built once per settings hash."""
    from srft_jax.data import mini_world
    from srft_jax.data.synthetic import make_synthetic_tokenizer

    key = {"world": _source_hash(mini_world), "eval_limit": budget.eval_limit, "hard_fraction": budget.hard_fraction,
           "pretrain_steps": budget.pretrain_steps, "pretrain_prompts": budget.pretrain_prompts,
           "model": budget.model}
    root = os.path.join(cache, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])
    world_dir = os.path.join(root, "world")
    marker = os.path.join(world_dir, "paths.json")
    if not os.path.isfile(marker):
        world = mini_world.write_world(world_dir, budget.pretrain_steps * budget.pretrain_prompts,
                                       budget.hard_fraction, budget.eval_limit)
        world["train_dir"] = os.path.dirname(world["train"])
        world["pretrain_dir"] = os.path.dirname(world["pretrain"])
        make_synthetic_tokenizer(os.path.join(root, "tokenizer"))
        with open(marker, "w") as f:
            json.dump(world, f, indent=1)
        with open(os.path.join(root, "settings.json"), "w") as f:
            json.dump(key, f, indent=1)
    with open(marker) as f:
        world = json.load(f)
    paths = Paths(world, os.path.join(root, "tokenizer"), os.path.join(root, "base"), "")
    t0 = time.perf_counter()
    train_run(paths.base, world["pretrain_dir"], paths.tokenizer, loss={"preset": "sft"},
              steps=budget.pretrain_steps, budget=budget, lr=1e-3, seed=0, init=None,
              prompts=budget.pretrain_prompts, rollouts=0, schedule="cosine")
    return paths, {"base_train_s": time.perf_counter() - t0, "cache": root}


def _source_hash(module) -> str:
    """Changes whenever the world's code does (the cached world and base are rebuilt)."""
    from srft_jax.data import synthetic

    text = "".join(open(m.__file__, encoding="utf-8").read() for m in (module, synthetic))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---- the experiment -------------------------------------------------------------------------
def xla_cache(paths: Paths) -> str:
    import jax

    return jax.config.jax_compilation_cache_dir


def run_all(jobs: list, paths: Paths, budget: Budget, workers: int, fn=None) -> list[dict]:
    """`fn(job, paths, budget)` (default `run_job`) of every job, in `workers` processes."""
    fn = fn or run_job
    if workers <= 1:
        return [fn(j, paths, budget) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=setup_process,
                                                initargs=(xla_cache(paths),)) as pool:
        return list(pool.map(fn, jobs, [paths] * len(jobs), [budget] * len(jobs)))


def setup_process(xla_cache: str) -> None:
    """Logging, and JAX's persistent compilation cache (shared by all runs and workers)."""
    import jax

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    jax.config.update("jax_compilation_cache_dir", xla_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="1 seed, no LR search: the LRs the full run's search chose")
    mode.add_argument("--smoke", action="store_true", help="a few steps of everything (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="training seeds at the chosen LR")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the mode's)")
    parser.add_argument("--lrs", default=None, help="comma-separated LR search (default: the mode's)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="steps of the base model's SFT pretraining (default 150: a base right on "
                             "about a fifth of the problems; 300 gives a stronger one)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--cache", default="runs/mini_table2_cache",
                        help="world, base model and XLA compilation cache (reused across runs)")
    parser.add_argument("--workers", type=int, default=1, help="parallel training processes")
    args = parser.parse_args(argv)
    budget = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.seeds is not None:
        budget = dataclasses.replace(budget, seeds=args.seeds)
    if args.steps is not None:
        budget = dataclasses.replace(budget, steps=args.steps)
    if args.lrs is not None:
        budget = dataclasses.replace(budget, lrs=tuple(float(x) for x in args.lrs.split(",")))
    if args.pretrain_steps is not None:
        budget = dataclasses.replace(budget, pretrain_steps=args.pretrain_steps)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or budget.seeds < 1:
        parser.error(f"unknown methods {unknown}" if unknown else "--seeds must be >= 1")
    setup_process(os.path.abspath(os.path.join(args.cache, "xla")))
    t_start = time.perf_counter()
    timings: dict = {"workers": args.workers}
    paths, info = prepare(args.cache, budget)
    timings.update(info)
    paths = dataclasses.replace(paths, runs=os.path.join(args.out, "runs"))
    from srft_jax.data.mini_world import EVAL_SETS

    t0 = time.perf_counter()
    base_eval = evaluate_model(paths.base, paths, budget, ("val",) + EVAL_SETS,
                               os.path.join(args.out, "base_eval"))
    timings["base_eval_s"] = time.perf_counter() - t0

    # LR search on seed 0 (validation only), then every seed at the chosen LR (test sets).
    t0 = time.perf_counter()
    search = [Job(m, lr, 0, ("val",)) for m in methods for lr in budget.lrs]
    search_records = run_all(search, paths, budget, args.workers) if len(budget.lrs) > 1 else []
    chosen = (report.choose_lrs(search_records, methods, budget.lrs) if budget.lrs
              else {m: FULL_RUN_LRS[m] for m in methods})
    timings["lr_search_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    final = [Job(m, chosen[m], s, ("val",) + EVAL_SETS) for s in range(budget.seeds) for m in methods]
    records = run_all(final, paths, budget, args.workers)
    timings["final_runs_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    analysis = run_analysis(args.out, paths, records, budget)
    timings["analysis_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    report.write_all(args.out, base_eval, records, search_records, chosen, budget, analysis, timings,
                     methods)
    print(open(os.path.join(args.out, "table.md")).read())
    print(f"wrote {args.out}/results.json, table.md, fig6_dynamics.png, analysis/; "
          f"{timings['total_s'] / 60:.1f} min")
    return 0


def run_analysis(out: str, paths: Paths, records: list[dict], budget: Budget) -> Optional[dict]:
    """`srft-jax analyze` of the seed-0 models against the base, on the `id` set's held-out
    demonstrations and the base's own rollouts on the same prompts (temperature 1, as in
    training; truncated ones left out)."""
    from srft_jax.analysis import analyze

    models = {r["method"]: r["final"] for r in records if r["seed"] == 0 and r["method"] in ANALYSIS_MODELS}
    if not models:
        return None
    out_dir = os.path.join(out, "analysis")
    data = write_analysis_responses(out_dir, paths)
    return analyze(paths.base, list(models.values()), data, out_dir, names=list(models),
                   max_prompt_len=MAX_LEN, max_response_len=MAX_LEN)


def write_analysis_responses(out_dir: str, paths: Paths) -> str:
    """responses.jsonl: the `id` rows ("heldout_demo") and the base's rollouts ("base_rollout")."""
    from srft_jax import mesh as mesh_lib
    from srft_jax.data.eval_sets import load_benchmark
    from srft_jax.evaluation.harness import EvalProtocol, evaluate
    from srft_jax.evaluation.policy import ModelPolicy
    from srft_jax.runs import load_model

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig())
    model, tokenizer, template = load_model(paths.base, mesh)
    items = {"id": load_benchmark("openr1", path=paths.world["id"])}
    protocol = EvalProtocol(temperature=1.0, max_new_tokens=MAX_LEN, default_samples=1, samples=(),
                            batch_size=512, template=template)
    res = evaluate(ModelPolicy(model, tokenizer, mesh), items, tokenizer,
                   os.path.join(out_dir, "base_rollouts"), protocol, pool=None, progress=False)
    with open(paths.world["id"]) as f:
        rows = [json.loads(line) for line in f]
    by_question = {r["question"]: r for r in res.benchmarks["id"].records}
    out = []
    for row in rows:
        out.append({**row, "data_source": "heldout_demo"})
        question = row["prompt"][-1]["content"].removeprefix("This is the problem: ")
        rec = by_question.get(question)
        if rec and not rec["truncated"][0]:
            out.append({**row, "data_source": "base_rollout",
                        "target": [{"role": "assistant", "content": rec["responses"][0]}]})
    path = os.path.join(out_dir, "responses.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    return path


if __name__ == "__main__":
    sys.exit(main())
