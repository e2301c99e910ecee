"""Command-line entry point: `srft-jax {train,eval,sample,convert,info,plot,analyze} ...`.

Each sub-command lives in `srft_jax/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`; this file only parses and dispatches (imports are lazy so `--help` is fast).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "train": "Train with SRFT (or a baseline preset) from a YAML config.",
    "eval": "Evaluate a model on the paper's benchmarks.",
    "sample": "Sample completions from a model for a prompt.",
    "convert": "Convert an HF directory or GGUF file to an HF directory in a chosen dtype.",
    "info": "Print a model's architecture, parameter count and memory per dtype.",
    "plot": "Plot training curves of one or more runs.",
    "analyze": "Token-probability changes of tuned models against their base (paper Section 3).",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srft-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"srft_jax.commands.{name}")
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):  # orbax's and JAX's start-up chatter
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
