"""`srft-jax data convert SRC DEST --format tfds [--split NAME]`: training data -> a TFDS
dataset directory (ArrayRecord shards + dataset_info.json), readable without TensorFlow.

SRC is anything `data.source` accepts (a .jsonl/.json/.parquet file, a directory of them, a
Hugging Face dataset id, a TFDS directory or tfds:NAME). Rows are validated as in training;
bad rows are skipped and counted by reason. Every split of SRC is written unless --split
names one.

Examples:
  srft-jax data convert data/openr1 data/openr1_tfds --format tfds
  srft-jax data convert Elliott/Openr1-Math-46k-8192 openr1_tfds --format tfds --split train
  srft-jax data convert tfds:gsm8k gsm8k_flat --format tfds --tfds-data-dir ~/tensorflow_datasets
"""

FORMATS = ("tfds",)


def add_arguments(parser):
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("convert", help="write a training source as a TFDS dataset directory",
                           description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="training source: file, directory, HF id, TFDS directory or "
                               "tfds:NAME")
    p.add_argument("dest", help="output TFDS dataset directory (new or empty)")
    p.add_argument("--format", default="tfds", choices=FORMATS, help="output format (tfds)")
    p.add_argument("--split", default=None,
                   help="convert only this split (default: every split of SRC; a single "
                        "file is written as 'train' unless named here)")
    p.add_argument("--hf-name", default=None, help="Hugging Face dataset config name")
    p.add_argument("--tfds-data-dir", default=None,
                   help="data directory of tfds:NAME sources (default: TFDS's own)")
    p.add_argument("--allow-no-demo", action="store_true",
                   help="keep rows without a demonstration (default: they are bad rows)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from srft_jax.data.convert import convert_to_tfds
    from srft_jax.data.sources import check_local_source

    check_local_source(args.src, "SRC")
    summaries = convert_to_tfds(
        args.src, args.dest, args.split, require_demo=not args.allow_no_demo,
        hf_name=args.hf_name, tfds_data_dir=args.tfds_data_dir,
        progress=not args.no_progress)
    for s in summaries:
        print(s.summary())
    print(f"wrote {args.dest}: TFDS splits {[s.split for s in summaries]}, "
          f"{sum(s.written for s in summaries)} rows")
    return 0
