"""Training data: OpenR1 layout, the paper's prompt, bad rows, lengths, buckets, order."""

import json

import numpy as np
import pytest

from srft_jax.data import (
    LUFFY_SYSTEM_PROMPT,
    PAPER_TEMPLATE,
    DataConfig,
    PromptTemplate,
    PromptIterator,
    load_training_examples,
    load_training_examples_from_config,
)

QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A lossless byte-level BPE tokenizer with a Qwen-style chat template, built here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [LUFFY_SYSTEM_PROMPT, "This is the problem: what is 1 + 1?",
              "<think>\nOkay, so 1 + 1 = 2.\n</think>\n\nThe answer is \\boxed{2}."] * 20
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = QWEN_STYLE_TEMPLATE
    return tok


def row(q="What is 1 + 1?", demo="<think>\nOkay, 1 + 1 = 2.\n</think>\n\n\\boxed{2}", gt="2",
        source="numina", user_prefix="This is the problem: "):
    return {
        "data_source": source,
        "prompt": [{"role": "system", "content": "their own system prompt"},
                   {"role": "user", "content": user_prefix + q}],
        "target": [{"role": "assistant", "content": demo}],
        "reward_model": {"ground_truth": gt, "style": "rule"},
    }


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as f:
        for r in rows:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


def load(path, tokenizer, max_prompt_len=4096, max_response_len=4096, **kw):
    return load_training_examples(path, tokenizer, max_prompt_len, max_response_len, **kw)


# ---- prompt -------------------------------------------------------------------------


def test_luffy_system_prompt_text():
    assert LUFFY_SYSTEM_PROMPT.startswith("Your task is to follow a systematic, thorough reasoning")
    assert "<think>\n {thoughts} </think>\n" in LUFFY_SYSTEM_PROMPT
    assert LUFFY_SYSTEM_PROMPT.endswith(
        "include the answer in \\boxed{} for closed-form results like multiple choices or "
        "mathematical solutions.")


def test_build_messages():
    assert PromptTemplate().messages("Q?") == [
        {"role": "system", "content": LUFFY_SYSTEM_PROMPT},
        {"role": "user", "content": "This is the problem: Q?"},
    ]
    # An empty system prompt means no system turn at all (not an empty one).
    assert PromptTemplate(system_prompt="").messages("Q?") == [{"role": "user", "content": "This is the problem: Q?"}]


def test_template_ids_are_the_chat_template_then_think(tokenizer):
    ids = PAPER_TEMPLATE.ids(tokenizer, "What is 1 + 1?")
    expected = ("<|im_start|>system\n" + LUFFY_SYSTEM_PROMPT + "<|im_end|>\n"
                "<|im_start|>user\nThis is the problem: What is 1 + 1?<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n")
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]


# ---- loading --------------------------------------------------------------------------


def test_examples_follow_the_layout(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [row(), row(q="What is 2 + 3?", gt="5", user_prefix="")])
    examples, stats = load(path, tokenizer)
    assert stats.kept == 2 and stats.rows_read == 2 and stats.skipped == {}
    ex = examples[0]
    assert (ex.id, ex.question, ex.ground_truth, ex.data_source) == ("train-0", "What is 1 + 1?", "2", "numina")
    assert list(ex.prompt_ids) == PAPER_TEMPLATE.ids(tokenizer, "What is 1 + 1?")
    # the demonstration continues after "<think>\n": no leading <think>, eos appended
    demo = "Okay, 1 + 1 = 2.\n</think>\n\n\\boxed{2}"
    assert list(ex.demo_ids) == tokenizer(demo, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    full = tokenizer.decode(list(ex.prompt_ids) + list(ex.demo_ids), skip_special_tokens=False)
    assert full.endswith("<|im_start|>assistant\n<think>\nOkay, 1 + 1 = 2.\n</think>\n\n\\boxed{2}<|im_end|>")
    assert full.count("This is the problem:") == 1
    # a user turn without the template words gets them once as well
    assert examples[1].question == "What is 2 + 3?"
    assert list(examples[1].prompt_ids) == PAPER_TEMPLATE.ids(tokenizer, "What is 2 + 3?")


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path, tokenizer, caplog):
    good = [row(q=f"What is {i} + 1?", gt=str(i + 1)) for i in range(3)]
    bad = [
        {k: v for k, v in row().items() if k != "prompt"},                     # missing_prompt
        dict(row(), prompt="just a string"),                                   # bad_prompt_type
        dict(row(), prompt=[{"role": "system", "content": "s"}]),              # no_user_turn
        row(q="   ", user_prefix=""),                                          # empty_question
        {k: v for k, v in row().items() if k != "target"},                     # missing_target
        dict(row(), target=42),                                                # bad_target_type
        row(demo="<think>  "),                                                 # empty_demo
        dict(row(), reward_model={"style": "rule"}),                           # missing_ground_truth
        row(gt="  "),                                                          # empty_answer
        dict(row(), reward_model={"ground_truth": ["2"]}),                     # bad_ground_truth_type
        dict(row(), reward_model="2"),                                         # bad_reward_model_type
        dict(row(), data_source=7),                                            # bad_data_source_type
        dict(row(), prompt=[{"role": "user", "content": 5}]),                  # bad_prompt_type
    ]
    raw = [
        b'{"prompt": [{"role": "user", "content": "caf\xe9"}]}',               # undecodable_text (latin-1)
        b'{"prompt": [{"role": "user", "content": "\\ud800"}], "target": [], "reward_model": {"ground_truth": "1"}}',
        b'{"prompt": ',                                                        # invalid_json
        b'[1, 2, 3]',                                                          # not_an_object
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", good + bad, raw)
    with caplog.at_level("WARNING"):
        examples, stats = load(path, tokenizer)
    assert stats.kept == 3 and stats.rows_read == 3 + len(bad) + len(raw)
    assert stats.skipped == {
        "missing_prompt": 1, "bad_prompt_type": 2, "no_user_turn": 1, "empty_question": 1,
        "missing_target": 1, "bad_target_type": 1, "empty_demo": 1, "missing_ground_truth": 1,
        "empty_answer": 1, "bad_ground_truth_type": 1, "bad_reward_model_type": 1,
        "bad_data_source_type": 1, "undecodable_text": 2, "invalid_json": 1, "not_an_object": 1,
    }
    assert [e.ground_truth for e in examples] == ["1", "2", "3"]
    assert "bad rows 17" in caplog.text


def test_numeric_ground_truth_and_missing_data_source_are_accepted(tmp_path, tokenizer):
    r = {k: v for k, v in row().items() if k != "data_source"}
    r["reward_model"] = {"ground_truth": 2}
    examples, stats = load(write_jsonl(tmp_path / "t.jsonl", [r]), tokenizer)
    assert examples[0].ground_truth == "2" and examples[0].data_source == "unknown"


def test_all_bad_file_fails_clearly(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [dict(row(), reward_model={"ground_truth": ""})] * 3)
    with pytest.raises(ValueError, match=r"no usable training rows.*empty_answer=3"):
        load(path, tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load(str(empty), tokenizer)


def test_missing_source_fails_clearly(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "nope.jsonl"), tokenizer)


def test_length_filters_are_counted(tmp_path, tokenizer):
    rows = [row(demo="<think>" + " step" * n + " </think> \\boxed{2}") for n in (1, 5, 20, 40)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    demo_lens = [len(tokenizer(r["target"][0]["content"][len("<think>"):].lstrip(),
                               add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    limit = sorted(demo_lens)[1]
    examples, stats = load(path, tokenizer, max_response_len=limit)
    assert stats.demo_too_long == sum(n > limit for n in demo_lens) == 2
    assert [len(e.demo_ids) for e in examples] == [n for n in demo_lens if n <= limit]
    prompt_len = len(PAPER_TEMPLATE.ids(tokenizer, "What is 1 + 1?"))
    with pytest.raises(ValueError, match="prompt 4"):
        load(path, tokenizer, max_prompt_len=prompt_len - 1)


def test_bucket_counts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [row(demo="<think>" + " x" * n) for n in (1, 30, 200)])
    examples, stats = load(path, tokenizer, prompt_buckets=(64, 512, 4096),
                           response_buckets=(16, 64, 4096))
    expected = {}
    for e in examples:
        b = min(b for b in (16, 64, 4096) if b >= len(e.demo_ids))
        expected[b] = expected.get(b, 0) + 1
    assert stats.response_bucket_counts == expected
    assert sum(stats.prompt_bucket_counts.values()) == 3


def test_parquet_and_directory_sources_match_jsonl(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [row(q=f"What is {i} + 1?", gt=str(i + 1)) for i in range(5)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    from_jsonl, _ = load(jsonl, tokenizer)
    from_parquet, _ = load(str(tmp_path / "a.parquet"), tokenizer)
    assert from_jsonl == from_parquet
    d = tmp_path / "dir"
    (d / "data").mkdir(parents=True)
    write_jsonl(d / "data" / "train-00000.jsonl", rows[:2])
    write_jsonl(d / "data" / "test-00000.jsonl", rows[2:])
    train, _ = load(str(d), tokenizer, split="train")
    test, _ = load(str(d), tokenizer, split="test")
    assert [e.ground_truth for e in train] == ["1", "2"] and [e.ground_truth for e in test] == ["3", "4", "5"]
    with pytest.raises(FileNotFoundError, match="validation"):
        load(str(d), tokenizer, split="validation")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", rows[:2])
    write_jsonl(shards / "part-1.jsonl", rows[2:])
    everything, _ = load(str(shards), tokenizer, split="train")
    assert [e.ground_truth for e in everything] == ["1", "2", "3", "4", "5"]


def test_hub_id_goes_through_datasets(monkeypatch, tokenizer):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [row(), row(q="What is 2 + 2?", gt="4")]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples, stats = load("Elliott/Openr1-Math-46k-8192", tokenizer)
    assert calls == [("Elliott/Openr1-Math-46k-8192", None, "train")]
    assert [e.ground_truth for e in examples] == ["2", "4"]


def test_max_rows_and_optional_demo(tmp_path, tokenizer):
    rows = [row(), {k: v for k, v in row().items() if k != "target"}, row()]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    examples, stats = load(path, tokenizer, max_rows=2, require_demo=False)
    assert stats.rows_read == 2 and [len(e.demo_ids) > 0 for e in examples] == [True, False]


def test_from_config(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [row()])
    config = DataConfig(source=path, max_prompt_len=4096, max_response_len=64, end_token="<|endoftext|>")
    (ex,), _ = load_training_examples_from_config(config, tokenizer)
    assert ex.demo_ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")


# ---- config ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_prompt_len=0), "max_prompt_len"),
    (dict(max_response_len=-1), "max_response_len"),
    (dict(prompt_buckets=(64, 32)), "prompt_buckets"),
    (dict(response_buckets=(16,)), "response_buckets"),
    (dict(max_rows=0), "max_rows"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)


def test_template_needs_a_question_field():
    with pytest.raises(ValueError, match="user_template"):
        PromptTemplate(user_template="no field")


def test_config_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf

    base = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(base, OmegaConf.create({"source": "x.jsonl", "response_buckets": [1024, 8192]}))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, DataConfig) and config.response_buckets == (1024, 8192)
    assert DataConfig.synthetic("d").max_prompt_len == 48


# ---- iterator -------------------------------------------------------------------------


def fake_examples(n):
    from srft_jax.data import Example
    return [Example(str(i), f"q{i}", (i,), (i, 0), str(i), "s") for i in range(n)]


def ids(batch):
    return [e.id for e in batch]


def test_iterator_epochs_are_seeded_permutations():
    examples = fake_examples(10)
    it = PromptIterator(examples, batch_size=3, seed=7)
    epoch0 = [ids(it.next_batch()) for _ in range(3)]
    flat = sum(epoch0, [])
    expected = [str(i) for i in np.random.default_rng([7, 0]).permutation(10)[:9]]
    assert flat == expected and len(set(flat)) == 9
    epoch1 = sum((ids(it.next_batch()) for _ in range(3)), [])
    assert epoch1 == [str(i) for i in np.random.default_rng([7, 1]).permutation(10)[:9]]
    assert it.epoch == 1
    again = PromptIterator(examples, batch_size=3, seed=7)
    assert sum((ids(again.next_batch()) for _ in range(3)), []) == flat
    other = PromptIterator(examples, batch_size=3, seed=8)
    assert sum((ids(other.next_batch()) for _ in range(3)), []) != flat


def test_iterator_without_shuffle_keeps_order():
    it = PromptIterator(fake_examples(5), batch_size=2, seed=0, shuffle=False)
    assert [ids(it.next_batch()) for _ in range(3)] == [["0", "1"], ["2", "3"], ["0", "1"]]


@pytest.mark.parametrize("steps_before", [0, 1, 3, 4, 7])
def test_iterator_resume_gives_the_same_next_batches(steps_before):
    examples = fake_examples(11)
    original = PromptIterator(examples, batch_size=3, seed=1)
    for _ in range(steps_before):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # as stored in a checkpoint
    assert all(isinstance(v, int) for v in state.values())
    resumed = PromptIterator(examples, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    for _ in range(8):  # across epoch boundaries
        assert ids(resumed.next_batch()) == ids(original.next_batch())


def test_iterator_rejects_mismatched_state():
    state = PromptIterator(fake_examples(10), batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PromptIterator(fake_examples(10), batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples"):
        PromptIterator(fake_examples(12), batch_size=2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"train.prompts_per_step=4 is more than the 3 usable"):
        PromptIterator(fake_examples(3), batch_size=4, seed=0)
