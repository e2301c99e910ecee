"""`srft-jax compile`: will this config fit that slice? Compiled for the slice, on this machine."""

from __future__ import annotations

import json
import math
import os
import sys

GB = 1e9

EPILOG = """\
what it does:
  Builds the config's mesh on the named slice's devices (libtpu's topology description: no
  TPU is needed, a CPU-only machine with jax[tpu] installed compiles for it) and compiles,
  with the config's real shapes and nothing allocated, every program a training step runs:
  train_step (one optimiser update: micro-batches, widths, remat), old_logprobs (the
  recomputed old log-probs), prefill and decode (the sampler, with decode_slots and
  kv_block), eval_decode (the in-training evaluation; only with eval.every > 0).
  Override config keys as for `srft-jax train` (e.g. train.micro_batch_size=8).

memory (per device = per chip, from XLA's memory_analysis of the compiled program):
  args       the program's inputs (parameters, optimiser state, batch, caches)
  out        its outputs;  alias: outputs written into donated inputs (counted once)
  temp       temporaries (activations, gradients, the KV cache inside the decode loop)
  peak       args + out - alias + temp
  resident   buffers alive during the program that are not its inputs (the optimiser state
             while sampling and recomputing old log-probs)
  need       peak + resident, against the chip's HBM; a program that does not fit ends the
             command with exit status 1 and one line naming it and the knobs that move it.

roofline (per device, from the compiled HLO):
  XLA's cost_analysis counts the body of every loop (scan over layers, micro-batches,
  log-prob chunks; the decode while-loop) once. This command walks the compiled HLO and
  multiplies each loop body by its trip count (the scan lengths XLA records; the decode loop
  by ceil(rows / slots) x (R - 1) steps: every response full length, every step reading the
  full cache). The FLOPs and bytes printed are XLA's cost_analysis figures times the walk's
  loop factor (walk with trip counts / walk with every trip count 1): XLA's own per-instruction
  counts, per call of the program. "check" = walk with trip counts 1 / XLA (how closely the
  walk's simpler per-instruction rules follow XLA's; 1.0 = the same).
  t_flops = FLOPs / peak bf16 FLOP/s; t_hbm = bytes accessed / HBM bandwidth; a call takes at
  least max(t_flops, t_hbm) (inter-chip communication is not modelled).
  step roofline = sum over programs of calls per step x max(t_flops, t_hbm): a lower bound of
  one paper step (rollouts + old log-probs + updates as the config does them; evaluation not
  included).
  MFU ceiling = model FLOPs of the step / (chips x peak FLOP/s x step roofline), where model
  FLOPs count 6 N per trained token and 2 N per sampled or re-scored token plus attention
  (PaLM's convention, no rematerialisation), every response full length: the highest MFU
  this config could reach on this slice.

hardware figures (per chip; Cloud TPU documentation, as printed there):
{table}
  v4 and v5p names count TensorCores (2 per chip: v5p-64 = 32 chips), v5e and v6e names count
  chips. cpu:N = N forced host CPU devices (no HBM limit, no roofline).
"""


def add_arguments(parser) -> None:
    import argparse

    from srft_jax.hardware import table_lines

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG.format(table="\n".join(table_lines()))
    parser.add_argument("--config", required=True, help="YAML config file, or the name of a bundled config (as for srft-jax train)")
    parser.add_argument("--topology", required=True,
                        help="a Cloud TPU slice (v4-8..v4-4096, v5e-1..v5e-256, v5p-8..v5p-12288, "
                             "v6e-1..v6e-256) or cpu:N")
    parser.add_argument("--out", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--programs", default=None,
                        help="comma-separated subset of train_step,old_logprobs,prefill,decode,eval_decode "
                             "(a subset that leaves out a program of the step gives no step roofline)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")


def run(args) -> int:
    from srft_jax.config import ConfigError, load_config, resolve_config_path
    from srft_jax.hardware import slice_for

    try:
        hw = slice_for(args.topology)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not hw.is_tpu:  # forced host CPU devices: before JAX starts its CPU backend
        flag = f"--xla_force_host_platform_device_count={hw.chips}"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    from srft_jax.compile_report import KNOBS, PROGRAMS, compile_config

    only = None
    if args.programs:
        only = tuple(p.strip() for p in args.programs.split(",") if p.strip())
        bad = [p for p in only if p not in PROGRAMS]
        if bad:
            raise ConfigError(f"--programs: unknown program {bad[0]!r}; choose from {', '.join(PROGRAMS)}")
    say = lambda s: print(s, file=sys.stderr, flush=True)
    import logging

    logging.getLogger("srft_jax.sampler.engine").setLevel(logging.WARNING)  # "compiling ..." is ours
    gen = hw.generation
    if gen:
        say(f"{args.config} on {hw.name}: {hw.chips} chips (libtpu topology {hw.topology}); per chip "
            f"{gen.hbm_bytes / GB:.1f} GB HBM, {gen.peak_flops / 1e12:.0f} TFLOP/s bf16, "
            f"{gen.hbm_bandwidth / GB:.0f} GB/s")
    else:
        say(f"{args.config} on {hw.chips} host CPU devices")
    try:
        report = compile_config(cfg, hw, progress=say, only=only)
    except ValueError as e:
        raise ConfigError(f"{args.config}: {str(e).splitlines()[0]}") from None
    for line in format_report(report):
        print(line)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report.as_json(), f, indent=1)
    over = [p for p in report.programs.values() if not p.fits]
    if over:
        p = over[0]
        more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
        print(f"error: {p.name} does not fit {hw.name}: needs {p.need_bytes / GB:.2f} GB per chip, "
              f"{(p.need_bytes - p.hbm_bytes) / GB:.2f} GB over the {p.hbm_bytes / GB:.1f} GB of HBM"
              f"{more}{' (' + p.compiler_error + ')' if p.compiler_error else ''}; "
              f"knobs: {KNOBS.get(p.name, KNOBS['decode'])}",
              file=sys.stderr)
        return 1
    return 0


_UNIT = [GB, "GB"]


def _gb(x: float) -> str:
    return f"{x / _UNIT[0]:7.2f}"


def format_report(report) -> list[str]:
    hw = report.slice
    gen = hw.generation
    lines = [f"mesh {report.mesh}; model {report.model}"]
    for name, p in report.programs.items():
        lines.append(f"  {name}: {p.what}")
    for name, why in report.skipped.items():
        lines.append(f"  {name}: not compiled ({why})")
    hbm = f"{hw.hbm_bytes / GB:.1f} GB" if gen else "no limit"
    small = max([p.need_bytes for p in report.programs.values()] + [0]) < 0.1 * GB
    _UNIT[:] = [1e6, "MB"] if small else [GB, "GB"]
    lines.append(f"memory per device, {_UNIT[1]} (HBM {hbm}):")
    lines.append(f"  {'program':13s}{'args':>8s}{'out':>8s}{'alias':>8s}{'temp':>8s}{'peak':>8s}"
                 f"{'resident':>9s}{'need':>8s}  fits  compile_s")
    for name, p in report.programs.items():
        lines.append(f"  {name:13s}{_gb(p.argument_bytes)} {_gb(p.output_bytes)} {_gb(p.alias_bytes)} "
                     f"{_gb(p.temp_bytes)} {_gb(p.peak_bytes)}  {_gb(p.resident_bytes)} {_gb(p.need_bytes)}"
                     f"  {'yes' if p.fits else 'NO ':4s} {p.compile_s:8.0f}")
    lines.append("roofline per device and call (XLA cost analysis, every loop body x its trip count):")
    lines.append(f"  {'program':13s}{'calls/step':>10s}{'TFLOP':>10s}{'GB':>10s}{'t_flops_s':>11s}"
                 f"{'t_hbm_s':>10s}  bound  check(walk/XLA flops, bytes)")
    for name, p in report.programs.items():
        if gen:
            tf, tb = p.seconds(gen.peak_flops, gen.hbm_bandwidth)
            times = f"{tf:11.3f}{tb:10.3f}  {'flops' if tf >= tb else 'hbm  '}"
        else:
            times = f"{'-':>11s}{'-':>10s}  -    "
        check = (f"{_ratio(p.walk_ones_flops, p.xla_flops)}, {_ratio(p.walk_ones_bytes, p.xla_bytes)}")
        lines.append(f"  {name:13s}{p.calls_per_step:10g}{p.flops / 1e12:10.2f}{p.bytes_accessed / GB:10.2f}"
                     f"{times}  {check}")
        lines.append(f"    loops: {p.loop_note}")
    if gen and any(p.compiler_error for p in report.programs.values()):
        lines.append("step: no roofline (a program did not compile)")
    elif gen and report.left_out():
        lines.append(f"step: no roofline (--programs left out {', '.join(report.left_out())}, "
                     "which a training step also runs)")
    elif gen:
        t = report.roofline_s()
        lines.append(f"step: roofline lower bound {t:.1f} s per step; model FLOPs {report.model_flops:.3e} "
                     f"-> MFU ceiling {report.mfu_ceiling():.1%} on {hw.chips} chips")
    return lines


def _ratio(a: float, b: float) -> str:
    if not b or math.isnan(b):
        return "-"
    return f"{a / b:.2f}"
