"""srft_loss against a float64 NumPy reference written from docs/srft-method.md.

The reference loops over sequences and tokens and differentiates each term by hand:
  SFT        w_sft * (-lp)            d/dlp = -w_sft
  demo RL    -A * p  (p = e^lp)       d/dlp = -A * p
  shaped     -A * p / (p + g)         d/dlp = -A * p * g / (p + g)^2
  reinforce  correct: -w_rl * lp      d/dlp = -w_rl;   wrong: +lp   d/dlp = 1
  ratio      -A * rho (rho = e^(lp - lp_old))  d/dlp = -A * rho, 0 where the clip is active
  reweighted the ratio term times w_rl where A > 0
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srft_jax.losses import PRESET_NAMES, SRFTLossConfig, loss_normalizers, srft_loss

pytestmark = pytest.mark.compat

RTOL = 1e-5
SIGN = {"neg": -1.0, "pos": 1.0, "none": 0.0}


def np_srft(lp, h, batch, cfg):
    """Loss, d loss / d lp, d loss / d h and metrics, in float64 with explicit loops."""
    lp = np.asarray(lp, np.float64)
    h = np.asarray(h, np.float64)
    m = np.asarray(batch["response_mask"], np.float64)
    demo = np.asarray(batch["is_demo"], bool)
    r = np.asarray(batch["reward"], np.float64)
    adv = np.asarray(batch["advantage"], np.float64)
    old = np.asarray(batch["old_logprobs"], np.float64)
    n_seq, width = lp.shape

    tokens = [(b, t) for b in range(n_seq) for t in range(width) if m[b, t] > 0]
    h_seq = {b: np.mean([h[b, t] for t in range(width) if m[b, t] > 0]) for b in range(n_seq) if m[b].sum() > 0}

    def weight_entropy(b, t):
        return h[b, t] if cfg.entropy_granularity == "token" else h_seq[b]

    def w_sft(b, t):
        return cfg.sft_coef * np.exp(SIGN[cfg.sft_weight_sign] * weight_entropy(b, t))

    def w_rl(b, t):
        return cfg.rl_coef * np.exp(SIGN[cfg.rl_weight_sign] * weight_entropy(b, t))

    sft_set = [(b, t) for (b, t) in tokens if demo[b] and cfg.use_sft]
    demo_rl_set = [(b, t) for (b, t) in tokens if demo[b] and cfg.use_demo_rl]
    onp_set = [(b, t) for (b, t) in tokens if not demo[b] and cfg.use_onpolicy_rl]
    rl_set = demo_rl_set + onp_set
    active = sorted(set(sft_set) | set(rl_set))

    if cfg.rl_normalizer == "token_mean":
        norm = len(rl_set)
    elif cfg.rl_normalizer == "constant":  # LUFFY, loss_remove_token_mean=True: sum / L_max
        norm = cfg.rl_norm_constant
    else:
        lengths = {}
        for b, _ in rl_set:
            lengths[b] = lengths.get(b, 0) + 1
        norm = len(lengths) * max(lengths.values()) if lengths else 0

    grad_lp = np.zeros_like(lp)
    grad_h = np.zeros_like(h)
    l_sft = 0.0
    for b, t in sft_set:
        l_sft += w_sft(b, t) * -lp[b, t] / len(sft_set)
        grad_lp[b, t] += -w_sft(b, t) / len(sft_set)

    l_demo = 0.0
    for b, t in demo_rl_set:
        p = np.exp(lp[b, t])
        if cfg.use_shaping:
            g = cfg.shaping_gamma
            l_demo += -adv[b] * p / (p + g) / norm
            grad_lp[b, t] += -adv[b] * p * g / (p + g) ** 2 / norm
        else:
            l_demo += -adv[b] * p / norm
            grad_lp[b, t] += -adv[b] * p / norm

    l_onp = 0.0
    clipped_count = 0
    for b, t in onp_set:
        if cfg.onpolicy_form == "reinforce":
            if r[b] > 0:
                l_onp += -w_rl(b, t) * lp[b, t] / norm
                grad_lp[b, t] += -w_rl(b, t) / norm
            else:
                l_onp += lp[b, t] / norm
                grad_lp[b, t] += 1.0 / norm
            continue
        rho = np.exp(lp[b, t] - old[b, t])
        value, slope = -adv[b] * rho, -adv[b] * rho
        if cfg.use_clip:
            clipped_value = -adv[b] * min(max(rho, 1 - cfg.clip_eps), 1 + cfg.clip_eps)
            if clipped_value > value:
                value, slope = clipped_value, 0.0
                clipped_count += 1
        factor = w_rl(b, t) if (cfg.onpolicy_form == "ratio_reweighted" and adv[b] > 0) else 1.0
        l_onp += factor * value / norm
        grad_lp[b, t] += factor * slope / norm

    mean_h = np.mean([h[b, t] for b, t in active]) if active else 0.0
    for b, t in active:
        grad_h[b, t] = -cfg.entropy_coef / len(active)
    loss = l_sft + l_demo + l_onp - cfg.entropy_coef * mean_h

    metrics = {"loss/total": loss, "loss/sft": l_sft, "loss/demo_rl": l_demo, "loss/onpolicy": l_onp}
    metrics["loss/rl"] = l_demo + l_onp
    metrics["loss/entropy_bonus"] = -cfg.entropy_coef * mean_h
    for name, is_src in (("demo", True), ("rollout", False)):
        src = [(b, t) for (b, t) in tokens if demo[b] == is_src]
        metrics[f"{name}/tokens"] = len(src)
        metrics[f"{name}/sequences"] = len({b for b, _ in src})
        metrics[f"{name}/entropy"] = np.mean([h[b, t] for b, t in src]) if src else 0.0
        metrics[f"{name}/prob"] = np.mean([np.exp(lp[b, t]) for b, t in src]) if src else 0.0
        metrics[f"{name}/w_sft"] = np.mean([w_sft(b, t) for b, t in src]) if src else 0.0
        metrics[f"{name}/w_rl"] = np.mean([w_rl(b, t) for b, t in src]) if src else 0.0
    if cfg.onpolicy_form != "reinforce" and cfg.use_clip:
        n_roll = metrics["rollout/tokens"]
        metrics["rollout/clip_fraction"] = clipped_count / n_roll if n_roll else 0.0
    return loss, grad_lp, grad_h, metrics


def make_batch(seed, n_groups=3, rollouts=4, width=12, demos=True):
    """Mixed batch: per group `rollouts` rollouts (+1 demo), random lengths, 0/1 rewards
    (one group all correct), advantages from the group rewards, padding at random."""
    rng = np.random.default_rng(seed)
    per = rollouts + (1 if demos else 0)
    n = n_groups * per
    is_demo = np.array(([False] * rollouts + ([True] if demos else [])) * n_groups)
    group = np.repeat(np.arange(n_groups), per)
    reward = rng.integers(0, 2, size=n).astype(np.float32)
    reward[is_demo] = 1.0
    reward[group == 0] = 1.0
    adv = np.zeros(n, np.float32)
    for g in range(n_groups):
        rg = reward[group == g]
        adv[group == g] = (rg - rg.mean()) / (rg.std(ddof=1) + 1e-6)
    lengths = rng.integers(1, width + 1, size=n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
    lp = np.log(rng.uniform(0.02, 0.98, size=(n, width))).astype(np.float32)
    h = rng.uniform(0.05, 2.5, size=(n, width)).astype(np.float32)
    old = (lp + rng.uniform(-0.35, 0.35, size=(n, width))).astype(np.float32)
    old[is_demo] = 0.0
    # Garbage at padded positions must not matter.
    lp[mask == 0] = -50.0
    h[mask == 0] = 30.0
    batch = {
        "response_mask": mask,
        "is_demo": is_demo,
        "reward": reward,
        "advantage": adv,
        "old_logprobs": old,
    }
    return lp, h, batch


def jax_loss_and_grads(lp, h, batch, cfg):
    """Eager (op-by-op, cached across tests of the same shapes: faster than one jit per
    config); `test_config_is_a_static_jit_argument` covers jit."""
    fn = jax.value_and_grad(functools.partial(_loss_only, cfg=cfg), argnums=(0, 1), has_aux=True)
    (loss, metrics), (g_lp, g_h) = fn(jnp.asarray(lp), jnp.asarray(h), jax.tree.map(jnp.asarray, batch))
    return loss, g_lp, g_h, metrics


def _loss_only(lp, h, batch, cfg):
    return srft_loss(lp, h, batch, cfg)


def assert_close(actual, expected, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    err = np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-30))
    assert err <= RTOL or np.array_equal(actual, expected), f"{what}: relative error {err:.3g}"


def check_against_reference(cfg, lp, h, batch):
    loss, g_lp, g_h, metrics = jax_loss_and_grads(lp, h, batch, cfg)
    ref_loss, ref_g_lp, ref_g_h, ref_metrics = np_srft(lp, h, batch, cfg)
    assert np.isfinite(loss)
    assert_close(loss, ref_loss, "loss")
    # Per-token gradients: each is one product, so the element-wise relative error is tight.
    assert_close(g_lp, ref_g_lp, "d loss / d logprobs")
    assert_close(g_h, ref_g_h, "d loss / d entropy")
    for name, value in ref_metrics.items():
        assert_close(metrics[name], value, name)
    return loss, metrics


# Every preset, and each switch flipped on its own (on the paper preset unless it only
# matters elsewhere).
CASES = [(p, {}) for p in PRESET_NAMES] + [
    ("paper", {"entropy_granularity": "sequence"}),
    ("paper", {"sft_weight_sign": "pos"}),
    ("paper", {"sft_weight_sign": "none"}),
    ("paper", {"rl_weight_sign": "none"}),
    ("paper", {"rl_weight_sign": "neg"}),
    ("paper", {"use_shaping": True}),
    ("paper", {"use_shaping": True, "shaping_gamma": 0.5}),
    ("paper", {"onpolicy_form": "ratio_reweighted"}),
    ("paper", {"onpolicy_form": "ratio"}),
    ("paper", {"onpolicy_form": "ratio", "use_clip": True}),
    ("paper", {"rl_normalizer": "batch_tmax"}),
    ("paper", {"entropy_coef": 0.01}),
    ("paper", {"sft_coef": 0.3}),
    ("paper", {"rl_coef": 0.7}),
    ("paper", {"use_sft": False}),
    ("paper", {"use_demo_rl": False}),
    ("paper", {"use_onpolicy_rl": False}),
    ("official", {"use_clip": False}),
    ("official", {"entropy_granularity": "sequence"}),
    ("official", {"sft_weight_sign": "neg"}),
    ("official", {"use_shaping": False}),
    ("official", {"onpolicy_form": "reinforce"}),
    ("official", {"rl_normalizer": "batch_tmax"}),
    ("grpo", {"clip_eps": 0.1}),
    ("grpo", {"use_clip": False}),
    ("luffy", {"use_clip": True}),
    ("sft", {"sft_weight_sign": "neg", "sft_coef": 0.5}),
    # LUFFY's loss_remove_token_mean=True (appended: earlier cases keep their seeds).
    ("paper", {"rl_normalizer": "constant", "rl_norm_constant": 8192.0}),
    ("luffy", {"rl_normalizer": "constant", "rl_norm_constant": 12.0}),
]


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=[f"{p}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for p, o in CASES]
)
def test_matches_numpy_reference(case):
    preset, overrides = CASES[case]
    cfg = SRFTLossConfig(preset=preset, **overrides)
    lp, h, batch = make_batch(seed=100 + case)
    check_against_reference(cfg, lp, h, batch)


def test_reference_batch_exercises_every_branch():
    """The random batches contain demos, correct and wrong rollouts, A > 0 / A < 0 / A = 0,
    clipped and unclipped ratios, and padding."""
    lp, h, batch = make_batch(seed=3)
    rollout = ~batch["is_demo"]
    assert batch["is_demo"].any() and (batch["reward"][rollout] > 0).any() and (batch["reward"][rollout] == 0).any()
    assert (batch["advantage"] > 0).any() and (batch["advantage"] < 0).any() and (batch["advantage"] == 0).any()
    assert (batch["response_mask"] == 0).any()
    _, _, _, metrics = np_srft(lp, h, batch, SRFTLossConfig(preset="grpo"))
    assert 0.0 < metrics["rollout/clip_fraction"] < 1.0


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.003])
def test_entropy_gradient_is_only_the_bonus(preset, entropy_coef):
    """Weights are stop-gradient: d loss / d h = -c / (#active tokens) on active tokens."""
    lp, h, batch = make_batch(seed=11)
    cfg = SRFTLossConfig(preset=preset, entropy_coef=entropy_coef)
    _, _, g_h, _ = jax_loss_and_grads(lp, h, batch, cfg)
    m = batch["response_mask"]
    active = np.zeros_like(m)
    demo = batch["is_demo"]
    if cfg.use_sft or cfg.use_demo_rl:
        active[demo] = m[demo]
    if cfg.use_onpolicy_rl:
        active[~demo] = m[~demo]
    expected = -entropy_coef * active / active.sum()
    if entropy_coef == 0.0:
        assert np.all(np.asarray(g_h) == 0.0)
    else:
        np.testing.assert_allclose(g_h, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("preset", ["paper", "official", "grpo"])
def test_padding_invariance(preset):
    cfg = SRFTLossConfig(preset=preset, rl_normalizer="batch_tmax" if preset == "official" else None)
    lp, h, batch = make_batch(seed=5)
    loss, g_lp, g_h, metrics = jax_loss_and_grads(lp, h, batch, cfg)

    n, width = lp.shape
    extra_cols, extra_rows = 4, 3
    rng = np.random.default_rng(0)

    def pad(x, fill):
        out = np.full((n + extra_rows, width + extra_cols), fill, np.float32)
        out[:n, :width] = x
        return out

    lp2 = pad(lp, np.nan)  # padded values are garbage, even NaN
    lp2[n:] = -1.0
    h2 = pad(h, np.inf)
    h2[n:] = 1.0
    batch2 = {
        "response_mask": pad(batch["response_mask"], 0.0),
        "is_demo": np.concatenate([batch["is_demo"], rng.integers(0, 2, extra_rows).astype(bool)]),
        "reward": np.concatenate([batch["reward"], np.ones(extra_rows, np.float32)]),
        "advantage": np.concatenate([batch["advantage"], np.full(extra_rows, 3.0, np.float32)]),
        "old_logprobs": pad(batch["old_logprobs"], 0.0),
    }
    loss2, g_lp2, g_h2, metrics2 = jax_loss_and_grads(lp2, h2, batch2, cfg)
    assert_close(loss2, loss, "padded loss")
    np.testing.assert_allclose(g_lp2[:n, :width], g_lp, rtol=1e-6)
    np.testing.assert_allclose(g_h2[:n, :width], g_h, rtol=1e-6)
    assert np.all(np.asarray(g_lp2)[n:] == 0) and np.all(np.asarray(g_lp2)[:, width:] == 0)
    for name in metrics:
        assert_close(metrics2[name], metrics[name], name)


@pytest.mark.parametrize("preset", ["paper", "luffy"])
def test_permutation_invariance(preset):
    cfg = SRFTLossConfig(preset=preset)
    lp, h, batch = make_batch(seed=8)
    perm = np.random.default_rng(1).permutation(lp.shape[0])
    loss, g_lp, _, metrics = jax_loss_and_grads(lp, h, batch, cfg)
    batch_p = {k: np.asarray(v)[perm] for k, v in batch.items()}
    loss_p, g_lp_p, _, metrics_p = jax_loss_and_grads(lp[perm], h[perm], batch_p, cfg)
    assert_close(loss_p, loss, "permuted loss")
    np.testing.assert_allclose(g_lp_p, np.asarray(g_lp)[perm], rtol=1e-6)
    for name in metrics:
        assert_close(metrics_p[name], metrics[name], name)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_no_demos_gives_finite_loss_and_zero_demo_terms(preset):
    cfg = SRFTLossConfig(preset=preset)
    lp, h, batch = make_batch(seed=2, demos=False)
    loss, metrics = check_against_reference(cfg, lp, h, batch)
    assert float(metrics["loss/sft"]) == 0.0 and float(metrics["loss/demo_rl"]) == 0.0
    assert float(metrics["demo/tokens"]) == 0.0


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_no_rollouts_gives_finite_loss_and_zero_onpolicy_term(preset):
    cfg = SRFTLossConfig(preset=preset)
    lp, h, batch = make_batch(seed=4)
    keep = batch["is_demo"]
    batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
    loss, metrics = check_against_reference(cfg, lp[keep], h[keep], batch)
    assert float(metrics["loss/onpolicy"]) == 0.0 and float(metrics["rollout/tokens"]) == 0.0


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_all_masked_gives_zero_not_nan(preset):
    cfg = SRFTLossConfig(preset=preset, entropy_coef=0.01)
    lp, h, batch = make_batch(seed=6)
    batch["response_mask"] = np.zeros_like(batch["response_mask"])
    loss, g_lp, g_h, metrics = jax_loss_and_grads(lp, h, batch, cfg)
    assert float(loss) == 0.0
    assert np.all(np.asarray(g_lp) == 0.0) and np.all(np.asarray(g_h) == 0.0)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_group_with_equal_rewards_contributes_no_ratio_gradient():
    """A = 0 (all rewards equal) makes the ratio and demo terms vanish for that group."""
    cfg = SRFTLossConfig(preset="luffy")
    lp, h, batch = make_batch(seed=9)
    batch["advantage"] = np.zeros_like(batch["advantage"])
    loss, g_lp, _, _ = jax_loss_and_grads(lp, h, batch, cfg)
    assert float(loss) == 0.0 and np.all(np.asarray(g_lp) == 0.0)


def test_accepts_attribute_batch_and_bf16_inputs():
    class Batch:
        def __init__(self, d):
            self.__dict__.update(d)

    lp, h, batch = make_batch(seed=1)
    loss_dict, _ = srft_loss(jnp.asarray(lp), jnp.asarray(h), batch)
    loss_obj, _ = srft_loss(jnp.asarray(lp), jnp.asarray(h), Batch(batch))
    assert float(loss_dict) == float(loss_obj)
    loss_bf16, _ = srft_loss(jnp.asarray(lp, jnp.bfloat16), jnp.asarray(h, jnp.bfloat16), batch)
    assert loss_bf16.dtype == jnp.float32


def test_metric_keys_are_stable():
    lp, h, batch = make_batch(seed=1)
    _, metrics = srft_loss(jnp.asarray(lp), jnp.asarray(h), batch, SRFTLossConfig())
    _, metrics_grpo = srft_loss(jnp.asarray(lp), jnp.asarray(h), batch, SRFTLossConfig(preset="grpo"))
    per_source = {"tokens", "sequences", "entropy", "prob", "w_sft", "w_rl"}
    for src in ("demo", "rollout"):
        assert {f"{src}/{k}" for k in per_source} <= set(metrics)
    assert {"loss/total", "loss/sft", "loss/demo_rl", "loss/onpolicy", "loss/rl", "loss/entropy_bonus"} <= set(metrics)
    assert "rollout/clip_fraction" not in metrics and "rollout/clip_fraction" in metrics_grpo


def test_config_is_a_static_jit_argument():
    lp, h, batch = make_batch(seed=12)
    fn = jax.jit(srft_loss, static_argnames=("config",))
    cfg = SRFTLossConfig(preset="official")
    loss_jit, _ = fn(jnp.asarray(lp), jnp.asarray(h), batch, config=cfg)
    loss_eager, _ = srft_loss(jnp.asarray(lp), jnp.asarray(h), batch, cfg)
    assert_close(loss_jit, loss_eager, "jit vs eager")


@pytest.mark.parametrize(
    "preset,overrides", [("paper", {}), ("official", {"rl_normalizer": "batch_tmax"}), ("grpo", {}), ("sft", {}),
                         ("luffy", {"rl_normalizer": "constant", "rl_norm_constant": 8192.0})]
)
def test_micro_batches_with_whole_batch_normalizers_sum_to_the_batch(preset, overrides):
    """Gradient accumulation: micro-batch losses with the mini-batch's normalisers add up."""
    cfg = SRFTLossConfig(preset=preset, entropy_coef=0.01, **overrides)
    lp, h, batch = make_batch(seed=13)
    full_loss, full_g, _, _ = jax_loss_and_grads(lp, h, batch, cfg)
    norms = loss_normalizers(batch, cfg)

    def micro_loss(lp, h, mb):
        return srft_loss(lp, h, mb, cfg, normalizers=norms)[0]

    total, grads = 0.0, []
    for idx in np.array_split(np.random.default_rng(0).permutation(lp.shape[0]), 3):
        mb = {k: np.asarray(v)[idx] for k, v in batch.items()}
        loss, g = jax.value_and_grad(micro_loss)(jnp.asarray(lp[idx]), jnp.asarray(h[idx]), mb)
        total += float(loss)
        grads.append((idx, np.asarray(g)))
    assert_close(total, full_loss, "sum of micro-batch losses")
    for idx, g in grads:
        np.testing.assert_allclose(g, np.asarray(full_g)[idx], rtol=1e-6)


def test_constant_normaliser_ignores_the_batch_and_needs_its_constant():
    """LUFFY's loss_remove_token_mean=True: the RL sum over L_max whatever the batch holds;
    halving the batch halves the RL term (a token mean would not change)."""
    cfg = SRFTLossConfig(preset="luffy", rl_normalizer="constant", rl_norm_constant=8192.0)
    lp, h, batch = make_batch(seed=14)
    assert float(loss_normalizers(batch, cfg)["rl"]) == 8192.0
    keep = np.arange(lp.shape[0]) < lp.shape[0] // 2
    half = {k: np.asarray(v)[keep] for k, v in batch.items()}
    assert float(loss_normalizers(half, cfg)["rl"]) == 8192.0
    with pytest.raises(ValueError, match="rl_norm_constant"):
        loss_normalizers(batch, SRFTLossConfig(preset="luffy", rl_normalizer="constant"))
