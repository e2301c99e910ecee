"""Command-line entry point: `srft-jax {train,eval,sample,convert,data,info,plot,analyze,compile} ...`.

Each sub-command lives in `srft_jax/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`; this file only parses and dispatches (imports are lazy so `--help` is fast).

Errors a user can act on (`srft_jax.faults.RunError`: bad config, data, checkpoints, a failed
write) print one line, `error: ...`, and exit 1; Ctrl-C exits 130 without a traceback. Library
loggers (orbax's absl) log one line per record, without tracebacks.
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
    "data": "Data tools: `data convert SRC DEST --format tfds` writes a TFDS dataset directory.",
    "info": "Print a model's architecture, parameter count and memory per dtype.",
    "plot": "Plot training curves of one or more runs.",
    "analyze": "Token-probability changes of tuned models against their base (paper Section 3).",
    "compile": "Compile a config's programs for a TPU slice (from any machine): memory per chip and roofline.",
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


EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
_HOOKED = False  # _quiet_closed_loops installed


class _OneLine(logging.Filter):
    """Shortens a library's log record to its first line (orbax logs whole tracebacks, with
    tensorstore specs, for a failed background save; the run reports the failure itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().strip().splitlines()
        record.msg = (text[0] if text else "")[:300]
        record.args = None
        record.exc_info = record.exc_text = None
        return True


def _quiet_closed_loops(default_hook):
    """`sys.unraisablehook` that drops "Event loop is closed" (tensorstore callbacks that land
    after orbax closed its event loop, one traceback per pending read, once a read failed;
    the failure itself is reported) and hands everything else to `default_hook`."""

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        default_hook(unraisable)

    return hook


def main(argv=None) -> int:
    from srft_jax.faults import RunError

    global _HOOKED
    if not _HOOKED:
        sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
        _HOOKED = True

    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("absl", "jax._src.xla_bridge"):  # orbax's and JAX's start-up chatter
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
        absl = logging.getLogger("absl")
        if not any(isinstance(f, _OneLine) for f in absl.filters):
            absl.addFilter(_OneLine())
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
