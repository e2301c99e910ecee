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


def test_max_value_bounds_every_running_value():
    """The demo's task: every intermediate and final value is one digit (one token)."""
    rows = generate_problems(2000, seed=1, max_value=9)
    questions = set()
    for row in rows:
        question = row["prompt"][1]["content"].removeprefix("This is the problem: ")
        questions.add(question)
        value, partial, _ = evaluate_question(question)
        assert all(0 <= v <= 9 for v in partial)
        assert row["reward_model"]["ground_truth"] == str(value)
    # Independent count of the distinct train problems with 2-3 operands 0..9 and values in 0..9.
    def count(value, steps):  # operator/operand sequences from `value` that stay in 0..9
        if steps == 0:
            return 1
        return sum(count(value + x, steps - 1) for x in range(10) if value + x <= 9) + sum(
            count(value - x, steps - 1) for x in range(10) if value - x >= 0)
    total = sum(count(a, 1) + count(a, 2) for a in range(10))
    all_rows = generate_problems(5000, seed=0, max_value=9) + generate_problems(5000, seed=0, split="test",
                                                                                max_value=9)
    distinct = {r["prompt"][1]["content"] for r in all_rows}
    assert len(distinct) == total
    unbounded = {r["prompt"][1]["content"] for r in generate_problems(5000, seed=0)}
    assert any(evaluate_question(q.removeprefix("This is the problem: "))[0] > 9 for q in unbounded)


def test_generation_is_deterministic_and_splits_are_disjoint():
    assert generate_problems(50, seed=1) == generate_problems(50, seed=1)
    assert generate_problems(50, seed=1) != generate_problems(50, seed=2)
    train = {r["prompt"][1]["content"] for r in generate_problems(3000, seed=0)}
    test = {r["prompt"][1]["content"] for r in generate_problems(200, seed=0, split="test",
                                                                  balance_operands=False)}
    assert train.isdisjoint(test) and len(test) == 200  # without replacement while possible
    assert all(problem_split(q.removeprefix("This is the problem: ")) == "test" for q in test)


def _operand_count(row):
    return len(evaluate_question(row["prompt"][1]["content"].removeprefix("This is the problem: "))[2])


def test_operand_counts_are_balanced_and_distinct_sets_do_not_repeat():
    rows = generate_problems(4000, seed=0, max_value=9)
    share = sum(_operand_count(r) == 2 for r in rows) / len(rows)
    assert 0.45 < share < 0.55  # vs ~9% of the problems having 2 operands
    uniform = generate_problems(4000, seed=0, max_value=9, balance_operands=False)
    assert sum(_operand_count(r) == 2 for r in uniform) / len(uniform) < 0.15
    held_out = generate_problems(500, seed=0, split="test", max_value=9, distinct=True)
    questions = [r["prompt"][1]["content"] for r in held_out]
    assert len(questions) == len(set(questions)) < 500  # the whole split, once each
    everything = generate_problems(5000, seed=3, split="test", max_value=9)
    assert set(questions) == {r["prompt"][1]["content"] for r in everything}
    assert {_operand_count(r) for r in held_out} == {2, 3}


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
    with pytest.raises(ValueError, match="synthetic_max_value"):
        DataConfig.synthetic(synthetic_max_operand=9, synthetic_max_value=5)
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, seed=0, split="dev")
    with pytest.raises(ValueError, match="min_operands"):
        generate_problems(1, seed=0, min_operands=3, max_operands=2)
