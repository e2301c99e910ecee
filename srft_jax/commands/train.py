"""`srft-jax train [--config FILE] [key=value ...]`: SRFT training (or a baseline preset).

With no config the embedded demo runs: a small model learns the synthetic arithmetic task on
a CPU in minutes, with no downloads. Exit codes: 0 done; 75 stopped by SIGTERM or Ctrl-C after
a checkpoint (rerun to continue); 130 a second Ctrl-C; 1 a run error (one line); 2 a bad config.
"""

DEFAULT_CONFIG = "demo"


def add_arguments(parser):
    parser.add_argument("--config", default=None,
                        help="YAML config file, or the name of a bundled config "
                             "(demo, demo-grpo, ...); default: demo")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.optim.lr=2e-6")


def run(args) -> int:
    from srft_jax.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path(args.config or DEFAULT_CONFIG), args.overrides)
    from srft_jax.train import train

    result = train(cfg)
    if result.stopped:  # by SIGTERM / Ctrl-C, after a checkpoint (train printed where)
        from srft_jax.preemption import EXIT_STOPPED

        return EXIT_STOPPED
    print(f"run directory: {result.run_dir}")
    print(f"  metrics:     {result.run_dir}/metrics.jsonl (TensorBoard: {result.run_dir}/tensorboard)")
    print(f"  checkpoints: {result.run_dir}/checkpoints")
    if result.export_dir:
        print(f"  HF export:   {result.export_dir}")
    for p in result.plots:
        print(f"  plot:        {p}")
    acc = result.metrics.get("eval/accuracy")
    if acc is not None:
        print(f"final held-out accuracy: {acc:.3f}")
    return 0
