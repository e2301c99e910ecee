"""Reward semantics: the paper's math rule on team-written cases, extraction, MC grader.

Expected values are what a careful human grader says for each (response, ground truth);
Math-Verify is the comparator the paper prescribes, so these cases pin down both our
extraction (``</think>`` tail, last complete ``\\boxed{}``) and the comparison.
"""

import subprocess
import sys

import pytest

from srft_jax.rewards import (
    extract_choice_letter,
    extract_math_answer,
    gold_for_parse,
    last_boxed_content,
    math_reward,
    multiple_choice_reward,
    response_tail,
)

T = "</think> "
MATH_CASES = [
    # fractions
    (T + r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),
    (T + r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    (T + r"\boxed{1/2}", r"\frac12", 1.0),
    (T + r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (T + r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0),
    (T + r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    (T + r"\boxed{-\frac{3}{4}}", "-0.75", 1.0),
    (T + r"\boxed{\tfrac{3}{4}}", r"\frac{3}{4}", 1.0),
    (T + r"\boxed{\frac{7}{3}}", r"2\frac{1}{3}", 1.0),
    # decimals
    (T + r"\boxed{3.14}", "3.14", 1.0),
    (T + r"\boxed{3.0}", "3", 1.0),
    (T + r"\boxed{2.5}", r"\frac{5}{2}", 1.0),
    (T + r"\boxed{0.25}", "0.2", 0.0),
    (T + r"\boxed{.5}", "0.5", 1.0),
    # integers
    (T + r"\boxed{42}", "42", 1.0),
    (T + r"\boxed{41}", "42", 0.0),
    (T + r"\boxed{-7}", "-7", 1.0),
    (T + r"\boxed{7}", "-7", 0.0),
    (T + r"\boxed{1000}", "1000", 1.0),
    # LaTeX forms
    (T + r"\boxed{\sqrt{2}}", r"\sqrt{2}", 1.0),
    (T + r"\boxed{\sqrt 2}", r"\sqrt{2}", 1.0),
    (T + r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (T + r"\boxed{3\sqrt{3}}", r"\sqrt{27}", 1.0),
    (T + r"\boxed{\pi}", r"\pi", 1.0),
    (T + r"\boxed{2\pi}", r"2\pi", 1.0),
    (T + r"\boxed{\frac{\pi}{2}}", r"\pi/2", 1.0),
    (T + r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (T + r"\boxed{x^2+1}", "(x+1)^2", 0.0),
    (T + r"\boxed{10^{3}}", "1000", 1.0),
    (T + r"\boxed{2^{10}}", "1024", 1.0),
    (T + r"\boxed{\binom{5}{2}}", "10", 1.0),
    (T + r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    (T + r"\boxed{\infty}", r"\infty", 1.0),
    (T + r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
    # units
    (T + r"\boxed{10\text{ cm}}", "10", 1.0),
    (T + r"\boxed{5 \text{ meters}}", "5", 1.0),
    (T + r"\boxed{12 \mathrm{kg}}", "12", 1.0),
    (T + r"\boxed{\$25}", "25", 1.0),
    (T + r"\boxed{90^\circ}", "90", 1.0),
    (T + r"\boxed{11\text{ cm}}", "10", 0.0),
    # sets
    (T + r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", 1.0),
    (T + r"\boxed{\{1,2\}}", r"\{1,2,3\}", 0.0),
    (T + r"\boxed{1, 2}", "2, 1", 1.0),
    (T + r"\boxed{\left\{1, 2\right\}}", r"\{1,2\}", 1.0),
    # intervals
    (T + r"\boxed{(1, 2]}", "(1,2]", 1.0),
    (T + r"\boxed{[1, 2)}", "(1,2]", 0.0),
    (T + r"\boxed{(-\infty, 3)}", r"(-\infty,3)", 1.0),
    (T + r"\boxed{[0,1] \cup [2,3]}", r"[0,1]\cup[2,3]", 1.0),
    # equations
    (T + r"\boxed{x=2}", "2", 1.0),
    (T + r"\boxed{2}", "x=2", 1.0),
    (T + r"\boxed{y = 2x+1}", "y=2x+1", 1.0),
    # wrong or empty answers
    (T + r"\boxed{43}", "42", 0.0),
    (T + r"\boxed{\frac{1}{2}}", "2", 0.0),
    (T + r"\boxed{}", "5", 0.0),
    (T + "I don't know.", "5", 0.0),
    (T + r"\boxed{5}", "", 0.0),
    # missing </think> scores 0 whatever the answer
    (r"\boxed{42}", "42", 0.0),
    (r"<think> reasoning \boxed{42}", "42", 0.0),
    ("", "42", 0.0),
    ("</think>", "42", 0.0),
    # only the text after </think> counts
    (r"<think> maybe \boxed{42} </think> so \boxed{41}", "42", 0.0),
    (r"<think> maybe \boxed{41} </think> so \boxed{42}", "42", 1.0),
    (r"</think> \boxed{1} </think> \boxed{2}", "2", 1.0),
    # nested boxes and nested braces
    (T + r"\boxed{\boxed{42}}", "42", 1.0),
    (T + r"\boxed{\frac{\sqrt{\frac{1}{4}}}{2}}", r"\frac14", 1.0),
    (T + r"\boxed{\frac{1}{\frac{1}{2}}}", "2", 1.0),
    # several boxes: the last complete one counts
    (T + r"first \boxed{41}, corrected: \boxed{42}", "42", 1.0),
    (T + r"first \boxed{42}, corrected: \boxed{41}", "42", 0.0),
    (T + r"\boxed{42} and then a truncated \boxed{4", "42", 1.0),
    # no box: the whole tail goes to Math-Verify
    (T + "The answer is 42.", "42", 1.0),
    (T + r"So $x = \frac{1}{2}$.", r"\frac{1}{2}", 1.0),
    (T + "The answer is $41$.", "42", 0.0),
    # ground truths that already carry delimiters
    (T + r"\boxed{3}", "$3$", 1.0),
    (T + r"\boxed{3}", r"\boxed{3}", 1.0),
    # text decoded by the synthetic tokenizer
    (T + r"\boxed{ 6 }", "6", 1.0),
    (r"3 + 5 = 8 . 8 + 6 = 14 . </think> \boxed{ 14 } <|im_end|>", "14", 1.0),
]


def test_at_least_sixty_cases():
    assert len(MATH_CASES) >= 60
    assert {e for _, _, e in MATH_CASES} == {0.0, 1.0}


@pytest.mark.parametrize("response,truth,expected", MATH_CASES)
def test_math_reward(response, truth, expected):
    assert math_reward(response, truth) == expected


def test_math_reward_rejects_non_strings():
    assert math_reward(None, "1") == 0.0
    assert math_reward("</think> \\boxed{1}", 1) == 0.0


@pytest.mark.parametrize("text,expected", [
    (r"a \boxed{1} b", "1"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{1} \boxed{2}", "2"),
    (r"\boxed{\boxed{3}}", r"\boxed{3}"),
    (r"\boxed{1} \boxed{2", "1"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{a \} b}", r"a \} b"),
    (r"\boxed {7}", "7"),
    ("no box here", None),
    (r"\boxed{", None),
    (r"}} \boxed{5} {{", "5"),
])
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


def test_last_boxed_content_is_linear_on_adversarial_input():
    import time
    text = r"\boxed{" * 200_000 + "x"
    start = time.perf_counter()
    assert last_boxed_content(text) is None
    assert time.perf_counter() - start < 2.0


def test_tail_and_answer_extraction():
    assert response_tail("no think") is None
    assert response_tail("a </think> b </think> c") == " c"
    assert extract_math_answer("x </think> y") == " y"
    assert extract_math_answer(r"</think> so \boxed{4}.") == r"\boxed{4}"
    assert extract_math_answer(r"\boxed{4}") is None


@pytest.mark.parametrize("gold,expected", [
    ("3", r"\boxed{3}"),
    (" (1,2] ", r"\boxed{(1,2]}"),
    ("$3$", "$3$"),
    (r"\boxed{3}", r"\boxed{3}"),
    (r"\(x\)", r"\(x\)"),
])
def test_gold_for_parse(gold, expected):
    assert gold_for_parse(gold) == expected


MC_CASES = [
    (r"</think> \boxed{C}", "C", 1.0),
    (r"</think> \boxed{(C)}", "C", 1.0),
    (r"</think> \boxed{\text{C}}", "C", 1.0),
    (r"</think> \boxed{\textbf{(D)}}", "D", 1.0),
    (r"</think> \boxed{C. 42 apples}", "C", 1.0),
    (r"</think> \boxed{C}", "B", 0.0),
    ("</think> The answer is (B).", "B", 1.0),
    ("</think> the answer is B", "B", 1.0),
    ("</think> Answer: J", "J", 1.0),
    ("</think> The correct answer is: (E)", "E", 1.0),
    ("</think> **Answer:** G", "G", 1.0),
    ("</think> The answer is option C.", "C", 1.0),
    ("</think> The answer is (b)", "B", 1.0),
    ("The answer is (A). On reflection the answer is (D).", "D", 1.0),
    ("The answer is (A). On reflection the answer is (D).", "A", 0.0),
    (r"<think> \boxed{A} </think> \boxed{B}", "B", 1.0),
    (r"<think> \boxed{A} </think> \boxed{B}", "A", 0.0),
    ("</think> I think the answer is a number", "A", 0.0),
    (r"</think> \boxed{42}", "A", 0.0),
    ("</think> no idea", "A", 0.0),
    (r"</think> \boxed{C}", "(c)", 1.0),
    (r"</think> \boxed{K}", "K", 0.0),  # beyond the 10 letters of MMLU-Pro
]


@pytest.mark.parametrize("response,letter,expected", MC_CASES)
def test_multiple_choice_reward(response, letter, expected):
    assert multiple_choice_reward(response, letter) == expected


def test_extract_choice_letter():
    assert extract_choice_letter(r"</think> \boxed{E}") == "E"
    assert extract_choice_letter("nothing") is None


def test_rewards_module_imports_no_jax():
    code = "import sys, srft_jax.rewards; sys.exit(1 if 'jax' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_rewards_source_never_evaluates_strings():
    import inspect

    import srft_jax.rewards as rewards

    source = inspect.getsource(rewards)
    for forbidden in ("eval(", "exec(", "sympify(", "parse_expr("):
        assert forbidden not in source
