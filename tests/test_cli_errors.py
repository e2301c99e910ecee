"""Every sub-command answers a bad path, a missing file, a model directory without weights or
tokenizer, a mesh that does not fit the devices and a bad value with ONE line on stderr naming
the argument or config key, exit 1 (2 for a malformed command line or config), no traceback
(issue 22). `--debug` / SRFT_JAX_DEBUG=1 shows the traceback instead.

The cases run in process through `srft_jax.cli.main` (in a directory of prepared inputs, so the
lines are the same on every machine); a few run through the `srft-jax` console script in a fresh
process to prove what a user sees: exactly the one line, without libtpu's start-up warnings or
transformers' "PyTorch was not found" advisory. docs/errors.md holds the table of these cases;
`SRFT_JAX_WRITE_ERRORS_DOC=1 pytest tests/test_cli_errors.py` rewrites it from this run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from srft_jax.cli import main
from srft_jax.faults import MissingDataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "errors.md")
ROW = {"prompt": "What is 1 + 1?", "target": "<think>\n1 + 1 = 2.\n</think>\n\n\\boxed{2}", "answer": "2"}

# (id, argv, exit code, the name the line must contain). Paths are relative to the directory
# that `inputs` prepares: hf/ (config.json, weights, tokenizer), no-weights/, no-tokenizer/,
# run/ (a training run: checkpoints/), bad-json/, empty/, data/train.jsonl, dest/ (not empty),
# weights.bin (a file that is no model), bad.yaml.
CASES = [
    # train: config keys (exit 2) and what they name (exit 1)
    ("train-model-path", ["train", "model.path=/nope"], 1, "model.path"),
    ("train-model-no-weights", ["train", "model.path=no-weights"], 1, "model.path"),
    ("train-model-no-tokenizer", ["train", "model.path=no-tokenizer"], 1, "model.path"),
    ("train-model-file", ["train", "model.path=weights.bin"], 1, "model.path"),
    ("train-tokenizer", ["train", "model.tokenizer=/nope"], 1, "model.tokenizer"),
    ("train-data-source", ["train", "data.source=/nope.jsonl"], 1, "data.source"),
    ("train-data-empty-dir", ["train", "data.source=empty"], 1, "data.source"),
    ("train-data-no-tokenizer", ["train", "data.source=data/train.jsonl"], 2, "model.tokenizer"),
    ("train-mesh", ["train", "mesh.fsdp=3"], 1, "mesh.fsdp=3"),
    ("train-mesh-zero", ["train", "mesh.fsdp=0"], 2, "mesh.fsdp"),
    ("train-bad-value", ["train", "train.optim.lr=fast"], 2, "train.optim.lr"),
    ("train-unknown-key", ["train", "train.nosuch=1"], 2, "train.nosuch"),
    ("train-config-missing", ["train", "--config", "/nope.yaml"], 2, "/nope.yaml"),
    ("train-config-syntax", ["train", "--config", "bad.yaml"], 2, "bad.yaml"),
    ("train-override-form", ["train", "train.steps"], 2, "train.steps"),
    # sample
    ("sample-model", ["sample", "--model", "/nope", "--prompt", "hi"], 1, "--model"),
    ("sample-no-weights", ["sample", "--model", "no-weights", "--prompt", "hi"], 1, "--model"),
    ("sample-no-tokenizer", ["sample", "--model", "no-tokenizer", "--prompt", "hi"], 1, "--model"),
    ("sample-run-dir", ["sample", "--model", "run", "--prompt", "hi"], 2, "--model"),
    ("sample-no-prompt", ["sample", "--model", "hf"], 2, "--prompt"),
    ("sample-temperature", ["sample", "--model", "hf", "--prompt", "hi", "--temperature", "-1"], 2,
     "--temperature"),
    ("sample-n", ["sample", "--model", "hf", "--prompt", "hi", "--n", "two"], 2, "--n"),
    # eval
    ("eval-model", ["eval", "--model", "/nope"], 1, "--model"),
    ("eval-no-model", ["eval"], 2, "--model"),
    ("eval-model-no-config", ["eval", "--model", "empty"], 1, "--model"),
    ("eval-compare", ["eval", "--compare", "/nope", "/nope2"], 1, "--compare"),
    ("eval-benchmarks", ["eval", "--model", "hf", "--benchmarks", "aime24,nosuch"], 2, "--benchmarks"),
    ("eval-data-dir", ["eval", "--model", "hf", "--data-dir", "/nope"], 1, "--data-dir"),
    ("eval-top-p", ["eval", "--model", "hf", "--top-p", "2"], 2, "--top-p"),
    ("eval-samples", ["eval", "--model", "hf", "--samples", "aime24=x"], 2, "samples"),
    ("eval-mesh", ["eval", "--model", "hf", "--fsdp", "3"], 1, "fsdp=3"),
    # convert
    ("convert-src", ["convert", "/nope", "out"], 1, "SRC"),
    ("convert-no-weights", ["convert", "no-weights", "out"], 1, "SRC"),
    ("convert-shard-size", ["convert", "hf", "out", "--max-shard-size", "4XB"], 2, "--max-shard-size"),
    ("convert-run-dir", ["convert", "run", "out"], 1, "SRC"),
    ("convert-dtype", ["convert", "hf", "out", "--dtype", "int8"], 2, "--dtype"),
    # info
    ("info-model", ["info", "/nope"], 1, "/nope"),
    ("info-no-config", ["info", "empty"], 1, "config.json"),
    ("info-bad-config", ["info", "bad-json"], 1, "config.json"),
    # data convert
    ("data-src", ["data", "convert", "/nope.jsonl", "out"], 1, "SRC"),
    ("data-dest-not-empty", ["data", "convert", "data", "dest", "--no-progress"], 1, "dest"),
    ("data-split", ["data", "convert", "data", "out", "--split", "test", "--no-progress"], 1, "'test'"),
    ("data-format", ["data", "convert", "data", "out", "--format", "csv"], 2, "--format"),
    ("data-no-action", ["data"], 2, "ACTION"),
    # analyze
    ("analyze-base", ["analyze", "--base", "/nope", "--models", "hf", "--data", "data/train.jsonl",
                      "--out", "an"], 1, "--base"),
    ("analyze-models", ["analyze", "--base", "hf", "--models", "hf,no-weights", "--data",
                        "data/train.jsonl", "--out", "an"], 1, "--models"),
    ("analyze-data", ["analyze", "--base", "hf", "--models", "hf", "--data", "/nope.jsonl",
                      "--out", "an"], 1, "--data"),
    ("analyze-names", ["analyze", "--base", "hf", "--models", "hf", "--names", "a,b", "--data",
                       "data/train.jsonl", "--out", "an"], 2, "--names"),
    # compile
    ("compile-config", ["compile", "--config", "/nope.yaml", "--topology", "v5e-4"], 2, "/nope.yaml"),
    ("compile-topology", ["compile", "--config", "demo", "--topology", "v9z-8"], 2, "--topology"),
    ("compile-slice", ["compile", "--config", "demo", "--topology", "v5e-3"], 2, "--topology"),
    ("compile-unknown-key", ["compile", "--config", "demo", "--topology", "v5e-4", "train.nosuch=1"],
     2, "train.nosuch"),
    # plot
    ("plot-run-dir", ["plot", "/nope"], 1, "/nope"),
    # the command line itself
    ("unknown-command", ["nosuch"], 2, "nosuch"),
    ("log-level", ["--log-level", "LOUD", "plot", "run"], 2, "--log-level"),
]

# Cases that also run through the console script in a fresh process (1 CPU device, no
# JAX_PLATFORMS, torch not importable): exactly this one line on stderr, nothing else.
SUBPROCESS_CASES = ["train-data-source", "train-mesh", "sample-model", "eval-compare", "plot-run-dir"]

RESULTS: dict[str, tuple[str, int]] = {}  # id -> (the line, exit code), for the docs table


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The directory of prepared inputs the cases name."""
    root = tmp_path_factory.mktemp("inputs")

    def write(path, text=""):
        path = root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    config = json.dumps({"model_type": "qwen2"})
    for name, files in (("hf", ("config.json", "model.safetensors", "tokenizer.json")),
                        ("no-weights", ("config.json", "tokenizer.json")),
                        ("no-tokenizer", ("config.json", "model.safetensors"))):
        for f in files:
            write(f"{name}/{f}", config if f == "config.json" else "")
    (root / "run" / "checkpoints").mkdir(parents=True)
    write("bad-json/config.json", "{")
    (root / "empty").mkdir()
    write("data/train.jsonl", json.dumps(ROW) + "\n")
    write("dest/something", "x")
    write("weights.bin", "x")
    write("bad.yaml", "train:\n  steps: [1, 2\n")
    return root


def _case(case_id):
    return next(c for c in CASES if c[0] == case_id)


def _check_line(err: str, name: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and name in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_the_table_covers_every_command():
    from srft_jax.cli import COMMANDS

    assert len(CASES) > 30 and len({c[0] for c in CASES}) == len(CASES)
    assert set(COMMANDS) <= {c[1][0] for c in CASES}


@pytest.mark.parametrize("case_id, argv, code, name", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(inputs, monkeypatch, capsys, case_id, argv, code, name):
    monkeypatch.chdir(inputs)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's errors exit from inside parse_args
        rc = e.code
    out, err = capsys.readouterr()
    line = _check_line(err, name)
    assert rc == code, line
    assert out == ""
    RESULTS[case_id] = (line, rc)


def _console(argv, cwd, env_extra=None, block_torch=False):
    """`srft-jax ARGV` in a fresh process as a user runs it: the console script (where it is on
    PATH), with one CPU device and no JAX_PLATFORMS. `block_torch`: through the same entry
    point (`srft_jax.cli:main`) with torch made unimportable (`sys.modules["torch"] = None`)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "SRFT_JAX_DEBUG", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(env_extra or {})
    script = shutil.which("srft-jax")
    if block_torch or script is None:
        prelude = "sys.modules['torch'] = None; " if block_torch else ""
        cmd = [sys.executable, "-c", f"import sys; {prelude}from srft_jax.cli import main; "
                                     "sys.exit(main())", *argv]
    else:
        cmd = [script, *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_console_script_prints_only_the_line(inputs, case_id):
    _, argv, code, name = _case(case_id)
    done = _console(argv, inputs)
    line = _check_line(done.stderr, name)  # no libtpu warnings, no "PyTorch was not found"
    assert done.returncode == code and done.stdout == ""
    if case_id == "train-mesh":  # one device here, not the tests' eight
        assert line.endswith("data*fsdp*tensor = 3 but there is 1 device (use -1 for one axis to absorb the rest)")
        RESULTS["train-mesh-1-device"] = (line, done.returncode)


def test_a_run_that_reads_a_tokenizer_without_torch_prints_only_its_error(inputs, tmp_path):
    """The demo config goes as far as loading its (transformers) tokenizer and the data, with
    torch not importable, then stops on a value that is too big for the data: one line."""
    done = _console(["--log-level", "WARNING", "train", f"train.run_dir={tmp_path / 'run'}",
                     "train.prompts_per_step=100000"], inputs, block_torch=True)
    _check_line(done.stderr, "train.prompts_per_step=100000")
    assert done.returncode == 1


def test_debug_shows_the_traceback(inputs, monkeypatch, capsys):
    monkeypatch.chdir(inputs)
    for argv in (["--debug", "plot", "/nope"], ["plot", "/nope", "--debug"]):
        with pytest.raises(MissingDataError, match="metrics.jsonl"):
            main(argv)
    monkeypatch.setenv("SRFT_JAX_DEBUG", "1")
    with pytest.raises(MissingDataError):
        main(["plot", "/nope"])
    monkeypatch.setenv("SRFT_JAX_DEBUG", "0")
    assert main(["plot", "/nope"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_debug_traceback_in_a_fresh_process(inputs):
    done = _console(["--debug", "plot", "/nope"], inputs)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("srft_jax.faults.MissingDataError: no metrics.jsonl")
    done = _console(["plot", "/nope"], inputs, {"SRFT_JAX_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr


def test_a_new_command_inherits_the_one_line_errors(monkeypatch, capsys):
    """The mechanism lives in cli.main: a command added to COMMANDS that raises the project's
    errors gets the one line and the exit code without code of its own."""
    import types

    from srft_jax import cli
    from srft_jax.faults import MeshError, UsageError

    module = types.ModuleType("srft_jax.commands.fake")
    module.add_arguments = lambda parser: parser.add_argument("--what")

    def run(args):
        raise {"usage": UsageError("--what='x': not a thing"), "mesh": MeshError("mesh.fsdp=3: no")}[args.what]

    module.run = run
    monkeypatch.setitem(sys.modules, "srft_jax.commands.fake", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", "a test command")
    assert main(["fake", "--what", "usage"]) == 2
    assert capsys.readouterr().err == "error: --what='x': not a thing\n"
    assert main(["fake", "--what", "mesh"]) == 1
    assert capsys.readouterr().err == "error: mesh.fsdp=3: no\n"
    with pytest.raises(MeshError):
        main(["fake", "--what", "mesh", "--debug"])


def test_docs_table_lists_every_case():
    """docs/errors.md shows, for every case, the exact line it prints and its exit code."""
    if len(RESULTS) < len(CASES):
        pytest.skip("only when every case ran in this session")
    table = render_table()
    if os.environ.get("SRFT_JAX_WRITE_ERRORS_DOC"):
        text = open(DOC, encoding="utf-8").read()
        start, end = text.index(BEGIN), text.index(END) + len(END)
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(text[:start] + table + text[end:])
    assert table in open(DOC, encoding="utf-8").read()


BEGIN, END = "<!-- cases: begin -->", "<!-- cases: end -->"


def render_table() -> str:
    rows = [BEGIN, "", "| command | prints (stderr, one line) | exit |", "|---|---|---|"]
    for case_id, argv, _, _ in CASES:
        line, rc = RESULTS[case_id]
        rows.append(f"| `srft-jax {' '.join(argv)}` | `{line}` | {rc} |")
        if case_id == "train-mesh" and "train-mesh-1-device" in RESULTS:
            line, rc = RESULTS["train-mesh-1-device"]
            rows.append(f"| same, on a machine with one device | `{line}` | {rc} |")
    rows += ["", END]
    return "\n".join(rows)
