"""A LoRA training run end to end (issue 21): checkpoints hold the adapters and their optimiser
state only (plus the base's path and fingerprint), a run killed with SIGKILL resumes exactly,
another base model is a one-line error, and the run exports the merged model and a PEFT
adapter directory; `srft-jax convert RUN_DIR` merges the same model."""

import json
import os
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from srft_jax.cli import main as cli_main
from test_faults_loop import PATIENCE_S, _kill, _stable, _start, _wait_for, STEPS
import test_faults_loop

# With adapter dropout: the resumed run must draw the same dropout masks as the reference.
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.1", "train.optim.lr=1e-2"]


def _cmd(run_dir, *extra):
    return test_faults_loop._cmd(run_dir, *LORA, *extra)


def _tree(run_dir, step, item):
    path = os.path.abspath(os.path.join(run_dir, "checkpoints", str(step), item))
    return ocp.StandardCheckpointer().restore(path)


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _paths(v, prefix + (str(k),))]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in _paths(v, prefix + (str(i),))]
    return [prefix] if hasattr(tree, "shape") else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted LoRA run of STEPS steps, with the HF and PEFT exports."""
    ref = tmp_path_factory.mktemp("lora") / "ref"
    cmd = [c for c in _cmd(ref) if c != "train.export_hf=false"]
    subprocess.run(cmd, check=True, timeout=PATIENCE_S, capture_output=True)
    return ref


def test_checkpoints_hold_adapters_and_their_optimiser_state_only(reference):
    params = _tree(reference, STEPS, "params")
    names = {p[-1] for p in _paths(params)}
    assert names == {"lora_a", "lora_b"}
    opt_state = _tree(reference, STEPS, "opt_state")
    shapes = sorted(tuple(np.shape(x)) for x in
                    [v for p in _paths(opt_state) for v in [_get(opt_state, p)]] if np.ndim(x))
    adapter_shapes = sorted(tuple(np.shape(_get(params, p))) for p in _paths(params))
    assert shapes == sorted(adapter_shapes * 2)  # Adam's mu and nu, nothing else per parameter
    with open(os.path.join(reference, "checkpoints", str(STEPS), "meta", "metadata")) as f:
        meta = json.load(f)
    assert meta["lora_base"]["path"] is None and len(meta["lora_base"]["fingerprint"]) == 16
    assert any(float(np.abs(_get(params, p)).max()) > 0 for p in _paths(params) if p[-1] == "lora_b")


def _get(tree, path):
    for k in path:
        tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k]
    return tree


def test_sigkill_resume_is_exact(tmp_path, reference):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        _wait_for(proc, lambda: os.path.isdir(run / "checkpoints" / "2"))
    finally:
        _kill(proc)
    subprocess.run(_cmd(run), check=True, timeout=PATIENCE_S, capture_output=True)
    got, want = _stable(run), _stable(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got == want
    a, b = _tree(run, STEPS, "params"), _tree(reference, STEPS, "params")
    for p in _paths(b):
        np.testing.assert_array_equal(np.asarray(_get(a, p)), np.asarray(_get(b, p)))


def test_another_base_model_is_a_one_line_error(tmp_path, reference, capsys):
    import shutil

    run = tmp_path / "other"
    shutil.copytree(reference, run)
    # train.seed initialises the (random) base: another seed is another base model.
    rc = cli_main(["--log-level", "ERROR", "train", *_cmd(run, f"train.steps={STEPS + 2}", "train.seed=7")[6:]])
    out = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    errors = [line for line in out if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "holds LoRA adapters of base model" in errors[0] and "fingerprint" in errors[0]


def test_exports_merged_model_and_peft_adapter_and_convert_merges_the_same(tmp_path, reference):
    from srft_jax.models.lora import PEFT_CONFIG, PEFT_WEIGHTS

    peft_dir = reference / "peft"
    with open(peft_dir / PEFT_CONFIG) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    adapters = load_file(str(peft_dir / PEFT_WEIGHTS))
    assert len(adapters) == 2 * 7 * 1  # A and B of 7 projections in 1 layer (SMALL)
    out = tmp_path / "converted"
    assert cli_main(["convert", str(reference), str(out), "--dtype", "float32"]) == 0
    exported, converted = load_file(str(reference / "hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == converted.keys()
    for k in exported:
        np.testing.assert_array_equal(exported[k], converted[k], err_msg=k)
