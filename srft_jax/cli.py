"""Command-line entry point: `srft-jax {train,eval,sample,convert,data,info,plot,analyze,compile} ...`.

Each sub-command lives in `srft_jax/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`; this file only parses and dispatches (imports are lazy so `--help` is fast).

Errors a user can act on print one line on stderr, `error: ...`, naming the argument or config
key, without a traceback: a `srft_jax.faults.UsageError` (a malformed command line, a bad config
key or value; `config.ConfigError` is one) exits 2, like argparse's own errors; any other
`RunError` (a missing path, a model directory without weights or tokenizer, a mesh that does not
fit the devices, bad data, a failed write) exits 1. A command added to COMMANDS inherits this:
it raises those errors and `main` prints them. `--debug` (before or after the command) or
SRFT_JAX_DEBUG=1 lets them propagate with their traceback instead. Ctrl-C exits 130 without a
traceback. Library loggers (orbax's absl) log one line per record, without tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEBUG_ENV = "SRFT_JAX_DEBUG"  # set to 1: tracebacks instead of one-line errors


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (`error: srft-jax sample: ...`), exit 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="srft-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="Python logging level (default INFO)")
    debug_help = f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"srft_jax.commands.{name}")
        module.add_arguments(p)
        for q in [p, *_subparsers_of(p)]:  # `srft-jax train --debug` works too
            q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        p.set_defaults(_module=module)
    return parser


def _subparsers_of(parser: argparse.ArgumentParser) -> list:
    return [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for p in a.choices.values()]


EXIT_ERROR = 1
EXIT_USAGE = 2  # a malformed command line or config (argparse's code too)
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


def quiet_start() -> None:
    """What a CLI run prints before its own output is only what concerns it.

    - transformers warns "PyTorch was not found..." on import; srft-jax never needs torch, so
      its advisory warnings (`logger.warning_advice`, that one and nothing else) are off:
      TRANSFORMERS_NO_ADVISORY_WARNINGS=1 unless the user set it.
    - With libtpu installed, JAX loads it to look for TPU chips even where there are none, and
      libtpu prints six lines of TPU-hostname warnings. Where no TPU chip (JAX's own PCI check)
      and no NVIDIA or AMD GPU is visible and the user chose no platform (JAX_PLATFORMS), the run
      uses JAX_PLATFORMS=cpu, which is what JAX would pick anyway, without the probe.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    try:  # JAX's own checks; they read /sys and /dev only, no backend starts
        from jax._src import hardware_utils

        accelerator = (hardware_utils.num_available_tpu_chips_and_device_id()[0]
                       or hardware_utils.has_visible_nvidia_gpu())
    except (ImportError, AttributeError):  # a JAX without them: leave the choice to JAX
        return
    if accelerator or os.path.exists("/dev/kfd"):  # /dev/kfd: an AMD GPU (ROCm)
        return
    import jax

    if not getattr(jax.config, "jax_platforms", None):  # read from the environment on import
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")


def main(argv=None) -> int:
    from srft_jax.faults import RunError, UsageError

    global _HOOKED
    if not _HOOKED:
        sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
        _HOOKED = True
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = None
    try:
        args = build_parser().parse_args(argv)
        quiet_start()  # after parsing: `--help` and usage errors stay fast (no JAX import)
        logging.basicConfig(level=args.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for noisy in ("absl", "jax._src.xla_bridge"):  # orbax's and JAX's start-up chatter
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
        absl = logging.getLogger("absl")
        if not any(isinstance(f, _OneLine) for f in absl.filters):
            absl.addFilter(_OneLine())
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        if debug or getattr(args, "debug", False):
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunError as e:
        if debug or getattr(args, "debug", False):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
