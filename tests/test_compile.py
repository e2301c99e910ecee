"""`srft-jax compile`: the slice table, the HLO loop-cost walk, and the command compiling the
demo config's programs for a TPU v5e-4 (v5e:2x2) from this CPU-only machine (needs libtpu:
the `tpu` extra) and for forced CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.yaml")
PROGRAMS = ("train_step", "old_logprobs", "prefill", "decode", "eval_decode")
KEYS = {"peak_bytes", "argument_bytes", "temp_bytes", "fits", "flops", "bytes_accessed", "compile_s"}


# ---- the slice table ----------------------------------------------------------------------------
def test_slice_names_count_cores_or_chips():
    from srft_jax.hardware import slice_for

    v5p = slice_for("v5p-64")  # v5p names count TensorCores: 2 per chip
    assert (v5p.chips, v5p.topology, v5p.host_bounds()) == (32, "v5p:2x4x4", (2, 2, 1))
    assert v5p.hbm_bytes == 95e9 and v5p.generation.peak_flops == 459e12
    v4 = slice_for("v4-8")
    assert (v4.chips, v4.topology) == (4, "v4:2x2x1")
    v5e = slice_for("v5e-8")  # v5e names count chips
    assert (v5e.chips, v5e.topology, v5e.host_bounds()) == (8, "v5e:2x4", (2, 4, 1))
    assert slice_for("v5litepod-4").topology == "v5e:2x2"
    assert slice_for("v6e-256").topology == "v6e:16x16"
    cpu = slice_for("cpu:8")
    assert (cpu.chips, cpu.is_tpu) == (8, False)
    for g in ("v4", "v5e", "v5p", "v6e"):
        assert slice_for(f"{g}-8").generation.source.startswith("https://cloud.google.com/tpu/docs/")


@pytest.mark.parametrize("name, says", [("v5p-63", "count TensorCores"), ("v5e-3", "known slices"),
                                        ("h100-8", "expected a Cloud TPU type"), ("cpu:0", "N >= 1")])
def test_bad_slice_names(name, says):
    from srft_jax.hardware import slice_for

    with pytest.raises(ValueError, match=says):
        slice_for(name)


# ---- the HLO loop-cost walk ------------------------------------------------------------------------
def test_walk_multiplies_loop_bodies_by_their_trip_counts():
    """XLA's cost analysis counts a scan body once; the walk counts it trip-count times, and
    with every trip count set to 1 it gives XLA's matmul FLOPs back."""
    import jax
    import jax.numpy as jnp

    from srft_jax.hlo_cost import loop_costs

    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    one_matmul = 2 * 64**3

    def nested(x):
        def inner(c, _):
            return jnp.tanh(c @ x), None

        def outer(c, _):
            return jax.lax.scan(inner, c, None, length=5)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0]

    compiled = jax.jit(nested).lower(x).compile()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    walk = loop_costs(compiled.as_text())
    ones = loop_costs(compiled.as_text(), ones=True)
    assert walk.flops == pytest.approx(15 * one_matmul, rel=1e-6)
    assert ones.flops == pytest.approx(one_matmul, rel=1e-6)
    assert xla["flops"] >= one_matmul and xla["flops"] < 2 * one_matmul  # XLA: the body once
    assert walk.bytes > 10 * ones.bytes  # 15 reads of x and the carry against 1


def test_walk_charges_an_in_place_update_at_the_bytes_it_writes():
    """Writing one row into a donated [4096, 256] buffer touches that row, not the buffer: the
    walk charges the update (read and written) where XLA's convention charges the whole buffer
    read and written."""
    import jax
    import jax.numpy as jnp

    from srft_jax.hlo_cost import loop_costs

    buf = jax.ShapeDtypeStruct((4096, 256), jnp.float32)
    row = jax.ShapeDtypeStruct((1, 256), jnp.float32)
    i = jax.ShapeDtypeStruct((), jnp.int32)
    write = jax.jit(lambda b, r, i: jax.lax.dynamic_update_slice(b, r, (i, 0)), donate_argnums=0)
    text = write.lower(buf, row, i).compile().as_text()
    whole, row_bytes = 4096 * 256 * 4, 256 * 4
    assert loop_costs(text, in_place=False).bytes >= 2 * whole
    assert loop_costs(text).bytes < 4 * row_bytes + 64


# ---- the command -------------------------------------------------------------------------------
def _compile(tmp_path, topology, *overrides, programs=None):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "srft_jax.cli", "compile", "--config", DEMO, "--topology", topology,
           "--out", str(out), *overrides]
    if programs:
        cmd += ["--programs", programs]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile times are part of the report
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path))
    report = json.loads(out.read_text()) if out.exists() else None
    return done, report


def _check_report(report, topology, chips):
    assert report["topology"] == topology and report["chips"] == chips
    assert set(report["programs"]) == set(PROGRAMS)
    for name, p in report["programs"].items():
        assert KEYS <= set(p), name
        assert p["peak_bytes"] >= p["argument_bytes"] > 0, name
        assert p["fits"] is True, name
        assert p["flops"] > 0 and p["bytes_accessed"] > 0 and p["compile_s"] > 0, name
    train = report["programs"]["train_step"]
    # Parameters and optimiser state are donated: every output but the step's metrics is
    # written into an input buffer.
    assert 0 < train["alias_bytes"] <= train["output_bytes"]
    assert train["output_bytes"] - train["alias_bytes"] < 64 * 1024
    # The loops are counted by their trip counts: the decode loop runs (R - 1) = 23 steps.
    decode = report["programs"]["decode"]
    assert decode["flops"] > 10 * decode["xla_flops_loop_bodies_once"]


def test_compile_demo_for_v5e_4(tmp_path):
    pytest.importorskip("libtpu", reason="compiling for a TPU needs jax[tpu] (pip install -e '.[tpu]')")
    done, report = _compile(tmp_path, "v5e-4")
    assert done.returncode == 0, done.stderr[-3000:]
    _check_report(report, "v5e-4", 4)
    assert report["hbm_bytes_per_chip"] == 16e9
    assert report["step"]["roofline_s"] > 0 and 0 < report["step"]["mfu_ceiling"] < 1
    for name in PROGRAMS:
        assert f"compiling {name}" in done.stderr  # progress
        assert name in done.stdout
    assert "roofline lower bound" in done.stdout and "MFU ceiling" in done.stdout
    # libtpu's start-up warnings stay out of what the command prints.
    for noise in ("TPU_WORKER_HOSTNAMES", "could not determine TPU", "Traceback"):
        assert noise not in done.stderr + done.stdout


def test_oversized_micro_batch_exits_1_with_one_line(tmp_path):
    pytest.importorskip("libtpu", reason="compiling for a TPU needs jax[tpu] (pip install -e '.[tpu]')")
    done, report = _compile(tmp_path, "v5e-4", "train.prompts_per_step=262144",
                            "train.micro_batch_size=1048576", programs="train_step")
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    line = errors[0]
    assert line.startswith("error: train_step does not fit v5e-4: needs ")
    assert "GB over the 16.0 GB of HBM" in line and "train.micro_batch_size" in line
    assert "model.remat" in line and "mesh.fsdp / mesh.tensor" in line
    assert report["programs"]["train_step"]["fits"] is False


def test_compile_demo_on_forced_cpu_devices(tmp_path):
    done, report = _compile(tmp_path, "cpu:4")
    assert done.returncode == 0, done.stderr[-3000:]
    _check_report(report, "cpu:4", 4)
    assert report["hbm_bytes_per_chip"] is None and report["step"]["roofline_s"] is None


def test_lora_update_donates_only_the_adapters(tmp_path):
    """With model.lora.rank > 0 the train step is the loop's LoRA update: the base is a frozen
    argument, so only the adapters and their moments come back (aliased to donated inputs)."""
    pytest.importorskip("libtpu", reason="compiling for a TPU needs jax[tpu] (pip install -e '.[tpu]')")
    done, report = _compile(tmp_path, "v5e-4", "model.lora.rank=4", programs="train_step,old_logprobs")
    assert done.returncode == 0, done.stderr
    train = report["programs"]["train_step"]
    assert 0 < train["alias_bytes"] <= train["output_bytes"] < 0.5 * train["argument_bytes"]
    assert report["programs"]["old_logprobs"]["resident_bytes"] < 0.25 * train["argument_bytes"]
    # The sampler's programs were left out: no step roofline or MFU ceiling from part of a step.
    assert report["step"]["roofline_s"] is None and report["step"]["mfu_ceiling"] is None
    assert "step: no roofline (--programs left out prefill, decode," in done.stdout


def test_bad_topology_is_one_line(tmp_path):
    done, _ = _compile(tmp_path, "v5p-63")
    assert done.returncode == 2  # a bad command line (docs/errors.md)
    assert done.stderr.strip().splitlines() == [done.stderr.strip().splitlines()[-1]]
    assert done.stderr.startswith("error: --topology v5p-63: v5p names count TensorCores")


def test_a_tpu_slice_without_libtpu_is_one_line(monkeypatch):
    """Without the tpu extra a TPU topology stops with one line naming the fix (jax's own error is
    a traceback about 'JAX TPU support')."""
    import importlib.util

    from srft_jax.faults import RunError
    from srft_jax.hardware import slice_for

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(RunError) as e:
        slice_for("v5e-4").devices()
    assert str(e.value).startswith("--topology v5e-4: compiling for a TPU needs libtpu")
    assert "pip install -e '.[tpu]'" in str(e.value) and "\n" not in str(e.value)
