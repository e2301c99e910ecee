"""TFDS data without TensorFlow: convert, read back, train and evaluate from it.

Every dataset here is written in the test (no download): a training-layout fixture with
good rows and bad rows of each kind, and a GSM8K directory in the TFDS catalog's layout
(the features, name, version and splits of the installed catalog builder).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_data_training import row

import tensorflow_datasets as tfds  # the tfds extra, part of the test extra

from srft_jax.cli import main as cli_main
from srft_jax.data import DataConfig, PromptIterator, gsm8k
from srft_jax.data.convert import convert_to_tfds
from srft_jax.data.tfds_io import DatasetWriter, is_tfds_source, open_split
from srft_jax.data.training import (
    LazyExamples,
    load_training_examples,
    load_training_examples_from_config,
)
from srft_jax.testing import ScriptedPolicy, make_byte_tokenizer

pytestmark = pytest.mark.compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


def good_row(i):
    return row(f"What is {i} + {i}?", f"<think>\n{i} + {i} = {2 * i}.\n</think>\n\n\\boxed{{{2 * i}}}",
               str(2 * i), source=f"src{i % 2}")


def expected_fields(i, index, split="train"):
    """What the converter must store for good_row(i) at row ``index`` of the source."""
    return {"id": f"{split}-{index}", "question": f"What is {i} + {i}?",
            "demonstration": f"{i} + {i} = {2 * i}.\n</think>\n\n\\boxed{{{2 * i}}}",
            "ground_truth": str(2 * i), "data_source": f"src{i % 2}"}


BAD_ROWS = {  # one row per reason the training validation gives
    "missing_prompt": {k: v for k, v in good_row(1).items() if k != "prompt"},
    "bad_prompt_type": dict(good_row(1), prompt="just a string"),
    "no_user_turn": dict(good_row(1), prompt=[{"role": "system", "content": "s"}]),
    "empty_question": row("   ", "d", "1", user_prefix=""),
    "missing_target": {k: v for k, v in good_row(1).items() if k != "target"},
    "bad_target_type": dict(good_row(1), target=42),
    "empty_demo": row("q", "<think>  ", "1"),
    "missing_ground_truth": dict(good_row(1), reward_model={"style": "rule"}),
    "empty_answer": row("q", "d", "  "),
    "bad_ground_truth_type": dict(good_row(1), reward_model={"ground_truth": ["2"]}),
    "bad_reward_model_type": dict(good_row(1), reward_model="2"),
    "bad_data_source_type": dict(good_row(1), data_source=7),
}
RAW_BAD_LINES = {
    "undecodable_text": b'{"prompt": [{"role": "user", "content": "caf\xe9"}]}',
    "invalid_json": b'{"prompt": ',
    "not_an_object": b"[1, 2, 3]",
}


def write_fixture(path, good, bad_every=2):
    """``good`` good rows with a bad row (cycling through every kind) after every
    ``bad_every`` of them; returns the source row index of each good row."""
    bad = [json.dumps(r).encode() for r in BAD_ROWS.values()] + list(RAW_BAD_LINES.values())
    lines, indices = [], []
    for i in range(good):
        indices.append(len(lines))
        lines.append(json.dumps(good_row(i)).encode())
        if i % bad_every == bad_every - 1 and bad:
            lines.append(bad.pop(0))
    lines += bad
    path.write_bytes(b"\n".join(lines) + b"\n")
    return indices


def read_back(dest):
    """Every split of a TFDS directory read with tensorflow_datasets itself, text decoded."""
    builder = tfds.builder_from_directory(str(dest))
    out = {}
    for split, source in builder.as_data_source().items():
        out[split] = [{k: v.decode() for k, v in source[i].items()} for i in range(len(source))]
    return out


# ---- convert -------------------------------------------------------------------------------
def test_convert_round_trip_keeps_exactly_the_good_rows(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    train_index = write_fixture(src / "train.jsonl", good=40)
    (src / "test.jsonl").write_text("".join(json.dumps(good_row(i)) + "\n" for i in (7, 8)))
    dest = tmp_path / "openr1-tfds"
    summaries = convert_to_tfds(str(src), str(dest), progress=False)

    assert sorted(os.listdir(dest))[:2] == ["dataset_info.json", "features.json"]
    by_split = {s.split: s for s in summaries}
    expected_skips = dict.fromkeys(BAD_ROWS, 1)
    expected_skips.update(dict.fromkeys(RAW_BAD_LINES, 1))
    assert by_split["train"].skipped == expected_skips
    assert by_split["train"].written == 40
    assert by_split["train"].rows_read == 40 + len(BAD_ROWS) + len(RAW_BAD_LINES)
    assert (by_split["test"].written, by_split["test"].skipped) == (2, {})

    back = read_back(dest)
    assert sorted(back) == ["test", "train"]
    assert back["train"] == [expected_fields(i, index) for i, index in enumerate(train_index)]
    assert back["test"] == [expected_fields(7, 0, "test"), expected_fields(8, 1, "test")]
    assert tfds.builder_from_directory(str(dest)).info.name == "openr1_tfds"


def test_convert_one_split_shards_and_refuses_a_used_directory(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(good_row(i)) + "\n" for i in range(30)))
    dest = tmp_path / "out"
    [summary] = convert_to_tfds(str(src), str(dest), split="dev", progress=False, shard_bytes=2000)
    rows = open_split(str(dest), "dev")
    assert summary.written == len(rows) == 30
    builder = tfds.builder_from_directory(str(dest))
    assert builder.info.splits["dev"].num_shards > 1  # rows read across shard boundaries
    assert rows.take([29, 0, 13]) == [expected_fields(i, i, "dev") for i in (29, 0, 13)]
    with pytest.raises(FileExistsError, match="not empty"):
        convert_to_tfds(str(src), str(dest), progress=False)
    with pytest.raises(ValueError, match="no split 'train'.*'dev'"):
        open_split(str(dest), "train")


def test_convert_a_hub_dataset_writes_each_of_its_splits(tmp_path, monkeypatch):
    import datasets

    hub = {"train": [good_row(i) for i in range(3)], "test": [good_row(9), BAD_ROWS["empty_answer"]]}
    calls = []
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda path, name=None: list(hub))

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return hub[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    summaries = convert_to_tfds("org/math-data", str(tmp_path / "out"), progress=False)
    assert calls == [("org/math-data", None, "train"), ("org/math-data", None, "test")]
    assert [(s.split, s.written, s.skipped) for s in summaries] == [
        ("train", 3, {}), ("test", 1, {"empty_answer": 1})]
    assert read_back(tmp_path / "out")["test"] == [expected_fields(9, 0, "test")]


def test_data_convert_command(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_fixture(src / "train-00000-of-00001.jsonl", good=6, bad_every=3)
    dest = tmp_path / "tfds_out"
    rc = cli_main(["data", "convert", str(src), str(dest), "--format", "tfds", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "train: read 21 rows, wrote 6; bad rows 15" in out and "missing_prompt=1" in out
    assert len(read_back(dest)["train"]) == 6
    rc = cli_main(["data", "convert", str(src), str(dest), "--no-progress"])  # dest is not empty
    assert rc == 1 and capsys.readouterr().err == f"error: {dest} already exists and is not empty\n"
    rc = cli_main(["data", "convert", str(src), str(tmp_path / "x"), "--split", "test",
                   "--no-progress"])
    assert rc == 1 and "no 'test' files" in capsys.readouterr().err


# ---- training from TFDS --------------------------------------------------------------------
def test_training_from_tfds_gives_the_same_examples_and_batches(tmp_path, tokenizer):
    src = tmp_path / "train.jsonl"
    write_fixture(src, good=20)
    with open(src, "a") as f:  # dropped for length at load time, not at conversion
        f.write(json.dumps(row("long demo", "x" * 300, "1")) + "\n")
    dest = tmp_path / "tfds"
    convert_to_tfds(str(src), str(dest), progress=False)

    def load(source):
        cfg = DataConfig(source=source, max_prompt_len=2048, max_response_len=200, seed=3)
        return load_training_examples_from_config(cfg, tokenizer)

    eager, eager_stats = load(str(src))
    lazy, lazy_stats = load(str(dest))
    assert isinstance(lazy, LazyExamples) and isinstance(eager, list)
    assert list(lazy) == eager and len(eager) == 20
    assert lazy[3:11:2] == eager[3:11:2] and lazy[-1] == eager[-1]
    assert lazy_stats.demo_too_long == eager_stats.demo_too_long == 1
    assert lazy_stats.prompt_bucket_counts == eager_stats.prompt_bucket_counts
    a, b = PromptIterator(eager, 6, seed=3), PromptIterator(lazy, 6, seed=3)
    for _ in range(7):  # two epochs and a bit
        assert a.next_batch() == b.next_batch()
    assert a.state_dict() == b.state_dict()


def test_train_loads_the_same_data_from_tfds(tmp_path):
    """The training loop's data (the train split and the held-out split, read with the demo
    config's data section) from the synthetic task's files and from their TFDS conversion."""
    import dataclasses

    from srft_jax.config import load_config, resolve_config_path
    from srft_jax.data.synthetic import make_synthetic_tokenizer, write_synthetic_dataset
    from srft_jax.data.training import load_training_examples_from_config

    tokenizer = make_synthetic_tokenizer()

    src = tmp_path / "synthetic"
    write_synthetic_dataset(str(src), 64, 16, seed=0)
    dest = tmp_path / "synthetic_tfds"
    convert_to_tfds(str(src), str(dest), progress=False)
    loaded = {}
    for name, source in (("jsonl", src), ("tfds", dest)):
        data = load_config(resolve_config_path("demo"), [f"data.source={source}"]).data
        train, _ = load_training_examples_from_config(data, tokenizer)
        heldout, _ = load_training_examples_from_config(dataclasses.replace(data, split="test"), tokenizer)
        loaded[name] = train, heldout
    (train_a, heldout_a), (train_b, heldout_b) = loaded["jsonl"], loaded["tfds"]
    assert list(train_b) == list(train_a) and len(train_a) == 64
    assert list(heldout_b) == list(heldout_a) and len(heldout_a) == 16


@pytest.mark.slow
def test_training_steps_from_tfds_match_jsonl(tmp_path):
    """Two SRFT steps and a held-out evaluation of a small model on the synthetic task, from
    its files and from their TFDS conversion: every logged metric is equal."""
    from srft_jax.config import resolve_config_path
    from srft_jax.data.synthetic import make_synthetic_tokenizer, write_synthetic_dataset
    from srft_jax.metrics import read_metrics

    src = tmp_path / "synthetic"
    write_synthetic_dataset(str(src), 256, 32, seed=0)
    convert_to_tfds(str(src), str(tmp_path / "synthetic_tfds"), progress=False)
    make_synthetic_tokenizer(str(tmp_path / "tok"))
    small = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
             "model.num_heads=2", "model.num_kv_heads=1", "train.prompts_per_step=4",
             "train.rollouts_per_prompt=3", "train.updates_per_step=2",
             "train.micro_batch_size=8", "train.progress_bar=false", "train.reward_workers=1",
             "train.export_hf=false", "train.tensorboard=false", "eval.num_examples=8",
             "eval.batch_size=8", "eval.every=2", "train.steps=2"]
    metrics = {}
    for name in ("synthetic", "synthetic_tfds"):
        run_dir = tmp_path / f"run_{name}"
        rc = cli_main(["--log-level", "WARNING", "train", "--config", resolve_config_path("demo"),
                       f"train.run_dir={run_dir}", f"data.source={tmp_path / name}",
                       f"model.tokenizer={tmp_path / 'tok'}", *small])
        assert rc == 0
        volatile = ("time/", "throughput/", "compile/")
        metrics[name] = [{k: v for k, v in r.items() if not k.startswith(volatile)}
                         for r in read_metrics(str(run_dir))]
    assert len(metrics["synthetic"]) == 2 and "eval/accuracy" in metrics["synthetic"][-1]
    assert metrics["synthetic_tfds"] == metrics["synthetic"]


def test_config_and_source_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="tfds_data_dir"):
        DataConfig(source="data.jsonl", tfds_data_dir="/tmp/tfds")
    assert DataConfig(source="tfds:gsm8k", tfds_data_dir=str(tmp_path)).tfds_data_dir
    with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset 'nosuch'") as e:
        open_split("tfds:nosuch", "train", str(tmp_path))
    assert "\n" not in str(e.value)
    assert is_tfds_source("gs://bucket/openr1_tfds") and is_tfds_source("tfds:gsm8k/main:1.0.0")
    assert not is_tfds_source(str(tmp_path))  # a plain directory of files


# ---- GSM8K ---------------------------------------------------------------------------------
def test_gsm8k_answers():
    assert gsm8k.split_answer("2 * 3 = <<2*3=6>>6 cups.\nThen 6 + 994 = <<6+994=1000>>1000.\n"
                              "#### 1,000") == ("2 * 3 = 6 cups.\nThen 6 + 994 = 1000.", "1000")
    assert gsm8k.split_answer("no final answer here") is None
    assert gsm8k.split_answer("#### ") is None
    assert gsm8k.demonstration("a\nb", "7") == "a\nb\n</think>\n\n\\boxed{7}"


GSM8K_ROWS = {
    "train": [("Tom has 2 boxes of 3 eggs. How many eggs?", "2 * 3 = <<2*3=6>>6 eggs.", "6"),
              ("Ann reads 4 pages a day for 5 days. How many pages?", "4 * 5 = <<4*5=20>>20", "20"),
              ("A bad row without a final answer?", "it is 3", None)],
    "test": [("Sam has 10 apples and eats 4. How many are left?", "10 - 4 = <<10-4=6>>6", "6"),
             ("A car goes 60 km/h for 3 hours. How far?", "60 * 3 = <<60*3=180>>180 km", "180")],
}


def write_gsm8k_catalog(data_dir):
    """DATA_DIR/gsm8k/1.0.0 with the catalog builder's own features, name and version."""
    from tensorflow_datasets.text.gsm8k import gsm8k as catalog

    builder = catalog.Gsm8k(data_dir=str(data_dir))
    dest = data_dir / builder.name / str(builder.version)
    writer = DatasetWriter(str(dest), features=builder.info.features, name=builder.name)
    for split, rows in GSM8K_ROWS.items():
        writer.write_split(split, [
            {"question": q, "answer": f"{r}\n#### {n}" if n else r, "annotation": f"{r}\n",
             "short_answer": n or ""} for q, r, n in rows])
    writer.finish("GSM8K fixture in the catalog layout")
    return dest


def test_gsm8k_from_the_catalog_layout_trains(tmp_path, tokenizer):
    write_gsm8k_catalog(tmp_path)
    examples, stats = load_training_examples("tfds:gsm8k", tokenizer, 2048, 512,
                                             tfds_data_dir=str(tmp_path))
    assert stats.skipped == {"no_final_answer": 1} and len(examples) == 2
    first = examples[0]
    assert first.question == GSM8K_ROWS["train"][0][0] and first.ground_truth == "6"
    assert first.data_source == "gsm8k" and first.id == "train-0"
    assert tokenizer.decode(first.demo_ids) == "2 * 3 = 6 eggs.\n</think>\n\n\\boxed{6}<|im_end|>"
    # the same rows through the directory itself, and through its flat conversion
    again, _ = load_training_examples(str(tmp_path / "gsm8k"), tokenizer, 2048, 512)
    assert list(again) == list(examples)
    summaries = convert_to_tfds("tfds:gsm8k", str(tmp_path / "flat"), tfds_data_dir=str(tmp_path),
                                progress=False)
    assert {s.split: (s.written, s.skipped) for s in summaries} == {
        "train": (2, {"no_final_answer": 1}), "test": (2, {})}
    flat, _ = load_training_examples(str(tmp_path / "flat"), tokenizer, 2048, 512)
    assert list(flat) == list(examples)


def test_gsm8k_benchmark_from_tfds_through_the_harness(tmp_path, tokenizer):
    from srft_jax.evaluation.harness import EvalProtocol, evaluate, load_benchmarks

    write_gsm8k_catalog(tmp_path)
    benchmarks = load_benchmarks(["gsm8k"], str(tmp_path))
    items = benchmarks["gsm8k"]
    assert [(i.id, i.answer) for i in items] == [("gsm8k-0", "6"), ("gsm8k-1", "180")]
    script = {items[0].question: ["</think> \\boxed{6}"],            # right
              items[1].question: ["</think> the answer is \\boxed{170}"]}  # wrong
    protocol = EvalProtocol(max_new_tokens=64, samples=(), reward_workers=1)
    results = evaluate(ScriptedPolicy(script, tokenizer), benchmarks, tokenizer,
                       str(tmp_path / "eval"), protocol, model_name="scripted", progress=False)
    assert results.accuracies() == {"gsm8k": 0.5}


# ---- no TensorFlow -------------------------------------------------------------------------
def test_nothing_imports_tensorflow(tmp_path):
    """Convert, train-load (lazily, every example) and evaluate-load from TFDS in a fresh
    process, then check that TensorFlow was never imported (other tests' imports cannot
    hide it there). The gsm8k benchmark is read from $TFDS_DATA_DIR with no path given."""
    data_dir = tmp_path / "tfds_data"
    write_gsm8k_catalog(data_dir)
    src = tmp_path / "train.jsonl"
    write_fixture(src, good=8)
    script = textwrap.dedent(f"""
        import sys
        from srft_jax.data.convert import convert_to_tfds
        from srft_jax.data.eval_sets import load_benchmark
        from srft_jax.data.training import load_training_examples
        from srft_jax.testing import make_byte_tokenizer

        convert_to_tfds({str(src)!r}, {str(tmp_path / 'out')!r}, progress=False)
        examples, _ = load_training_examples({str(tmp_path / 'out')!r}, make_byte_tokenizer(),
                                             4096, 512)
        assert len(list(examples)) == 8
        assert [i.answer for i in load_benchmark("gsm8k")] == ["6", "180"]
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        print("no tensorflow")
    """)
    env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no tensorflow" in out.stdout
