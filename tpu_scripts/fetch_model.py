"""Downloads a Hugging Face model into a directory, optionally as the SRFT paper's 16k variant.

    python tpu_scripts/fetch_model.py Qwen/Qwen2.5-Math-7B ../srft-data/Qwen2.5-Math-7B-16k --paper-16k

`--paper-16k` applies the paper's only change to the checkpoint (arXiv 2506.19767, after
LUFFY): RoPE theta 10000 -> 40000 and a 16384-token window, written into config.json; the
weights are untouched. `tpu_scripts/tpu.sh data --hf-model ID --paper-16k` runs this on every
worker of a TPU VM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PAPER_16K = {"rope_theta": 40000.0, "max_position_embeddings": 16384}


def apply_paper_16k(model_dir: str) -> dict:
    """Rewrites `model_dir/config.json` with the paper's RoPE theta and window; returns it."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(PAPER_16K)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, path)
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_id", help="Hugging Face model id, e.g. Qwen/Qwen2.5-Math-7B")
    parser.add_argument("out_dir", help="directory to write the model to")
    parser.add_argument("--paper-16k", action="store_true", help="RoPE theta 40000, 16384-token window")
    args = parser.parse_args(argv)
    from huggingface_hub import snapshot_download

    snapshot_download(args.repo_id, local_dir=args.out_dir,
                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    if args.paper_16k:
        apply_paper_16k(args.out_dir)
    print(f"{args.repo_id} -> {args.out_dir}" + (" (paper 16k: rope_theta 40000, 16384 positions)"
                                                 if args.paper_16k else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
