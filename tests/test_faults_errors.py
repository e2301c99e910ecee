"""One-line errors a user can hit before the loop runs (issue 15): YAML syntax as FILE:LINE, a bad
override blamed on the command line (not the file), impossible model sizes refused when the
config is read, missing / unusable / too small data naming the file or `train.prompts_per_step`,
and the CLI printing `error: ...` (exit 1) or exiting 130 on Ctrl-C, without a traceback.
"""

from __future__ import annotations

import logging

import pytest

from srft_jax.config import ConfigError, load_config, resolve_config_path
from srft_jax.data.iterator import PromptIterator
from srft_jax.faults import DataError, MissingDataError, RunError
from tests.test_data_training import load, row, tokenizer, write_jsonl  # noqa: F401 (fixture)

pytestmark = pytest.mark.compat

DEMO = resolve_config_path("demo")


def _error(path=None, overrides=()):
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, RunError)
    return message


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, line, words", [
    ("train:\n  lr: 1e-3\n  steps: [1, 2\n", 4, "flow sequence"),           # unclosed bracket
    ("train:\n  lr: 1e-3\n steps: 5\n", 3, "mapping"),                      # bad indentation
    ("train:\n  lr: 1e-3\n\tsteps: 5\n", 3, "tab"),                          # a tab
    ("train:\n  lr: 1e-3\n  lr: 2e-3\n", 3, "duplicate key"),                # the same key twice
], ids=["bracket", "indent", "tab", "duplicate"])
def test_yaml_syntax_error_is_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = _error(str(path))
    assert message.startswith(f"{path}:{line}: YAML syntax error: ")
    assert words in message


def test_a_file_that_is_not_text(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"train:\n  lr: \xff\xfe\n")
    assert _error(str(path)).startswith(f"{path}: not a readable YAML file")


@pytest.mark.parametrize("override", ["train.steps=-1", "train.lrr=1", "train.lr=abc",
                                      "model.hidden_size=100", "loss.preset=foo"])
def test_override_errors_blame_the_command_line(override):
    message = _error(DEMO, ["train.lr=2e-3", override])
    assert message.startswith("command line") and "demo.yaml" not in message


def test_file_errors_blame_the_file_even_with_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  steps: -1\n")
    assert _error(str(path), ["train.lr=2e-3"]) == f"{path}: train.steps must be positive, got -1"
    # ... unless the command line fixes them.
    assert load_config(str(path), ["train.steps=5"]).train.steps == 5


@pytest.mark.parametrize("sizes, words", [
    (["model.hidden_size=100"], "model.hidden_size=100 / model.num_heads=4 gives attention heads of size 25; "
                                "RoPE needs an even size"),
    (["model.num_heads=3"], "model.hidden_size=128 is not divisible by model.num_heads=3"),
    (["model.num_kv_heads=3"], "model.num_heads=4 must be a multiple of model.num_kv_heads=3"),
    (["model.hidden_size=0"], "model.hidden_size must be positive"),
])
def test_impossible_model_sizes_fail_when_the_config_is_read(sizes, words):
    assert _error(DEMO, sizes).startswith(f"command line: {words}")


def test_possible_model_sizes_pass():
    cfg = load_config(DEMO, ["model.hidden_size=96", "model.num_heads=6", "model.num_kv_heads=2"])
    assert cfg.model.hidden_size == 96


# ---- data --------------------------------------------------------------------------------------
def test_missing_data_file_is_one_line_naming_it(tmp_path, tokenizer):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(MissingDataError) as err:
        load(str(missing), tokenizer)
    assert str(err.value) == f"training data: no such file or directory: {missing}"
    assert isinstance(err.value, FileNotFoundError)


def test_all_bad_rows_are_one_line_naming_the_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [], raw_lines=[b"not json", b"\xff\xfe", b"[1]"])
    with pytest.raises(DataError) as err:
        load(path, tokenizer)
    message = str(err.value)
    assert "\n" not in message and path in message and "invalid_json=1" in message


def test_unreadable_parquet_names_the_file(tmp_path, tokenizer):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=rf"^{path}: not a readable parquet file \("):
        load(str(path), tokenizer)


def test_fewer_examples_than_a_step_names_prompts_per_step(tmp_path, tokenizer):
    examples, _ = load(write_jsonl(tmp_path / "train.jsonl", [row(), row(q="What is 2 + 2?", gt="4")]), tokenizer)
    with pytest.raises(DataError) as err:
        PromptIterator(examples, 8, seed=0)
    assert str(err.value) == ("train.prompts_per_step=8 is more than the 2 usable training examples; "
                              "lower train.prompts_per_step or use more data")


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture
def failing_command(monkeypatch):
    from srft_jax.commands import plot

    def use(exc):
        def run(args):
            logging.getLogger("absl").error("orbax says\nline 2\nline 3", exc_info=(ValueError, ValueError("x"), None))
            raise exc

        monkeypatch.setattr(plot, "run", run)

    return use


def test_cli_prints_a_run_error_as_one_line(failing_command, capsys):
    from srft_jax.cli import EXIT_ERROR, main

    failing_command(DataError("train.prompts_per_step=8 is more than the 2 usable training examples"))
    assert main(["plot", "somewhere"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "error: train.prompts_per_step=8 is more than the 2 usable training examples\n" in err
    assert "Traceback" not in err and "line 2" not in err  # library logs keep their first line only


def test_cli_ctrl_c_exits_130_without_traceback(failing_command, capsys):
    from srft_jax.cli import EXIT_INTERRUPTED, main

    failing_command(KeyboardInterrupt())
    assert main(["plot", "somewhere"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_cli_drops_only_the_closed_event_loop_noise():
    """tensorstore callbacks landing after orbax closed its event loop (one traceback per pending
    read once a restore failed) are dropped; every other unraisable exception still shows."""
    from types import SimpleNamespace

    from srft_jax.cli import _quiet_closed_loops

    seen = []
    hook = _quiet_closed_loops(seen.append)
    hook(SimpleNamespace(exc_value=RuntimeError("Event loop is closed")))
    other = SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(other)
    assert seen == [other]
