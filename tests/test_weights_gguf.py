"""GGUF loading on tiny files written here with `gguf.GGUFWriter` from random HF models.

The writer applies llama.cpp's q/k row permutation for Llama (per head, [2, H/2] -> [H/2, 2]),
as llama.cpp's converter does; transformers' own GGUF loader on the same file is a second,
independent reference (it must also give the original model's logits).
"""

import os

import numpy as np
import pytest
import torch
from test_weights_util import hf_logits, left_padded_batch, make_hf_model, masked_max_err, our_logits

from srft_jax.models import load_pretrained
from srft_jax.models import gguf as gguf_lib

gguf = pytest.importorskip("gguf")

TOL = 1e-4
LAYER = {"input_layernorm.weight": "attn_norm.weight",
         "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
         "self_attn.v_proj.bias": "attn_v.bias",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


def llama_cpp_permute(w, n_head):
    """HF rows [n_head, 2, H/2] -> llama.cpp rows [n_head, H/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path, quant=None):
    cfg = hf.config
    arch = cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_merges([])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, value in hf.state_dict().items():
        value = value.float().numpy()
        if name in GLOBAL:
            gname = GLOBAL[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}." + LAYER[".".join(parts[3:])]
        if arch == "llama" and gname.startswith("blk.") and gname.split(".")[2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            value = llama_cpp_permute(value, heads)
        if quant is not None and value.ndim == 2 and gname != "token_embd.weight":
            w.add_tensor(gname, gguf.quants.quantize(value, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, np.ascontiguousarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def transformers_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_float32_gguf_matches_the_original_model(name, tmp_path):
    hf = make_hf_model(name, seed=11)
    path = write_gguf(hf, tmp_path / f"{name}.gguf")
    model, cfg = load_pretrained(path)
    assert (cfg.arch, cfg.num_kv_heads, cfg.tie_word_embeddings) == (name, 2, False)
    tokens, mask = left_padded_batch(4)
    ref = hf_logits(hf, tokens, mask)
    assert masked_max_err(hf_logits(transformers_from_gguf(path), tokens, mask), ref, mask) <= TOL
    err = masked_max_err(our_logits(model, tokens, mask), ref, mask)
    print(f"gguf {name} float32: max abs logits err {err:.3g}")
    assert err <= TOL


def test_quantised_gguf_matches_transformers_dequantisation(tmp_path):
    hf = make_hf_model("llama", seed=12)
    path = write_gguf(hf, tmp_path / "q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    model, _ = load_pretrained(path)
    tokens, mask = left_padded_batch(5)
    ref = hf_logits(transformers_from_gguf(path), tokens, mask)
    err = masked_max_err(our_logits(model, tokens, mask), ref, mask)
    print(f"gguf llama Q8_0 vs transformers: max abs logits err {err:.3g}")
    assert err <= TOL
    # and quantisation really changed the weights (the test would be vacuous otherwise)
    assert masked_max_err(hf_logits(hf, tokens, mask), ref, mask) > 1e-4


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(4 * 8 * 3).reshape(4 * 8, 3)
    np.testing.assert_array_equal(gguf_lib.unpermute_rows(llama_cpp_permute(w, 4), 4), w)


def test_unsupported_gguf_architecture_and_tensor_are_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture='gpt2'"):
        load_pretrained(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="blk.0.ssm_in.weight"):
        gguf_lib.hf_name("blk.0.ssm_in.weight")
