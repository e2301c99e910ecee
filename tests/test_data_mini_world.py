"""The mini Table 2's world: every set is what docs/mini-table2.md says, answers are right (an
independent left-to-right evaluator), and no held-out expression is ever trained on."""

import json
import re

import pytest

from srft_jax.data import mini_world
from srft_jax.rewards import math_reward


def expression(row):
    """The expression of a row's question, whatever its phrasing."""
    q = row["prompt"][-1]["content"].removeprefix("This is the problem: ")
    m = re.fullmatch(r"What is (.*) \?", q) or re.fullmatch(r"(.*) = \?", q)
    assert m, q
    return m.group(1), q.startswith("What is")


def evaluate(expr):
    """Reference: tokens a op b op c ... evaluated left to right; returns (value, running values)."""
    tokens = expr.split()
    value = int(tokens[0])
    running = [value]
    for op, x in zip(tokens[1::2], tokens[2::2]):
        value = {"+": value + int(x), "-": value - int(x), "*": value * int(x)}[op]
        running.append(value)
    return value, running, [int(t) for t in tokens[::2]], tokens[1::2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = mini_world.write_world(str(root), n_pretrain=3000, hard_fraction=0.1, eval_limit=50)
    rows = {}
    for name, path in paths.items():
        with open(path) as f:
            rows[name] = [json.loads(line) for line in f]
    return paths, rows


SPEC = {  # set: (operand count, allowed operator patterns, "What is" phrasing)
    "train": (3, {"+", "-"}, True),
    "val": (3, {"+", "-"}, True),
    "id": (3, {"+", "-"}, True),
    "ood_operands": (4, {"+", "-"}, True),
    "ood_operator": (3, {"*"}, True),
    "ood_phrasing": (3, {"+", "-"}, False),
}


@pytest.mark.parametrize("name", list(SPEC))
def test_sets_are_as_documented_and_their_answers_right(world, name):
    _, rows = world
    n_operands, ops_allowed, what = SPEC[name]
    assert rows[name]
    for row in rows[name]:
        expr, is_what = expression(row)
        value, running, operands, ops = evaluate(expr)
        assert is_what == what and len(operands) == n_operands
        assert all(1 <= x <= 9 for x in operands)  # no 0: a dropped operand never gives the answer
        assert all(0 <= v <= 9 for v in running)
        if name == "ood_operator":
            assert ops[0] == "*" and set(ops[1:]) <= {"+", "-", "*"}
        else:
            assert set(ops) <= ops_allowed
        assert row["reward_model"]["ground_truth"] == str(value)
        demo = row["target"][0]["content"]
        assert math_reward(demo, str(value)) == 1.0
        assert len(re.findall(r" = \d \.", demo)) == n_operands - 1


def test_held_out_expressions_are_never_trained_on(world):
    _, rows = world
    seen = {expression(r)[0] for name in ("pretrain", "train") for r in rows[name]}
    for name in ("val", "id", "ood_operands", "ood_operator", "ood_phrasing"):
        assert not seen & {expression(r)[0] for r in rows[name]}, name
    ids = {expression(r)[0] for r in rows["id"]}
    assert {expression(r)[0] for r in rows["ood_phrasing"]} <= {expression(r)[0] for r in mini_world.set_rows("id")}
    assert not ids & {expression(r)[0] for r in rows["val"]}


def test_pretraining_mixture(world):
    _, rows = world
    steps = [len(evaluate(expression(r)[0])[2]) - 1 for r in rows["pretrain"]]
    hard = sum(s == 2 for s in steps) / len(steps)
    assert set(steps) == {1, 2} and 0.08 < hard < 0.12  # hard_fraction=0.1
    one_step = [r for r, s in zip(rows["pretrain"], steps) if s == 1]
    assert {evaluate(expression(r)[0])[3][0] for r in one_step} == {"+", "-", "*"}
    assert {expression(r)[1] for r in one_step} == {True, False}  # both phrasings
    assert all(expression(r)[1] for r, s in zip(rows["pretrain"], steps) if s == 2)  # "What is" only


def test_layout_and_limits(world):
    paths, rows = world
    assert paths["pretrain"].endswith("pretrain/train.jsonl") and paths["train"].endswith("finetune/train.jsonl")
    assert len(rows["train"]) == len(mini_world.set_problems("train"))
    assert all(len(rows[n]) == 50 for n in mini_world.EVAL_SETS + ("val",))
    with pytest.raises(ValueError, match="unknown set"):
        mini_world.set_problems("nope")
    with pytest.raises(ValueError, match="hard_fraction"):
        mini_world.pretrain_rows(10, 0, 1.5)
