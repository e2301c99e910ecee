"""`srft-jax plot RUN_DIR [RUN_DIR ...] [--out DIR]`: PNG training curves of one or more runs."""


def add_arguments(parser):
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: RUN_DIR/plots for one run, ./plots for several)")


def run(args) -> int:
    import os

    from srft_jax.plot import plot_runs

    out = args.out or (os.path.join(args.run_dirs[0], "plots") if len(args.run_dirs) == 1 else "plots")
    for path in plot_runs(args.run_dirs, out):
        print(path)
    return 0
