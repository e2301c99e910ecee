"""Evaluation loaders: every benchmark from a local fixture in its hub layout, the
normalised schema, seeded option shuffling, bad rows."""

import json
import random

import pytest

from srft_jax.data.eval_sets import BENCHMARKS, EvalItem, format_question, load_benchmark


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# Hand-written rows in each benchmark's hub column layout (not copied from the datasets).
HUB_ROWS = {
    "aime24": [{"id": 60, "problem": "Find x if x + 1 = 3.", "solution": "...", "answer": "2",
                "url": "u", "year": "2024"}],
    "amc": [{"id": 0, "problem": "Compute 2 * 71.", "answer": 142.0, "url": "u"}],
    "math500": [{"problem": "What is 1/2 + 1/4?", "solution": "...", "answer": "\\frac{3}{4}",
                 "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}],
    "minerva": [{"question": "A mass of 2 kg moves at 3 m/s. Its momentum?", "answer": "6"}],
    "olympiad": [{"id": 1606, "question": "Find all x with x^2 = 1.",
                  "final_answer": ["$1$", "$-1$"], "is_multiple_answer": True}],
    # the layout of the TFDS catalog and of openai/gsm8k: a rationale, then "#### N"
    "gsm8k": [{"question": "Ann has 3 bags of 400 pens. How many pens?",
               "answer": "3 * 400 = <<3*400=1200>>1200 pens.\n#### 1,200"}],
}
MC_ROWS = {
    "arc_c": [{"id": "Q1", "question": "Which is a liquid at room temperature?",
               "choices": {"text": ["iron", "water", "salt", "sand"], "label": ["A", "B", "C", "D"]},
               "answerKey": "B"},
              {"id": "Q2", "question": "How many legs has a spider?",
               "choices": {"text": ["4", "6", "8", "10"], "label": ["1", "2", "3", "4"]},
               "answerKey": "3"}],
    "gpqa_diamond": [{"Record ID": "rec1", "Question": "Which particle is charged?",
                      "Correct Answer": "electron", "Incorrect Answer 1": "neutron",
                      "Incorrect Answer 2": "photon", "Incorrect Answer 3": "neutrino"}],
    "mmlu_pro": [{"question_id": 70, "question": "2 + 2 = ?",
                  "options": ["1", "2", "3", "5", "6", "7", "8", "9", "4", "0"],
                  "answer": "I", "answer_index": 8, "category": "math"}],
}
CORRECT_TEXT = {"arc_c": ["water", "8"], "gpqa_diamond": ["electron"], "mmlu_pro": ["4"]}


@pytest.mark.parametrize("name,expected", [
    ("aime24", [("60", "Find x if x + 1 = 3.", "2")]),
    ("amc", [("0", "Compute 2 * 71.", "142")]),
    ("math500", [("test/algebra/1.json", "What is 1/2 + 1/4?", "\\frac{3}{4}")]),
    ("minerva", [("minerva-0", "A mass of 2 kg moves at 3 m/s. Its momentum?", "6")]),
    ("olympiad", [("1606", "Find all x with x^2 = 1.", "1, -1")]),
    ("gsm8k", [("gsm8k-0", "Ann has 3 bags of 400 pens. How many pens?", "1200")]),
])
def test_math_benchmarks_from_hub_layout(tmp_path, name, expected):
    items = load_benchmark(name, path=write(tmp_path / f"{name}.jsonl", HUB_ROWS[name]))
    assert [(i.id, i.question, i.answer) for i in items] == expected
    assert all(i.kind == "math" and i.options is None for i in items)


@pytest.mark.parametrize("name", sorted(MC_ROWS))
def test_mc_benchmarks_from_hub_layout(tmp_path, name):
    items = load_benchmark(name, path=write(tmp_path / f"{name}.jsonl", MC_ROWS[name]), seed=0)
    assert len(items) == len(MC_ROWS[name])
    for item, correct in zip(items, CORRECT_TEXT[name]):
        assert item.kind == "mc"
        assert item.options[ord(item.answer) - ord("A")] == correct


def test_every_benchmark_has_a_fixture():
    assert set(HUB_ROWS) | set(MC_ROWS) | {"openr1"} == set(BENCHMARKS)


def test_hub_ids_are_documented():
    import srft_jax.data.eval_sets as mod
    for spec in BENCHMARKS.values():
        if spec.hf_id:
            assert spec.hf_id in mod.__doc__


@pytest.mark.parametrize("name", sorted(n for n, s in BENCHMARKS.items() if s.hf_id))
def test_hub_source_uses_the_documented_id(monkeypatch, name):
    import datasets

    calls = []
    rows = HUB_ROWS.get(name) or MC_ROWS[name]

    def fake_load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = load_benchmark(name)
    spec = BENCHMARKS[name]
    assert calls == [(spec.hf_id, spec.hf_name, spec.split)] and len(items) == len(rows)


def test_normalised_schema(tmp_path):
    math = load_benchmark("math500", path=write(tmp_path / "m.jsonl", [
        {"id": "a", "question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": 4}]))
    assert [(i.id, i.answer) for i in math] == [("a", "2"), ("math500-1", "4")]
    mc = load_benchmark("mmlu_pro", path=write(tmp_path / "c.jsonl", [
        {"id": "x", "question": "q", "options": ["a", "b", "c"], "answer": "C"},
        {"id": "y", "question": "q", "options": ["a", "b", "c"], "answer": "b"},
        {"id": "z", "question": "q", "options": ["a", "b", "c"], "answer": "(A)"}]))
    assert [i.options[ord(i.answer) - 65] for i in mc] == ["c", "b", "a"]


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(MC_ROWS["mmlu_pro"]), tmp_path / "m.parquet")
    (item,) = load_benchmark("mmlu_pro", path=str(tmp_path / "m.parquet"))
    assert item.options[ord(item.answer) - 65] == "4"


def many_mc_rows(n):
    return [{"id": f"r{i}", "question": f"q{i}", "options": [f"o{i}-{k}" for k in range(4)],
             "answer": "A"} for i in range(n)]


def test_option_shuffle_is_seeded_and_order_independent(tmp_path):
    rows = many_mc_rows(40)
    path = write(tmp_path / "a.jsonl", rows)
    first = load_benchmark("arc_c", path=path, seed=3)
    again = load_benchmark("arc_c", path=path, seed=3)
    assert first == again
    reversed_items = load_benchmark("arc_c", path=write(tmp_path / "b.jsonl", rows[::-1]), seed=3)
    assert sorted(first, key=lambda i: i.id) == sorted(reversed_items, key=lambda i: i.id)
    other = load_benchmark("arc_c", path=path, seed=4)
    assert any(a.options != b.options for a, b in zip(first, other))
    # the correct option ("o{i}-0") keeps its text and lands on every letter sometimes
    for item, row in zip(first, rows):
        assert sorted(item.options) == sorted(row["options"])
        assert item.options[ord(item.answer) - 65] == row["options"][0]
    assert {i.answer for i in first} == set("ABCD")
    # independent reference for one item
    order = list(range(4))
    random.Random("3:arc_c:r0").shuffle(order)
    assert first[0].options == tuple(rows[0]["options"][k] for k in order)


def test_bad_rows_are_counted_and_all_bad_fails(tmp_path, caplog):
    rows = HUB_ROWS["aime24"] + [{"problem": "no answer"}, {"answer": "1"}, {"problem": "", "answer": "1"},
                                 {"problem": "q", "answer": ["  "]}]
    with caplog.at_level("WARNING"):
        items = load_benchmark("aime24", path=write(tmp_path / "a.jsonl", rows))
    assert len(items) == 1
    assert "missing_answer" in caplog.text and "missing_question" in caplog.text
    bad_mc = [{"question": "q", "options": ["a", "b"], "answer": "E"}, {"question": "q", "options": "ab", "answer": "A"}]
    with pytest.raises(ValueError, match=r"no usable arc_c items.*bad_answer"):
        load_benchmark("arc_c", path=write(tmp_path / "b.jsonl", bad_mc))


def test_unknown_name_and_local_only(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("aime25")
    with pytest.raises(ValueError, match="path="):
        load_benchmark("openr1")


def test_openr1_layout_and_format_question(tmp_path):
    row = {"prompt": [{"role": "system", "content": "s"},
                      {"role": "user", "content": "This is the problem: What is 2 + 2 ?"}],
           "reward_model": {"ground_truth": "4"}}
    (item,) = load_benchmark("openr1", path=write(tmp_path / "t.jsonl", [row]))
    assert (item.question, item.answer) == ("What is 2 + 2 ?", "4")
    assert format_question(item) == "What is 2 + 2 ?"
    mc = EvalItem("1", "Pick one.", "B", ("x", "y"), "mc")
    assert format_question(mc) == "Pick one.\n\nA. x\nB. y"
    with pytest.raises(ValueError):
        EvalItem("1", "q", "A", None, "mc")
