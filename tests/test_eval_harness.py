"""The evaluation harness end to end with a scripted policy: exact table, per-item records,
resume after an interruption, torn cache lines, settings mismatch, run comparison."""

import json
import os

import pytest

from srft_jax.data.eval_sets import load_benchmark
from srft_jax.data.prompts import PromptTemplate
from srft_jax.evaluation import CacheMismatch, EvalProtocol, evaluate
from srft_jax.evaluation.harness import benchmark_path, cache_path, item_seed, load_benchmarks, load_cache
from srft_jax.evaluation.report import COLUMNS, compare, render_table
from srft_jax.rewards import RewardPool
from srft_jax.testing import ScriptedPolicy, ScriptInterrupted, make_byte_tokenizer


def right(ans):
    return f"<think>\nLet me compute.\n</think>\nThe answer is \\boxed{{{ans}}}."


def wrong_no_think(ans):  # correct box but no </think>: scores 0 by the paper's rule
    return f"<think>\nI think it is \\boxed{{{ans}}}"


MATH500 = [("m1", "What is 1+1?", "2"), ("m2", "Compute 3*4.", "12"),
           ("m3", "Simplify 6/4.", "\\frac{3}{2}")]
AIME = [("a1", "Find x if x+5=9.", "4"), ("a2", "How many primes are below 10?", "4")]
ARC = [("q1", "Which is a liquid at room temperature?", ["iron", "water", "salt", "sand"], 1),
       ("q2", "How many legs has a spider?", ["4", "6", "8", "10"], 2)]
GPQA = [("g1", "Which particle is charged?", ["electron", "neutron", "photon", "neutrino"], 0)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout=10.0) as p:
        yield p


@pytest.fixture
def benchmarks(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "math500.jsonl", [{"id": i, "question": q, "answer": a} for i, q, a in MATH500])
    write_jsonl(data / "aime24.jsonl", [{"id": i, "question": q, "answer": a} for i, q, a in AIME])
    write_jsonl(data / "arc_c.jsonl", [{"id": i, "question": q, "options": o, "answer": "ABCD"[c]}
                                       for i, q, o, c in ARC])
    write_jsonl(data / "gpqa_diamond.jsonl", [{"id": i, "question": q, "options": o, "answer": "ABCD"[c]}
                                              for i, q, o, c in GPQA])
    return {name: load_benchmark(name, path=str(data / f"{name}.jsonl"))
            for name in ("aime24", "math500", "arc_c", "gpqa_diamond")}


def script_for(benchmarks):
    """Known answers: math500 2/3 right, aime24 (4 samples) 3/4 and 1/4, arc_c 1/2, gpqa 1/1."""
    arc = {i.id: i for i in benchmarks["arc_c"]}
    gpqa = benchmarks["gpqa_diamond"][0]
    other = {"A": "B", "B": "C", "C": "D", "D": "A"}
    return {
        "What is 1+1?": [right("2")],
        "Compute 3*4.": [wrong_no_think("12")],
        "Simplify 6/4.": [right("1.5")],  # equivalent to \frac{3}{2} under Math-Verify
        "Find x if x+5=9.": [right("4"), right("5"), right("4"), right(" 4")],
        "How many primes are below 10?": [right("5"), right("5"), right("4"), right("6")],
        "Which is a liquid at room temperature?": [right(arc["q1"].answer)],
        "How many legs has a spider?": [right(other[arc["q2"].answer])],
        "Which particle is charged?": [f"<think>\nhmm</think>\nThe answer is ({gpqa.answer})."],
    }


PROTOCOL = EvalProtocol(samples=("aime24=4",), batch_size=4, max_new_tokens=64,
                        template=PromptTemplate(system_prompt="Answer in \\boxed{}."))
EXPECTED_ROW = "| scripted | 50.0 | - | 66.7 | - | - | 58.3 | 50.0 | 100.0 | - | 75.0 |"


def test_end_to_end_table_and_records(tmp_path, tokenizer, pool, benchmarks):
    out = tmp_path / "eval"
    policy = ScriptedPolicy(script_for(benchmarks), tokenizer)
    results = evaluate(policy, benchmarks, tokenizer, str(out), PROTOCOL, model_name="scripted",
                       pool=pool, progress=False)

    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert table.splitlines()[2] == EXPECTED_ROW
    assert render_table([("scripted", results.accuracies())]).splitlines()[2] == EXPECTED_ROW

    data = json.loads((out / "results.json").read_text())
    aime = data["benchmarks"]["aime24"]
    assert aime["num_items"] == 2 and aime["num_samples"] == 4
    # item a1: 3/4 right, majority "4" right; a2: 1/4 right, majority "5" wrong
    assert aime["metrics"] == pytest.approx({"accuracy": 0.5, "avg@4": 0.5, "pass@1": 0.5,
                                             "pass@2": (1 + 0.5) / 2, "pass@4": 1.0, "maj@4": 0.5})
    assert data["benchmarks"]["math500"]["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert data["benchmarks"]["math500"]["no_answer"] == pytest.approx(1 / 3)
    assert data["averages"] == pytest.approx({"avg": (0.5 + 2 / 3) / 2, "ood_avg": 0.75})
    assert data["protocol"]["temperature"] == 0.6 and data["model"] == "scripted"

    # Per-item records: responses, rewards, token lengths (one byte per token), votes.
    records = [json.loads(line) for line in (out / "aime24.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["a1", "a2"]
    a1 = records[0]
    assert a1["rewards"] == [1.0, 0.0, 1.0, 1.0]
    assert a1["extracted"] == ["4", "5", "4", " 4"]
    assert a1["lengths"] == [len(t.encode()) for t in a1["responses"]]
    assert a1["truncated"] == [False] * 4 and a1["answer"] == "4"
    arc = [json.loads(line) for line in (out / "arc_c.jsonl").read_text().splitlines()]
    q1 = benchmarks["arc_c"][0]
    assert arc[0]["question"].startswith(q1.question + "\n\nA. ")  # options shown with letters
    assert arc[0]["extracted"] == [q1.answer] and arc[0]["rewards"] == [1.0]

    # The policy saw the training prompt and the protocol's sampling settings.
    assert policy.samplings[0].temperature == 0.6 and policy.samplings[0].max_new_tokens == 64
    assert len(policy.answered) == 8
    first_prompt = tokenizer.decode(policy.prompts[0])
    assert first_prompt == PromptTemplate(system_prompt="Answer in \\boxed{}.").text(tokenizer, "Find x if x+5=9.")
    assert first_prompt.endswith("This is the problem: Find x if x+5=9.<|im_end|>\n"
                                 "<|im_start|>assistant\n<think>\n")


def test_resume_recomputes_nothing_finished(tmp_path, tokenizer, pool, benchmarks):
    items = {"math500": [type(i)(f"{i.id}-{k}", f"{i.question} (copy {k})", i.answer, None, "math")
                         for k in range(2) for i in benchmarks["math500"]]}  # 6 items
    script = {f"{q} (copy {k})": [right(a)] for k in range(2) for _, q, a in MATH500}
    protocol = EvalProtocol(batch_size=2, max_new_tokens=64)  # 2 items per policy call
    out = str(tmp_path / "eval")

    first = ScriptedPolicy(script, tokenizer, fail_after=4)
    with pytest.raises(ScriptInterrupted):
        evaluate(first, items, tokenizer, out, protocol, pool=pool, progress=False)
    assert first.calls == 2 and len(first.answered) == 4
    cached = load_cache(cache_path(out, "math500"), protocol.settings("math500"))
    assert sorted(cached) == sorted(i.id for i in items["math500"][:4])
    assert not os.path.exists(os.path.join(out, "results.json"))

    second = ScriptedPolicy(script, tokenizer)
    resumed = evaluate(second, items, tokenizer, out, protocol, pool=pool, progress=False)
    assert second.answered == [i.question for i in items["math500"][4:]]  # only the rest
    assert second.calls == 1
    assert second.seeds == [item_seed(0, "math500", i.id) for i in items["math500"][4:]]
    assert first.seeds == [item_seed(0, "math500", i.id) for i in items["math500"][:4]]
    assert [r["id"] for r in resumed.benchmarks["math500"].records] == [i.id for i in items["math500"]]

    fresh = evaluate(ScriptedPolicy(script, tokenizer), items, tokenizer, str(tmp_path / "fresh"),
                     protocol, pool=pool, progress=False)
    assert resumed.benchmarks["math500"].metrics == fresh.benchmarks["math500"].metrics
    assert resumed.benchmarks["math500"].metrics["accuracy"] == 1.0

    third = ScriptedPolicy(script, tokenizer)  # everything cached: no generation at all
    evaluate(third, items, tokenizer, out, protocol, pool=pool, progress=False)
    assert third.calls == 0


def test_torn_last_line_is_recomputed(tmp_path, tokenizer, pool, benchmarks):
    items = {"math500": benchmarks["math500"]}
    script = script_for(benchmarks)
    protocol = EvalProtocol(batch_size=1, max_new_tokens=64)
    out = str(tmp_path / "eval")
    with pytest.raises(ScriptInterrupted):
        evaluate(ScriptedPolicy(script, tokenizer, fail_after=2), items, tokenizer, out, protocol,
                 pool=pool, progress=False)
    path = cache_path(out, "math500")
    lines = open(path).read().splitlines()
    with open(path, "w") as f:  # a kill in the middle of writing the second line
        f.write(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    assert list(load_cache(path, protocol.settings("math500"))) == ["m1"]
    policy = ScriptedPolicy(script, tokenizer)
    evaluate(policy, items, tokenizer, out, protocol, pool=pool, progress=False)
    assert policy.answered == ["Compute 3*4.", "Simplify 6/4."]
    ids = [json.loads(line)["id"] for line in open(path).read().splitlines()]
    assert ids == ["m1", "m2", "m3"]


def test_other_settings_in_the_same_directory_are_refused(tmp_path, tokenizer, pool, benchmarks):
    items = {"math500": benchmarks["math500"]}
    policy = ScriptedPolicy(script_for(benchmarks), tokenizer)
    out = str(tmp_path / "eval")
    evaluate(policy, items, tokenizer, out, EvalProtocol(max_new_tokens=64), pool=pool, progress=False)
    with pytest.raises(CacheMismatch, match="temperature"):
        evaluate(policy, items, tokenizer, out, EvalProtocol(max_new_tokens=64, temperature=1.0),
                 pool=pool, progress=False)


def test_compare_two_runs(tmp_path, tokenizer, pool, benchmarks):
    script = script_for(benchmarks)
    evaluate(ScriptedPolicy(script, tokenizer), benchmarks, tokenizer, str(tmp_path / "a"),
             PROTOCOL, model_name="scripted", pool=pool, progress=False)
    better = dict(script, **{"Compute 3*4.": [right("12")]})
    evaluate(ScriptedPolicy(better, tokenizer), {"math500": benchmarks["math500"]}, tokenizer,
             str(tmp_path / "b"), PROTOCOL, model_name="better", pool=pool, progress=False)
    lines = compare(str(tmp_path / "a"), str(tmp_path / "b")).splitlines()
    assert lines[2] == EXPECTED_ROW
    assert lines[3] == "| better | - | - | 100.0 | - | - | 100.0 | - | - | - | - |"
    assert lines[4] == "| B - A | - | - | +33.3 | - | - | +41.7 | - | - | - | - |"


def test_protocol_validation_and_samples():
    p = EvalProtocol()
    assert (p.temperature, p.top_p, p.max_new_tokens) == (0.6, 1.0, 8192)
    assert [p.num_samples(b) for b in ("aime24", "amc", "math500", "mmlu_pro")] == [32, 32, 1, 1]
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0),
                dict(samples=("aime24",)), dict(samples=("aime24=0",)), dict(batch_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EvalProtocol(**bad)


def eval_args(argv):
    import argparse

    from srft_jax.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    return eval_cmd, parser.parse_args(argv)


def test_cli_protocol_and_compare(tmp_path, tokenizer, pool, benchmarks, capsys):
    cmd, args = eval_args(["--model", "m"])
    p = cmd.protocol_from_args(args, PromptTemplate())
    assert (p.temperature, p.top_p, p.max_new_tokens, p.num_samples("amc"), p.num_samples("gpqa_diamond")) \
        == (0.6, 1.0, 8192, 32, 1)
    cmd, args = eval_args(["--model", "m", "--n", "4", "--samples", "aime24=8", "--temperature", "1.0",
                           "--think-prefix", "<think>"])
    p = cmd.protocol_from_args(args, PromptTemplate(system_prompt="trained prompt"))
    assert [p.num_samples(b) for b in ("aime24", "amc", "math500")] == [8, 4, 4]
    assert (p.temperature, p.template.system_prompt, p.template.think_prefix) == (1.0, "trained prompt", "<think>")

    evaluate(ScriptedPolicy(script_for(benchmarks), tokenizer), benchmarks, tokenizer,
             str(tmp_path / "a" / "eval"), PROTOCOL, model_name="scripted", pool=pool, progress=False)
    cmd, args = eval_args(["--compare", str(tmp_path / "a"), str(tmp_path / "a" / "eval" / "results.json")])
    assert cmd.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == EXPECTED_ROW.replace("scripted", "scripted (A)")
    assert lines[4] == "| B - A | +0.0 | - | +0.0 | - | - | +0.0 | +0.0 | +0.0 | - | +0.0 |"

    data = tmp_path / "files"
    data.mkdir()
    (data / "amc.parquet").write_text("")
    (data / "math500").mkdir()
    assert benchmark_path(str(data), "amc").endswith("amc.parquet")
    assert benchmark_path(str(data), "math500").endswith("math500")
    assert benchmark_path(str(data), "aime24") is None and benchmark_path(None, "amc") is None


def test_load_benchmarks_subset(tmp_path, benchmarks):
    data = tmp_path / "data"  # written by the benchmarks fixture
    loaded = load_benchmarks(["math500", "arc_c"], str(data), limit=2)
    assert [i.id for i in loaded["math500"]] == ["m1", "m2"]
    assert loaded["arc_c"] == benchmarks["arc_c"][:2]
