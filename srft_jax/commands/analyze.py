"""`srft-jax analyze --base MODEL --models M1[,M2...] --data FILE --out DIR`: which tokens
fine-tuning moved (the SRFT paper's Section 3 token-probability analysis).

    srft-jax analyze --base runs/base --models runs/sft,runs/grpo,runs/srft \\
        --data responses.jsonl --out runs/analysis

`--data` is a file in the training layout whose `target` is the response to score (e.g.
held-out demonstrations, the base model's rollouts); each row's `data_source` labels it.
Models are HF directories or training run directories sharing the base's tokenizer; the
prompt template is the base's. Writes `summary.json` and `analysis.png` (see
`srft_jax.analysis`).
"""

from __future__ import annotations

from srft_jax.commands.common import non_negative_float, positive_int


def add_arguments(parser):
    parser.add_argument("--base", required=True, help="the base model (HF or run directory)")
    parser.add_argument("--models", required=True,
                        help="comma-separated tuned models (HF or run directories)")
    parser.add_argument("--names", default=None,
                        help="comma-separated names for the models (default: directory names)")
    parser.add_argument("--data", required=True, help="responses to score (training-layout file)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--threshold", type=non_negative_float, default=0.1,
                        help="a token 'changed' when |p_model - p_base| exceeds this (default 0.1)")
    parser.add_argument("--limit", type=positive_int, default=None, help="score the first N responses")
    parser.add_argument("--max-prompt-len", type=positive_int, default=4096, help="default 4096")
    parser.add_argument("--max-response-len", type=positive_int, default=8192, help="default 8192")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="responses per forward pass")


def run(args) -> int:
    import json

    from srft_jax.analysis import analyze
    from srft_jax.data.sources import check_local_source
    from srft_jax.faults import UsageError
    from srft_jax.runs import check_model_source

    models = [m for m in args.models.split(",") if m]
    names = [n for n in args.names.split(",") if n] if args.names else None
    if not models:
        raise UsageError(f"--models={args.models!r} names no model")
    if names is not None and (len(names) != len(models) or len(set(names)) != len(names)):
        raise UsageError(f"--names={args.names!r}: give {len(models)} unique names, one per model")
    check_model_source(args.base, "--base", gguf=False)
    for m in models:
        check_model_source(m, "--models", gguf=False)
    check_local_source(args.data, "--data")
    summary = analyze(args.base, models, args.data, args.out, names=names, threshold=args.threshold,
                      max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len,
                      limit=args.limit, batch_size=args.batch_size)
    for name, m in summary["models"].items():
        print(json.dumps({"model": name, **{k: m[k] for k in (
            "tokens", "mean_abs_prob_change", "frac_tokens_changed", "mean_entropy", "base_mean_entropy")}}))
    print(f"wrote {args.out}/summary.json and {args.out}/analysis.png")
    return 0
