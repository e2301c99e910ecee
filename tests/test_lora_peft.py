"""LoRA adapters exported as a PEFT adapter directory load onto the HF base model with HF
`peft` (torch CPU) and give the JAX model's logits; the merged HF export gives them too."""

import json
import os

import numpy as np
import pytest
import torch
from flax import nnx
from test_lora import _randomise_b
from test_weights_util import hf_logits, left_padded_batch, make_hf_model, masked_max_err, our_logits, save_hf_model

from srft_jax.models import load_pretrained, save_pretrained
from srft_jax.models.lora import PEFT_CONFIG, PEFT_WEIGHTS, merged_model, save_peft_adapter, with_adapters

peft = pytest.importorskip("peft")  # the `test` extra

TOL = 1e-4  # float32 logits, as for the HF weight round trips


@pytest.mark.parametrize("name, targets", [
    ("qwen2", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("llama", ("v_proj", "o_proj", "down_proj")),
])
def test_peft_adapter_loads_onto_the_base_with_the_same_logits(name, targets, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = save_hf_model(make_hf_model(name, seed=2), tmp_path / "base")
    base, cfg = load_pretrained(base_dir)
    model = _randomise_b(with_adapters(base, cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets),
                                       seed=1))
    out = save_peft_adapter(model, str(tmp_path / "peft"), base_dir)
    with open(os.path.join(out, PEFT_CONFIG)) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, list(targets))
    assert os.path.isfile(os.path.join(out, PEFT_WEIGHTS))

    hf_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf_base, out).eval()
    tokens, mask = left_padded_batch()
    ours = our_logits(model, tokens, mask)
    theirs = hf_logits(adapted, tokens, mask)
    base_logits = our_logits(base, tokens, mask)
    assert masked_max_err(ours, base_logits, mask) > 100 * TOL  # the adapters matter
    assert masked_max_err(ours, theirs, mask) <= TOL
    # peft's own merge gives the same weights as the merged HF export.
    merged_dir = save_pretrained(merged_model(model), str(tmp_path / "merged"))
    hf_merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert masked_max_err(hf_logits(hf_merged, tokens, mask), theirs, mask) <= TOL
    by_peft = adapted.merge_and_unload().state_dict()
    for key, value in hf_merged.state_dict().items():
        torch.testing.assert_close(value, by_peft[key], rtol=1e-5, atol=1e-6, msg=key)
