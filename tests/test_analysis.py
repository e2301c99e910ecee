"""`srft-jax analyze` (paper Section 3): token probabilities against a NumPy softmax of the
model's own logits, the summary figures against a NumPy reference, and exactly zero change
for a model compared with itself."""

import json

import jax
import numpy as np
import pytest

from srft_jax.analysis import ResponseSet, TokenScores, compare, load_responses, score_responses, token_kind
from srft_jax.cli import main
from srft_jax.data import mini_world
from srft_jax.data.synthetic import make_synthetic_tokenizer
from srft_jax.mesh import MeshConfig, make_mesh
from srft_jax.models import ModelConfig, create_sharded_model, save_pretrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny random models sharing the synthetic tokenizer, and a response file mixing
    demonstrations and other responses (two data sources)."""
    root = tmp_path_factory.mktemp("analysis")
    tokenizer = make_synthetic_tokenizer()
    for name, seed in (("base", 0), ("tuned", 1)):
        model = create_sharded_model(ModelConfig.tiny(vocab_size=len(tokenizer)), None, seed=seed)
        save_pretrained(model, str(root / name), tokenizer=tokenizer)
    rows = mini_world.set_rows("id", limit=5) + mini_world.set_rows("ood_operands", limit=4)
    rows[-1]["target"] = [{"role": "assistant", "content": "7 - 2 = 5 . </think> \\boxed{5}"}]
    for row in rows[5:]:
        row["data_source"] = "rollout"
    path = root / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def test_token_kind():
    special = {"<|im_end|>", "</think>"}
    assert token_kind("</think>", special) == "special"
    assert [token_kind(t, special) for t in ("7", "##4", "Ġ12")] == ["number"] * 3
    assert [token_kind(t, special) for t in ("+", "}", ".", "Ġ=")] == ["symbol"] * 4
    assert [token_kind(t, special) for t in ("What", "Ġx2", "\\boxed{")] == ["word"] * 3


def test_probabilities_are_the_softmax_of_the_models_logits(setup):
    from srft_jax.runs import load_model

    root, path = setup
    mesh = make_mesh(MeshConfig())
    model, tokenizer, template = load_model(str(root / "tuned"), mesh)
    responses = load_responses(str(path), tokenizer, template, 256, 32)
    with jax.set_mesh(mesh):
        scores = score_responses(model, responses, tokenizer.pad_token_id, batch_size=4)
    assert scores.prob.shape == responses.token_ids.shape == (sum(len(e.demo_ids) for e in responses.examples),)
    start = 0
    for e in responses.examples:  # one unpadded sequence at a time, full logits
        tokens = np.asarray([list(e.prompt_ids) + list(e.demo_ids)], np.int32)
        logits = np.asarray(model(tokens, mask=np.ones_like(tokens)), np.float64)[0]
        p = len(e.prompt_ids)
        for t, tok in enumerate(e.demo_ids):
            z = logits[p - 1 + t]
            q = np.exp(z - z.max())
            q /= q.sum()
            np.testing.assert_allclose(scores.prob[start + t], q[tok], rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(scores.entropy[start + t], -np.sum(q * np.log(q)), rtol=2e-4, atol=1e-5)
        start += len(e.demo_ids)


def test_summary_figures_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    n = 50
    base = TokenScores(rng.uniform(0, 1, n).astype(np.float32), rng.uniform(0, 2, n).astype(np.float32))
    tuned = TokenScores(np.clip(base.prob + rng.normal(0, 0.2, n), 0, 1).astype(np.float32),
                        rng.uniform(0, 2, n).astype(np.float32))
    source = np.asarray(["demo"] * 30 + ["rollout"] * 20, dtype=object)
    responses = ResponseSet([], rng.integers(0, 5, n).astype(np.int32),
                            rng.uniform(0, 1, n).astype(np.float32), source)
    kinds = np.asarray(["number", "symbol"] * 25, dtype=object)

    class Tok:
        def convert_ids_to_tokens(self, i):
            return f"t{i}"

    out = compare(base, tuned, responses, kinds, Tok(), threshold=0.1)
    d = tuned.prob.astype(np.float64) - base.prob.astype(np.float64)
    changed = np.abs(d) > 0.1
    assert out["tokens"] == n
    np.testing.assert_allclose(out["mean_abs_prob_change"], np.mean(np.abs(d)), rtol=1e-12)
    np.testing.assert_allclose(out["frac_tokens_changed"], changed.mean(), rtol=1e-12)
    np.testing.assert_allclose(out["frac_increased"] + out["frac_decreased"], changed.mean(), rtol=1e-12)
    np.testing.assert_allclose(out["changed_entropy"], tuned.entropy[changed].mean(), rtol=1e-6)
    np.testing.assert_allclose(out["changed_base_entropy"], base.entropy[changed].mean(), rtol=1e-6)
    np.testing.assert_allclose(out["by_source"]["rollout"]["frac_tokens_changed"], changed[30:].mean(), rtol=1e-12)
    np.testing.assert_allclose(out["by_kind"]["symbol"]["frac_tokens_changed"], changed[1::2].mean(), rtol=1e-12)
    for b in range(10):
        sel = (responses.position >= b / 10) & (responses.position < (b + 1) / 10)
        np.testing.assert_allclose(out["by_position"][b], changed[sel].mean() if sel.any() else 0.0, rtol=1e-12)
    assert sum(out["histogram"]) == n
    assert sum(c for _, c in out["top_changed_tokens"]) == changed.sum()


def test_cli_model_against_itself_is_exactly_zero(setup, tmp_path, capsys):
    root, path = setup
    out = tmp_path / "out"
    assert main(["analyze", "--base", str(root / "base"), "--models", f"{root / 'base'},{root / 'tuned'}",
                 "--names", "same,other", "--data", str(path), "--out", str(out),
                 "--max-prompt-len", "256", "--max-response-len", "32", "--batch-size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    same, other = summary["models"]["same"], summary["models"]["other"]
    assert same["tokens"] == other["tokens"] > 0
    assert same["mean_abs_prob_change"] == 0.0 and same["frac_tokens_changed"] == 0.0
    assert same["mean_entropy"] == same["base_mean_entropy"]
    assert other["mean_abs_prob_change"] > 0.0
    assert set(same["by_source"]) == {"mini_world", "rollout"}
    assert (out / "analysis.png").stat().st_size > 0
    assert '"model": "same"' in capsys.readouterr().out
