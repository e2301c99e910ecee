"""Synthetic arithmetic task: problems, demonstrations, tokenizer, and the loader path."""

import re

import pytest

from srft_jax.data import (
    DataConfig,
    generate_problems,
    load_training_examples_from_config,
    make_synthetic_tokenizer,
    write_synthetic_dataset,
)
from srft_jax.data.synthetic import problem_split
from srft_jax.rewards import math_reward


def evaluate_question(question):
    """Independent reference: left-to-right + and - over the question's tokens."""
    tokens = question.removeprefix("What is ").removesuffix(" ?").split()
    value = int(tokens[0])
    partial = [value]
    for op, x in zip(tokens[1::2], tokens[2::2]):
        value = value + int(x) if op == "+" else value - int(x)
        partial.append(value)
    return value, partial, [int(t) for t in tokens[::2]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tok")
    make_synthetic_tokenizer(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def test_problems_are_correct_and_in_the_openr1_layout():
    rows = generate_problems(300, seed=0)
    assert len(rows) == 300
    for row in rows:
        question = row["prompt"][1]["content"].removeprefix("This is the problem: ")
        value, partial, operands = evaluate_question(question)
        assert 2 <= len(operands) <= 3 and all(0 <= x <= 9 for x in operands)
        assert min(partial) >= 0
        assert row["reward_model"]["ground_truth"] == str(value)
        demo = row["target"][0]["content"]
        assert demo.endswith(f"</think> \\boxed{{{value}}}")
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+) \.", demo)
        assert len(steps) == len(operands) - 1
        for a, op, b, c in steps:
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert row["prompt"][0]["role"] == "system" and row["target"][0]["role"] == "assistant"


def test_generation_is_deterministic_and_splits_are_disjoint():
    assert generate_problems(50, seed=1) == generate_problems(50, seed=1)
    assert generate_problems(50, seed=1) != generate_problems(50, seed=2)
    train = {r["prompt"][1]["content"] for r in generate_problems(3000, seed=0)}
    test = {r["prompt"][1]["content"] for r in generate_problems(200, seed=0, split="test")}
    assert train.isdisjoint(test) and len(test) == 200
    assert all(problem_split(q.removeprefix("This is the problem: ")) == "test" for q in test)


def test_tokenizer_is_small_and_reloads(tokenizer, tmp_path):
    fresh = make_synthetic_tokenizer()
    assert len(tokenizer) == len(fresh) < 128
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "What is 12 + 305 - 7 ?"
    assert tokenizer(text)["input_ids"] == fresh(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n")


def test_whole_pipeline_loads_and_demonstrations_earn_reward(tmp_path, tokenizer):
    paths = write_synthetic_dataset(str(tmp_path), n_train=400, n_test=50, seed=0)
    config = DataConfig.synthetic(paths["train"])
    examples, stats = load_training_examples_from_config(config, tokenizer)
    assert stats.kept == 400 and stats.skipped == {} and stats.demo_too_long == 0
    assert max(len(e.prompt_ids) for e in examples) <= 48
    assert max(len(e.demo_ids) for e in examples) <= 32
    unk = tokenizer.unk_token_id
    assert all(unk not in e.prompt_ids and unk not in e.demo_ids for e in examples)
    for e in examples[:50]:
        prompt = tokenizer.decode(list(e.prompt_ids), skip_special_tokens=False)
        assert prompt.endswith("<|im_start|> assistant <think>")
        response = tokenizer.decode(list(e.demo_ids), skip_special_tokens=False)
        assert response.endswith("<|im_end|>")
        assert math_reward(response, e.ground_truth) == 1.0
        wrong = str(int(e.ground_truth) + 1)
        assert math_reward(response, wrong) == 0.0
    test_examples, _ = load_training_examples_from_config(
        DataConfig.synthetic(paths["test"], split="test"), tokenizer)
    assert {e.question for e in test_examples}.isdisjoint({e.question for e in examples})


def test_argument_validation():
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, seed=0, split="dev")
    with pytest.raises(ValueError, match="min_operands"):
        generate_problems(1, seed=0, min_operands=3, max_operands=2)
