"""Every shipped TPU config compiled for its slice by the TPU compiler, from this machine.

Run (needs the `tpu` extra, jax[tpu]; no TPU, nothing allocated; minutes per config):
    python benchmarks/compile_tpu.py                       # every config below, one at a time
    python benchmarks/compile_tpu.py --only v5e8 --out-dir /tmp/compile

Runs `srft-jax compile --config CFG --topology SLICE --out DIR/NAME.json` for each config,
one after the other (each compile takes minutes and the whole CPU), then prints one table:
config, slice, per program the peak per chip (GB; + resident optimiser state while sampling)
and compile seconds, and the step's roofline and MFU ceiling. The comparable number: the
largest need per chip against the chip's HBM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = {  # config -> the slice its header names
    "configs/qwen2.5-math-7b-srft-v5p64.yaml": "v5p-64",
    "configs/qwen2.5-math-1.5b-srft-v5e8.yaml": "v5e-8",
}
GB = 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="substring of the config names to run")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "runs", "compile_tpu"))
    parser.add_argument("--reuse", action="store_true",
                        help="do not recompile a config whose report is already in --out-dir")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    rows, rc = [], 0
    for config, topology in SHIPPED.items():
        if args.only and args.only not in config:
            continue
        out = os.path.join(args.out_dir, os.path.basename(config).replace(".yaml", f".{topology}.json"))
        cmd = [sys.executable, "-m", "srft_jax.cli", "compile", "--config", os.path.join(REPO, config),
               "--topology", topology, "--out", out, *args.overrides]
        if not (args.reuse and os.path.exists(out)):
            print("$", " ".join(cmd), flush=True)
            done = subprocess.run(cmd, cwd=REPO)
            rc = max(rc, done.returncode)
        if os.path.exists(out):
            with open(out) as f:
                rows.append((config, json.load(f)))
    print("\nconfig | slice | program: need per chip GB (peak + resident) / compile s | step roofline s | MFU ceiling")
    for config, rep in rows:
        progs = "; ".join(f"{name} {(p['peak_bytes'] + p.get('resident_bytes', 0)) / GB:.1f} "
                          f"({p['peak_bytes'] / GB:.1f} + {p.get('resident_bytes', 0) / GB:.1f}) / "
                          f"{p['compile_s']:.0f} s" for name, p in rep["programs"].items())
        step = rep["step"]
        roof = f"{step['roofline_s']:.1f}" if step.get("roofline_s") else "-"
        mfu = f"{step['mfu_ceiling']:.1%}" if step.get("mfu_ceiling") else "-"
        print(f"{config} | {rep['topology']} ({rep['chips']} chips, {rep['hbm_bytes_per_chip'] / GB:.0f} GB) | "
              f"{progs} | {roof} | {mfu}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
