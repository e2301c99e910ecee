"""SRFTLossConfig: presets as written in docs/srft-method.md, validation, OmegaConf compatibility."""

import dataclasses

import pytest
from omegaconf import MISSING, OmegaConf

from srft_jax.losses import PRESET_NAMES, SRFTLossConfig

pytestmark = pytest.mark.compat

# Written from docs/srft-method.md "Presets", independently of the library's tables.
PAPER = dict(
    sft_coef=0.5,
    rl_coef=0.1,
    sft_weight_sign="neg",
    rl_weight_sign="pos",
    entropy_granularity="token",
    use_sft=True,
    use_demo_rl=True,
    use_onpolicy_rl=True,
    use_shaping=False,
    onpolicy_form="reinforce",
    use_std=True,
    adv_eps=1e-6,
    adv_stats="group",
    rl_normalizer="token_mean",
    rl_norm_constant=0.0,  # unset: a training config fills in data.max_response_len
    entropy_coef=0.0,
)
EXPECTED = {
    "paper": PAPER,
    "official": {
        **PAPER,
        "use_shaping": True,
        "shaping_gamma": 0.1,
        "onpolicy_form": "ratio_reweighted",
        "use_clip": True,  # "clipping optional": on, as in verl's default
        "clip_eps": 0.2,
        "use_std": False,
        "entropy_coef": 0.001,
        "sft_weight_sign": "pos",
    },
    "grpo": {
        **PAPER,
        "use_sft": False,
        "use_demo_rl": False,
        "onpolicy_form": "ratio",
        "use_clip": True,
        "clip_eps": 0.2,
        "entropy_coef": 0.0,
        "adv_stats": "onpolicy",  # "rollouts only": the demos join no statistics either
    },
    "luffy": {
        **PAPER,
        "use_sft": False,
        "use_shaping": True,
        "shaping_gamma": 0.1,
        "onpolicy_form": "ratio",
        "use_clip": False,
    },
    "sft": {**PAPER, "use_sft": True, "sft_coef": 1.0, "sft_weight_sign": "none", "use_demo_rl": False, "use_onpolicy_rl": False},
}


def test_default_is_paper():
    assert SRFTLossConfig() == SRFTLossConfig(preset="paper")
    assert SRFTLossConfig().preset == "paper"


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_presets_match_method_doc(preset):
    cfg = SRFTLossConfig(preset=preset)
    for name, value in EXPECTED[preset].items():
        assert getattr(cfg, name) == value, name
    # Every field is concrete after construction.
    assert all(getattr(cfg, f.name) is not None for f in dataclasses.fields(cfg))


def test_switch_overrides_preset_and_is_reported():
    cfg = SRFTLossConfig(preset="official", entropy_coef=0.0, clip_eps=0.1)
    assert cfg.entropy_coef == 0.0 and cfg.clip_eps == 0.1 and cfg.use_shaping
    assert cfg.overrides() == {"entropy_coef": 0.0, "clip_eps": 0.1}
    assert SRFTLossConfig().overrides() == {}


def test_int_values_become_floats():
    cfg = SRFTLossConfig(sft_coef=1, entropy_coef=0)
    assert isinstance(cfg.sft_coef, float) and isinstance(cfg.entropy_coef, float)


def test_frozen_and_hashable():
    cfg = SRFTLossConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sft_coef = 1.0
    assert hash(cfg) == hash(SRFTLossConfig())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"preset": "ppo"}, "preset"),
        ({"shaping_gamma": -0.1}, "shaping_gamma"),
        ({"shaping_gamma": 0.0}, "shaping_gamma"),
        ({"clip_eps": 0.0}, "clip_eps"),
        ({"clip_eps": 1.5}, "clip_eps"),
        ({"sft_coef": -1.0}, "sft_coef"),
        ({"rl_coef": float("nan")}, "rl_coef"),
        ({"adv_eps": -1e-6}, "adv_eps"),
        ({"entropy_coef": -0.001}, "entropy_coef"),
        ({"sft_weight_sign": "minus"}, "sft_weight_sign"),
        ({"rl_weight_sign": "+"}, "rl_weight_sign"),
        ({"entropy_granularity": "batch"}, "entropy_granularity"),
        ({"onpolicy_form": "ppo"}, "onpolicy_form"),
        ({"adv_stats": "all"}, "adv_stats"),
        ({"rl_normalizer": "seq_mean"}, "rl_normalizer"),
        ({"rl_norm_constant": -1.0}, "rl_norm_constant"),
        ({"use_sft": False, "use_demo_rl": False, "use_onpolicy_rl": False}, "no term"),
    ],
)
def test_invalid_values_fail_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SRFTLossConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"use_sft": 1}, "use_sft"), ({"sft_coef": "0.5"}, "sft_coef"), ({"sft_coef": True}, "sft_coef"), ({"preset": None}, "preset")],
)
def test_wrong_types_fail_naming_the_field(kwargs, match):
    with pytest.raises(TypeError, match=match):
        SRFTLossConfig(**kwargs)


def test_omegaconf_structured_roundtrip():
    base = OmegaConf.structured(SRFTLossConfig)
    merged = OmegaConf.merge(base, OmegaConf.create("preset: grpo\nclip_eps: 0.3\nentropy_coef: 0"))
    cfg = OmegaConf.to_object(merged)
    assert cfg == SRFTLossConfig(preset="grpo", clip_eps=0.3, entropy_coef=0.0)
    # A resolved config serialises to YAML and loads back unchanged.
    again = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(OmegaConf.to_yaml(OmegaConf.structured(cfg)))))
    assert again == cfg


def test_omegaconf_nested_field_takes_the_preset_from_yaml():
    """A parent config should declare the field MISSING (or build it from the YAML keys):
    a default instance already holds the paper preset's resolved switches."""

    @dataclasses.dataclass(frozen=True)
    class Parent:
        loss: SRFTLossConfig = MISSING

    merged = OmegaConf.merge(OmegaConf.structured(Parent), OmegaConf.create({"loss": {"preset": "luffy"}}))
    assert OmegaConf.to_object(merged).loss == SRFTLossConfig(preset="luffy")
