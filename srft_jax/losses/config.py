"""`SRFTLossConfig`: one frozen dataclass selecting a loss preset plus individual switches.

The formulas live in `docs/srft-method.md` (equation numbers of arXiv 2506.19767 v1); this
module only names the choices and validates them. Every switch defaults to `None`, meaning
"take the preset's value"; `__post_init__` fills those in, so after construction every field
holds a concrete value and `SRFTLossConfig()` is the paper preset.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

PRESET_NAMES = ("paper", "official", "grpo", "luffy", "sft")
WEIGHT_SIGNS = ("neg", "pos", "none")
ENTROPY_GRANULARITIES = ("token", "sequence")
ONPOLICY_FORMS = ("reinforce", "ratio", "ratio_reweighted")
ADV_STATS = ("group", "onpolicy")
RL_NORMALIZERS = ("token_mean", "batch_tmax", "constant")

# Values of every switch under the paper preset; the other presets list only what differs.
_PAPER = {
    "sft_coef": 0.5,
    "rl_coef": 0.1,
    "sft_weight_sign": "neg",
    "rl_weight_sign": "pos",
    "entropy_granularity": "token",
    "use_sft": True,
    "use_demo_rl": True,
    "use_onpolicy_rl": True,
    "use_shaping": False,
    "shaping_gamma": 0.1,
    "onpolicy_form": "reinforce",
    "use_clip": False,
    "clip_eps": 0.2,
    "use_std": True,
    "adv_eps": 1e-6,
    "adv_stats": "group",
    "rl_normalizer": "token_mean",
    "rl_norm_constant": 0.0,
    "entropy_coef": 0.0,
}
_PRESET_DIFFS = {
    "paper": {},
    "official": {
        "sft_weight_sign": "pos",
        "use_shaping": True,
        "onpolicy_form": "ratio_reweighted",
        "use_clip": True,
        "use_std": False,
        "entropy_coef": 0.001,
    },
    "grpo": {
        "use_sft": False,
        "use_demo_rl": False,
        "onpolicy_form": "ratio",
        "use_clip": True,
        "adv_stats": "onpolicy",
    },
    "luffy": {
        "use_sft": False,
        "use_shaping": True,
        "onpolicy_form": "ratio",
        "use_clip": False,
    },
    "sft": {
        "sft_coef": 1.0,
        "sft_weight_sign": "none",
        "use_demo_rl": False,
        "use_onpolicy_rl": False,
    },
}


def preset_values(preset: str) -> dict:
    """All switch values of `preset` (a fresh dict)."""
    if preset not in _PRESET_DIFFS:
        raise ValueError(f"SRFTLossConfig.preset: unknown preset {preset!r}; expected one of {PRESET_NAMES}")
    return {**_PAPER, **_PRESET_DIFFS[preset]}


@dataclasses.dataclass(frozen=True)
class SRFTLossConfig:
    """Loss preset and switches for `srft_loss` (and `compute_advantages`).

    Notation of docs/srft-method.md: `lp` token log-prob, `h` token entropy, `p = exp(lp)`,
    `A` group advantage, `r` reward, `rho = exp(lp - lp_old)`, `sg` stop-gradient,
    `w_sft` / `w_rl` the entropy-aware weights. Every switch left at `None` takes the value
    of `preset`; after construction all fields are concrete.

    Presets (srft-method.md "Presets"):
      paper     Eq. 13 as written: L_sft (Eq. 5, 8) + off-policy demo term (Eq. 9-10) +
                REINFORCE-form on-policy term (Eq. 11-12); w_sft = 0.5 exp(-h), w_rl = 0.1 exp(+h).
      official  the public code as reported: shaped demo term (gamma 0.1), GRPO ratio term
                multiplied by w_rl on tokens with A > 0, PPO clip 0.2, no std,
                entropy_coef 0.001, w_sft = 0.5 exp(+h).
      grpo      rollouts only: -min(rho A, clip(rho, 1-eps, 1+eps) A), token mean over
                rollout tokens; demos receive no loss and are left out of the advantage
                statistics (`adv_stats='onpolicy'`).
      luffy     mixed group: shaped demo term -A f(p), unclipped on-policy -A rho, no SFT.
      sft       SFT term only, weight 1 (`sft_coef=1`, `sft_weight_sign='none'`).

    Fields (paper symbol / equation):
      preset: name of the preset supplying every switch left at None.
      sft_coef: the 0.5 in w_sft = 0.5 sg(exp(-H)) (Eq. 8).
      rl_coef: the 0.1 in w_rl = 0.1 sg(exp(H)) (Eq. 12).
      sft_weight_sign: sign of H in w_sft: 'neg' exp(-H) (paper, Eq. 8), 'pos' exp(+H)
        (reported official code), 'none' w_sft = sft_coef (ablation "w_sft fixed").
      rl_weight_sign: sign of H in w_rl: 'pos' exp(+H) (Eq. 12), 'neg', or 'none'
        w_rl = rl_coef (ablation "w_rl fixed").
      entropy_granularity: the H inside both weights: 'token' = h[b,t] (default),
        'sequence' = mean of h over the response tokens of sequence b.
      use_sft: include L_sft = sum_demo w_sft (-lp) / #demo tokens (Eq. 5, 8).
      use_demo_rl: include the off-policy demo term -A p (Eq. 9-10, pi_beta = 1, no clip).
      use_onpolicy_rl: include the on-policy term on rollout tokens (Eq. 11-12).
      use_shaping: replace p by LUFFY's policy shaping f(p) = p / (p + gamma) in the demo term.
      shaping_gamma: gamma of f(p) (LUFFY: 0.1); must be > 0.
      onpolicy_form: rollout-token loss:
        'reinforce' (Eq. 11-12): w_rl (-lp) on correct rollouts (r > 0), +lp on wrong ones;
          A, lp_old and clipping are not used.
        'ratio': -A rho (PPO-clipped -min(rho A, clip(rho) A) when use_clip).
        'ratio_reweighted': the 'ratio' term multiplied by w_rl on tokens with A > 0.
      use_clip: clip the ratio PPO-style in the 'ratio' forms (ignored by 'reinforce').
      clip_eps: epsilon of clip(rho, 1 - eps, 1 + eps); 0 < eps < 1.
      use_std: A = (r - mean) / (std + adv_eps) (Eq. 6-7, std with ddof=1) if True,
        A = r - mean (Dr.GRPO / LUFFY script) if False. Read by `compute_advantages` only.
      adv_eps: the eps of Eq. 7 (1e-6); >= 0.
      adv_stats: members whose rewards give mean/std: 'group' = the augmented group
        (rollouts + demonstrations, Eq. 6), 'onpolicy' = rollouts only (LUFFY code).
      rl_normalizer: denominator of the RL term: 'token_mean' = number of tokens that
        receive an RL term (GRPO; LUFFY's code with loss_remove_token_mean=False);
        'batch_tmax' = B_rl * T_max (Dr.GRPO), B_rl the number of sequences with at least
        one RL token and T_max the longest of their response lengths (not the padded width,
        so padding changes nothing); 'constant' = `rl_norm_constant`, a number that does
        not depend on the batch at all: LUFFY's public code with loss_remove_token_mean=True
        (set in all its training scripts: LUFFY, on-policy RL, RL + SFT loss, SFT -> RL)
        divides the summed RL token terms by the padded response width, which in verl is
        the configured max response length L_max (data.max_response_length = 8192 there).
        Relation: 'constant' = 'batch_tmax' * B_rl * T_max / L_max, i.e. the same sum of
        token terms, scaled per batch by how many sequences it has and how long the longest
        is. Adam undoes a constant factor on the whole loss (up to eps and grad clipping),
        not on one term: next to the SFT term (a token mean) the normaliser sets the weight
        of RL against SFT. (verl's gradient accumulation and data-parallel averaging
        multiply LUFFY's loss by a further constant, which this switch leaves out.) The
        SRFT paper is silent.
      rl_norm_constant: L_max of rl_normalizer='constant' (> 0 when it is used); a training
        config leaves it at 0 and gets `data.max_response_len`.
      entropy_coef: c in loss = L_sft + L_rl - c * mean(h) (paper 0; public scripts 0.001);
        the mean runs over the response tokens of every sequence that receives some term.

    Choices where srft-method.md is silent (documented here, flagged to the lead):
      - "correct" rollout means reward > 0 (rewards are 1/0; also right for +1/-1).
      - Disabled terms leave their tokens out of the normalisers: with use_demo_rl=False the
        RL denominator counts rollout tokens only (this is what makes `grpo` a rollout token
        mean); the entropy bonus averages over sequences that receive some term.
      - official: clipping on with eps 0.2 (verl default; the method file says "optional"),
        advantage statistics over the augmented group.
      - luffy: std on and statistics over the augmented group (LUFFY paper, Eq. of its
        mixed-policy GRPO); token-mean normaliser.
    """

    preset: str = "paper"
    sft_coef: Optional[float] = None
    rl_coef: Optional[float] = None
    sft_weight_sign: Optional[str] = None
    rl_weight_sign: Optional[str] = None
    entropy_granularity: Optional[str] = None
    use_sft: Optional[bool] = None
    use_demo_rl: Optional[bool] = None
    use_onpolicy_rl: Optional[bool] = None
    use_shaping: Optional[bool] = None
    shaping_gamma: Optional[float] = None
    onpolicy_form: Optional[str] = None
    use_clip: Optional[bool] = None
    clip_eps: Optional[float] = None
    use_std: Optional[bool] = None
    adv_eps: Optional[float] = None
    adv_stats: Optional[str] = None
    rl_normalizer: Optional[str] = None
    rl_norm_constant: Optional[float] = None
    entropy_coef: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.preset, str):
            raise TypeError(f"SRFTLossConfig.preset must be a string, got {self.preset!r}")
        defaults = preset_values(self.preset)
        for name, default in defaults.items():
            value = getattr(self, name)
            if value is None:
                value = default
            object.__setattr__(self, name, _checked_type(name, value, type(default)))
        self._validate()

    def _validate(self):
        _check_choice("sft_weight_sign", self.sft_weight_sign, WEIGHT_SIGNS)
        _check_choice("rl_weight_sign", self.rl_weight_sign, WEIGHT_SIGNS)
        _check_choice("entropy_granularity", self.entropy_granularity, ENTROPY_GRANULARITIES)
        _check_choice("onpolicy_form", self.onpolicy_form, ONPOLICY_FORMS)
        _check_choice("adv_stats", self.adv_stats, ADV_STATS)
        _check_choice("rl_normalizer", self.rl_normalizer, RL_NORMALIZERS)
        _check_range("sft_coef", self.sft_coef, lo=0.0)
        _check_range("rl_coef", self.rl_coef, lo=0.0)
        _check_range("shaping_gamma", self.shaping_gamma, lo=0.0, lo_open=True)
        _check_range("clip_eps", self.clip_eps, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        _check_range("adv_eps", self.adv_eps, lo=0.0)
        _check_range("entropy_coef", self.entropy_coef, lo=0.0)
        _check_range("rl_norm_constant", self.rl_norm_constant, lo=0.0)
        if not (self.use_sft or self.use_demo_rl or self.use_onpolicy_rl):
            raise ValueError(
                "SRFTLossConfig: use_sft, use_demo_rl and use_onpolicy_rl are all False; "
                "the loss would have no term"
            )

    def overrides(self) -> dict:
        """The fields whose values differ from those of `preset` (for logging/serialising)."""
        defaults = preset_values(self.preset)
        return {k: getattr(self, k) for k, v in defaults.items() if getattr(self, k) != v}


def _checked_type(name: str, value, kind: type):
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"SRFTLossConfig.{name} must be a bool, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"SRFTLossConfig.{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise TypeError(f"SRFTLossConfig.{name} must be a string, got {value!r}")
    return value


def _check_choice(name: str, value: str, choices: tuple):
    if value not in choices:
        raise ValueError(f"SRFTLossConfig.{name}: {value!r} is not one of {choices}")


def _check_range(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        bounds = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"SRFTLossConfig.{name} = {value!r} is outside {bounds}")
