"""The config system: every bundled file parses; bad keys, types and values name the key."""

import glob
import os

import pytest

from srft_jax.config import Config, ConfigError, load_config, resolve_config_path, to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_there_are_configs():
    assert any(p.endswith("demo.yaml") for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[os.path.relpath(p, ROOT) for p in CONFIG_FILES])
def test_every_config_file_parses(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The resolved config a run saves (RUN_DIR/config.yaml) parses back to the same config.
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(str(saved)) == cfg


def test_defaults_are_the_paper_setup():
    cfg = load_config(None)
    t = cfg.train
    assert (t.lr, t.b1, t.b2, t.weight_decay, t.grad_clip) == (1e-6, 0.9, 0.999, 0.01, 1.0)
    assert (t.prompts_per_step, t.rollouts_per_prompt, t.updates_per_step) == (128, 7, 2)
    assert t.rollout_temperature == 1.0 and t.schedule == "constant"
    assert cfg.loss.preset == "paper" and cfg.loss.sft_coef == 0.5 and cfg.loss.rl_coef == 0.1


def test_overrides_apply_and_preset_switches_follow_the_preset(tmp_path):
    cfg = load_config(resolve_config_path("demo"), ["train.lr=2e-6", "loss.preset=grpo"])
    assert cfg.train.lr == 2e-6
    assert cfg.loss.preset == "grpo" and not cfg.loss.use_sft and cfg.loss.onpolicy_form == "ratio"
    f = tmp_path / "x.yaml"
    f.write_text("loss:\n  preset: official\n  entropy_coef: 0.0\n")
    cfg = load_config(str(f))
    assert cfg.loss.sft_weight_sign == "pos" and cfg.loss.entropy_coef == 0.0


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "train.lrr"),
    ("train.lr=abc", "train.lr"),
    ("train.steps=-1", "train.steps"),
    ("loss.preset=foo", "preset"),
    ("data.max_prompt_len=0", "data"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("model.dtype=int8", "model.dtype"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("train.sample_chunk_prompts=32", "sampler.decode_slots"),  # retired, names its replacement
    ("sampler.decode_slots=-1", "sampler.decode_slots"),
])
def test_bad_values_name_the_key_and_the_file(override, expected):
    path = resolve_config_path("demo")
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert expected in str(e.value)
    assert "demo.yaml" in str(e.value)


def test_bad_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    # `key=` would be read as null (= the default): refused, naming the key and both spellings.
    with pytest.raises(ConfigError, match=r"data.system_prompt=.*has no value.*data.system_prompt=null"):
        load_config(None, ["data.system_prompt="])
    assert load_config(None, ["data.system_prompt=''"]).data.system_prompt == ""
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="neither a file nor a bundled config"):
        resolve_config_path("no-such-config")
