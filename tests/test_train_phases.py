"""The loop's phases called one by one on the demo task: each takes and returns plain typed
values, so a step can be taken apart and checked without the command line."""

import jax
import numpy as np
import pytest

from srft_jax.config import load_config, resolve_config_path
from srft_jax.data.tokenizer import decode_response
from srft_jax.train import (Rollouts, assemble, init_or_restore, next_prompts, sample_rollouts, score,
                            setup_run, update)

pytestmark = pytest.mark.compat

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=1", "train.prompts_per_step=4", "train.rollouts_per_prompt=3",
        "train.updates_per_step=2", "train.micro_batch_size=4", "train.progress_bar=false",
        "train.reward_workers=1", "train.tensorboard=false", "eval.every=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config(resolve_config_path("demo"),
                      [f"train.run_dir={tmp_path_factory.mktemp('phases')}", *TINY])
    run = setup_run(cfg)
    yield run
    run.close()


def test_one_step_phase_by_phase(run):
    with jax.set_mesh(run.mesh):
        state = init_or_restore(run)
        assert state.step == 0 and state.skipped_updates == 0
        prompts = next_prompts(run)
        assert len(prompts.examples) == 4 and prompts.width == 24
        np.testing.assert_array_equal(prompts.index, [0, 1, 2, 3])

        rollouts = sample_rollouts(run, state, prompts, step=1)
        assert len(rollouts.tokens) == len(rollouts.texts) == 12  # 4 prompts x 3, prompt-major
        assert all(len(lp) == len(t) for lp, t in zip(rollouts.old_logprobs, rollouts.tokens))
        assert all(lp.max(initial=-1.0) <= 0 for lp in rollouts.old_logprobs)

        # Scoring: replace rollout 0 of each prompt by that prompt's demonstration, which verifies.
        demo_texts = [decode_response(run.tokenizer, e.demo_ids, run.stop_ids) for e in prompts.examples]
        texts = list(rollouts.texts)
        for i, text in enumerate(demo_texts):
            texts[3 * i] = text
        scripted = Rollouts(rollouts.tokens, rollouts.old_logprobs, rollouts.stopped, texts)
        scores = score(run, prompts, scripted)
        assert scores.demos == [1.0] * 4
        assert [scores.rollouts[3 * i] for i in range(4)] == [1.0] * 4

        minibatches = assemble(run, prompts, scripted, scores)
        assert len(minibatches.batches) == 2  # two updates of 2 prompts, 4 rows each
        assert minibatches.widths == (24, 24)
        for u, batch in enumerate(minibatches.batches):
            b = jax.tree.map(lambda a: np.asarray(a).reshape((-1,) + np.asarray(a).shape[2:]), batch)
            assert b.is_demo.tolist() == [False, False, False, True] * 2
            assert b.group.tolist() == [0] * 4 + [1] * 4
            rewards = np.asarray(scores.rollouts, np.float32).reshape(4, 3)[2 * u:2 * u + 2]
            want = np.concatenate([rewards, np.ones((2, 1), np.float32)], axis=1)  # + the demo
            np.testing.assert_array_equal(b.reward.reshape(2, 4), want)
            # The demo config's `official` preset: A = r - mean over the augmented group (no std).
            np.testing.assert_allclose(b.advantage.reshape(2, 4), want - want.mean(1, keepdims=True),
                                       atol=1e-6)
        assert minibatches.tokens == sum(len(t) for t in scripted.tokens) + sum(len(e.demo_ids)
                                                                               for e in prompts.examples)

        before = jax.tree.map(np.asarray, state.params)
        after, metrics = update(run, state, minibatches)
        assert after.step == 1 and after.skipped_updates == 0
        assert np.isfinite(metrics["loss"]) and metrics["train/lr"] > 0
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, after.params)
        assert all(jax.tree.leaves(changed))
