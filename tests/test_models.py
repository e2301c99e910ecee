"""Model presets (exact HF parameter counts by `jax.eval_shape`) and the `convert` / `info` commands."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_weights_util import make_hf_model, save_hf_model

from srft_jax.commands import convert as convert_cmd
from srft_jax.commands import info as info_cmd
from srft_jax.models import ModelConfig, preset
from srft_jax.models.weights import count_params

pytestmark = pytest.mark.compat

HF_COUNTS = {  # sum of tensor sizes of the published HF checkpoints
    "qwen2.5-math-1.5b": 1_543_714_304,
    "qwen2.5-math-7b": 7_615_616_512,
    "qwen2.5-math-7b-16k": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_preset_parameter_counts_are_exact(name):
    cfg = preset(name)
    assert count_params(cfg) == HF_COUNTS[name]
    assert cfg.num_params() == HF_COUNTS[name]


def test_16k_preset_is_the_papers_rope_variant():
    cfg = preset("qwen2.5-math-7b-16k")
    assert (cfg.rope_theta, cfg.max_position_embeddings) == (40000.0, 16384)
    assert cfg.replace(rope_theta=10000.0, max_position_embeddings=4096) == preset("qwen2.5-math-7b")


def test_eval_shape_count_matches_config_formula_for_every_variant():
    for kw in (dict(arch="qwen3", attention_bias=False, qk_norm=True, head_dim=32),
               dict(arch="llama", attention_bias=False, tie_word_embeddings=True)):
        cfg = ModelConfig.tiny(**kw)
        assert count_params(cfg) == cfg.num_params()


def _run(module, argv) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_info_for_a_preset_and_a_directory(tmp_path, capsys):
    assert _run(info_cmd, ["qwen2.5-math-1.5b"]) == 0
    out = capsys.readouterr().out
    assert "1,543,714,304" in out and "qwen2" in out and "tied" in out
    assert "bfloat16 2.88 GiB" in out and "float32 5.75 GiB" in out
    hf = make_hf_model("llama", seed=21)
    path = save_hf_model(hf, tmp_path / "llama")
    assert _run(info_cmd, [path]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in hf.parameters())
    assert f"{n:,}" in out and "llama" in out and "F32" in out
    from srft_jax.cli import main as cli_main

    assert cli_main(["info", str(tmp_path / "nope")]) == 1  # one line on stderr (docs/errors.md)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a model directory" in err and len(err.splitlines()) == 1


def test_convert_writes_a_complete_bfloat16_directory(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("qwen3-tied", seed=22)
    src = save_hf_model(hf, tmp_path / "src")
    with open(os.path.join(src, "tokenizer.json"), "w") as f:
        f.write('{"marker": true}')
    out = str(tmp_path / "out")
    assert _run(convert_cmd, [src, out, "--dtype", "bfloat16", "--max-shard-size", "30KB"]) == 0
    assert "parameters in bfloat16" in capsys.readouterr().out
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    shard = next(f for f in files if f.endswith(".safetensors"))
    with safe_open(os.path.join(out, shard), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ref = hf.state_dict()
    for key, value in converted.state_dict().items():  # the same rounding as torch's cast
        assert torch.equal(value, ref[key].to(torch.bfloat16)), key


def test_parse_size():
    assert convert_cmd.parse_size("4GB") == 4 * 10**9
    assert convert_cmd.parse_size("500MiB") == 500 * 2**20
    assert convert_cmd.parse_size("123") == 123
    with pytest.raises(ValueError, match="--max-shard-size"):
        convert_cmd.parse_size("lots")


def test_load_pretrained_applies_config_overrides(tmp_path):
    from srft_jax.models import load_pretrained

    path = save_hf_model(make_hf_model("qwen2", seed=23), tmp_path / "m")
    model, cfg = load_pretrained(path, param_dtype="bfloat16", remat="full")
    assert (cfg.param_dtype, cfg.remat) == ("bfloat16", "full")
    assert np.asarray(model.final_norm.scale[...]).dtype.name == "bfloat16"


def test_command_modules_import_without_jax():
    code = ("import sys, srft_jax.commands.convert, srft_jax.commands.info; "
            "print(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
