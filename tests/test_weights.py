"""HF safetensors <-> NNX decoder: logits parity with transformers (torch CPU), export round trip,
bf16 round trip, and errors that name the tensor / field."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_weights_util import (MODELS, edit_config, hf_logits, left_padded_batch, make_hf_model,
                               masked_max_err, our_logits, save_hf_model)

from srft_jax.models import CheckpointError, load_pretrained, save_pretrained
from srft_jax.models import weights

pytestmark = pytest.mark.compat

TOL = 1e-4  # float32 logits, the bound
# every model once; half of them from a sharded checkpoint with an index
CASES = [("qwen2", False), ("qwen2-tied", True), ("qwen3", True), ("qwen3-tied", False),
         ("llama", False), ("llama", True), ("llama-tied-rope3", True)]
assert {name for name, _ in CASES} == set(MODELS)


@pytest.mark.parametrize("name,sharded", CASES)
def test_logits_match_transformers(name, sharded, tmp_path):
    hf = make_hf_model(name)
    path = save_hf_model(hf, tmp_path / name, max_shard_size="40KB" if sharded else None)
    assert os.path.isfile(os.path.join(path, weights.INDEX_FILE)) == sharded
    model, cfg = load_pretrained(path)
    assert cfg.tie_word_embeddings == ("tied" in name)
    assert (model.lm_head is None) == cfg.tie_word_embeddings
    tokens, mask = left_padded_batch()
    err = masked_max_err(our_logits(model, tokens, mask), hf_logits(hf, tokens, mask), mask)
    print(f"{name} sharded={sharded}: max abs logits err {err:.3g}")
    assert err <= TOL


@pytest.mark.parametrize("name", ["qwen2", "qwen3-tied", "llama-tied-rope3"])
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(name, seed=1)
    model, cfg = load_pretrained(save_hf_model(hf, tmp_path / "src"))
    out = save_pretrained(model, str(tmp_path / "out"), max_shard_bytes=50_000)
    assert os.path.isfile(os.path.join(out, weights.INDEX_FILE))  # sharded export with an index
    hf2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf2) is type(hf)
    tokens, mask = left_padded_batch(1)
    ref = hf_logits(hf, tokens, mask)
    assert masked_max_err(hf_logits(hf2, tokens, mask), ref, mask) <= TOL
    sd, sd2 = hf.state_dict(), hf2.state_dict()
    for key, value in sd2.items():
        torch.testing.assert_close(value, sd[key], rtol=0, atol=0, msg=key)
    again, cfg2 = load_pretrained(out)  # and back into JAX
    assert cfg2 == cfg
    assert masked_max_err(our_logits(again, tokens, mask), ref, mask) <= TOL


def test_bfloat16_round_trip_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("qwen2", seed=2)
    src = save_hf_model(hf, tmp_path / "bf16", dtype=torch.bfloat16)
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        assert b'"BF16"' in f.read(4096)
    model, cfg = load_pretrained(src, param_dtype="bfloat16", dtype="bfloat16")
    assert str(model.blocks.attn.q_proj.kernel[...].dtype) == "bfloat16"
    out = save_pretrained(model, str(tmp_path / "out"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    hf2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    sd = hf.state_dict()
    for key, value in hf2.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, sd[key]), key
    # the same bf16 file loaded into float32 parameters: exact widening
    model32, _ = load_pretrained(src)
    np.testing.assert_array_equal(np.asarray(model32.embed.embedding[...]),
                                  sd["model.embed_tokens.weight"].float().numpy())


def test_export_carries_tokenizer_files_and_token_ids(tmp_path):
    hf = make_hf_model("llama", seed=3, bos_token_id=5, eos_token_id=7)
    src = save_hf_model(hf, tmp_path / "src")
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"marker": 1}, f)
    model, _ = load_pretrained(src)
    out = save_pretrained(model, str(tmp_path / "out"), dtype="float16", source_dir=src)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f) == {"marker": 1}
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (5, 7, "float16")
    assert set(load_file(os.path.join(out, "model.safetensors"))) == set(hf.state_dict())


def test_export_saves_a_given_tokenizer_object(tmp_path):
    class FakeTokenizer:
        def save_pretrained(self, out_dir):
            with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
                f.write("{}")

    model, _ = load_pretrained(save_hf_model(make_hf_model("qwen2-tied", seed=6), tmp_path / "src"))
    out = save_pretrained(model, str(tmp_path / "out"), tokenizer=FakeTokenizer(),
                          extra_config={"eos_token_id": 3, "model_type": "ignored"})
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["eos_token_id"], config["model_type"]) == (3, "qwen2")  # architecture wins


# ---- errors name the tensor / field ---------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "qwen2"
    return save_hf_model(make_hf_model("qwen2", seed=4), path)


def _rewrite(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    path = _rewrite(checkpoint, tmp_path / "m",
                    lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_pretrained(path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    path = _rewrite(checkpoint, tmp_path / "u", lambda t: t.update(
        {"model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_pretrained(path)


def test_shape_mismatch_is_named(checkpoint, tmp_path):
    import shutil

    path = str(tmp_path / "s")
    shutil.copytree(checkpoint, path)
    edit_config(path, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight.*shape"):
        load_pretrained(path)


def test_unsupported_model_type_and_missing_field_are_named(checkpoint, tmp_path):
    import shutil

    path = str(tmp_path / "t")
    shutil.copytree(checkpoint, path)
    edit_config(path, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_pretrained(path)
    edit_config(path, model_type="qwen2", num_hidden_layers=None)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_pretrained(path)


def test_ignorable_tensors_are_ignored(checkpoint, tmp_path):
    """rotary inv_freq buffers are ignored; a stored lm_head copy is ignored when tied."""
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    path = _rewrite(checkpoint, tmp_path / "i", add)
    load_pretrained(path)
    tied = save_hf_model(make_hf_model("qwen2-tied", seed=5), tmp_path / "tied")
    path = _rewrite(tied, tmp_path / "tied2", lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"]}))
    model, _ = load_pretrained(path)
    assert model.lm_head is None
