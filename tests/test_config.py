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
    o = t.optim
    assert (o.lr, o.b1, o.b2, o.weight_decay, o.grad_clip) == (1e-6, 0.9, 0.999, 0.01, 1.0)
    assert (t.prompts_per_step, t.rollouts_per_prompt, t.updates_per_step) == (128, 7, 2)
    assert cfg.sampler.temperature == 1.0 and o.schedule == "constant"
    assert cfg.loss.preset == "paper" and cfg.loss.sft_coef == 0.5 and cfg.loss.rl_coef == 0.1


def test_overrides_apply_and_preset_switches_follow_the_preset(tmp_path):
    cfg = load_config(resolve_config_path("demo"), ["train.optim.lr=2e-6", "loss.preset=grpo"])
    assert cfg.train.optim.lr == 2e-6
    assert cfg.loss.preset == "grpo" and not cfg.loss.use_sft and cfg.loss.onpolicy_form == "ratio"
    f = tmp_path / "x.yaml"
    f.write_text("loss:\n  preset: official\n  entropy_coef: 0.0\n")
    cfg = load_config(str(f))
    assert cfg.loss.sft_weight_sign == "pos" and cfg.loss.entropy_coef == 0.0


def test_constant_rl_normaliser_takes_the_max_response_length(tmp_path):
    """LUFFY's loss_remove_token_mean=True divides by data.max_response_length: a training
    config fills it in unless the constant is given; the saved config reloads the same."""
    cfg = load_config(resolve_config_path("demo"), ["loss.rl_normalizer=constant", "data.max_response_len=24"])
    assert cfg.loss.rl_normalizer == "constant" and cfg.loss.rl_norm_constant == 24.0
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(str(saved)) == cfg
    cfg = load_config(None, ["loss.preset=luffy", "loss.rl_normalizer=constant", "loss.rl_norm_constant=8192"])
    assert cfg.loss.rl_norm_constant == 8192.0
    assert load_config(None).loss.rl_norm_constant == 0.0  # unused by the default token mean


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "train.lrr"),
    ("train.optim.lr=abc", "train.optim.lr"),
    ("train.steps=-1", "train.steps"),
    ("loss.preset=foo", "preset"),
    ("data.max_prompt_len=0", "data"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("model.dtype=int8", "model.dtype"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("train.sample_chunk_prompts=32", "sampler.decode_slots"),  # retired, names its replacement
    ("sampler.decode_slots=-1", "sampler.decode_slots"),
])
def test_bad_overrides_name_the_key_and_the_command_line(override, expected):
    path = resolve_config_path("demo")
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert expected in str(e.value)
    assert str(e.value).startswith("command line") and "demo.yaml" not in str(e.value)


def test_bad_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.optim.lr"])
    # `key=` would be read as null (= the default): refused, naming the key and both spellings.
    with pytest.raises(ConfigError, match=r"data.template.system_prompt=.*has no value.*system_prompt=null"):
        load_config(None, ["data.template.system_prompt="])
    assert load_config(None, ["data.template.system_prompt=''"]).data.template.system_prompt == ""
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  optim:\n    lr: [1, 2]\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="neither a file nor a bundled config"):
        resolve_config_path("no-such-config")


def test_moved_keys_still_work_with_a_warning_and_removed_keys_name_the_replacement(tmp_path, caplog):
    f = tmp_path / "old.yaml"
    f.write_text("train:\n  lr: 3.0e-4\n  rollout_temperature: 0.7\ndata:\n  system_prompt: ''\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(str(f), ["eval.benchmark_samples=4"])
    assert cfg.train.optim.lr == 3e-4 and cfg.sampler.temperature == 0.7
    assert cfg.data.template.system_prompt == "" and cfg.eval.samples == 4
    assert "train.lr is deprecated, use train.optim.lr" in caplog.text
    assert "eval.benchmark_samples is deprecated, use eval.samples" in caplog.text
    with pytest.raises(ConfigError, match="data.batch_size was removed.*train.prompts_per_step"):
        load_config(None, ["data.batch_size=16"])
    with pytest.raises(ConfigError, match="both train.lr and train.optim.lr"):
        load_config(None, ["train.lr=1", "train.optim.lr=2"])


def test_sampler_lengths_and_buckets_come_from_the_data_section():
    cfg = load_config(resolve_config_path("demo"))
    assert cfg.sampler.max_new_tokens == cfg.data.max_response_len == 24
    assert cfg.sampler.prompt_buckets == cfg.data.prompt_widths == (24,)
    default = load_config(None)
    assert default.sampler.response_buckets == default.data.response_widths == (16, 32, 64, 128, 256, 512,
                                                                                 1024, 2048, 4096, 8192)
    assert load_config(None, ["sampler.max_new_tokens=8192"]).sampler.max_new_tokens == 8192  # agrees
    with pytest.raises(ConfigError, match="sampler.max_new_tokens=64 disagrees with data.max_response_len"):
        load_config(None, ["sampler.max_new_tokens=64"])
    assert Config().sampler.max_new_tokens == 8192  # also in Python: derived, not the sampler's default
