"""Damaged checkpoints and failed checkpoint saves (issue 15), on real orbax checkpoints of the
tiny decoder's parameters and AdamW state, sharded over the 8 test devices.

Damage: a data file truncated or overwritten, another checkpoint's data files in its place (bytes
that decode: caught by the fingerprints), a meta record that is not JSON / not UTF-8 / lacks
'data'. The newest checkpoint that restores is used; each bad one is moved to
RUN_DIR/checkpoints.bad (never deleted) with a one-line warning; a checkpoint of another model
is a config error and stays in place. Save failures: a full disk (a tiny tmpfs; skipped where
mounting is not permitted) and an injected OSError end in `RunWriteError` naming the path and
the OS error, within seconds, leaving the previous checkpoint intact and no thread behind.

Two processes (`jax.distributed`, gloo, 4 CPU devices each) restore with damage that only one
of them reads (the data files process 1 wrote): both must fall back to the same checkpoint.
The processes are this file run as a script:
    python tests/test_faults_checkpoint.py --run-dir DIR --port PORT --process-id ID
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import mount_tmpfs
from flax import nnx

from srft_jax.checkpoint import BAD_DIR, META_FILE, Checkpointer
from srft_jax.faults import CheckpointRestoreError, RunWriteError
from srft_jax.mesh import MeshConfig, make_mesh
from srft_jax.models import ModelConfig
from srft_jax.models.weights import create_sharded_model
from srft_jax.train_step import OptimizerConfig, make_optimizer, opt_state_shardings, param_shardings

pytestmark = pytest.mark.compat

CFG = ModelConfig.tiny(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
PATIENCE_S = 600.0  # only ever waited out when a check is broken (a busy machine is slow, never this slow)


@pytest.fixture(scope="module")
def state():
    """(params, opt_state) of the tiny decoder and AdamW; a second, different pair."""
    mesh = make_mesh(MeshConfig(fsdp=-1))
    with jax.set_mesh(mesh):
        params = nnx.to_pure_dict(nnx.state(create_sharded_model(CFG, mesh, seed=0)))
        tx = make_optimizer(OptimizerConfig(lr=1e-3))
        p_sh = param_shardings(params, mesh)
        opt = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, p_sh, mesh))(params)
        params2 = jax.tree.map(lambda x: x + 1, params)
    return params, opt, params2


def _meta(step):
    return {"step": step, "data": {"epoch": 0, "position": step}}


def _save(run_dir, steps, params, opt, params_at=None, keep=5):
    ckpt = Checkpointer(str(run_dir), keep=keep)
    for s in steps:
        ckpt.save(s, (params_at or {}).get(s, params), opt, _meta(s))
    ckpt.close()


def _same(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def _data_files(step_dir):
    """Every parameter data file of a checkpoint: those each process wrote and those of the
    merged database (orbax may copy small values into the latter, and a file can also hold
    values a restore never reads, so damaging a single file may leave the values intact)."""
    files = (glob.glob(os.path.join(step_dir, "params", "ocdbt.process_*", "d", "*"))
             + glob.glob(os.path.join(step_dir, "params", "d", "*")))
    assert files
    return files


def _restore(run_dir, params, opt):
    ckpt = Checkpointer(str(run_dir))
    try:
        return ckpt.restore_latest(params, opt, meta_keys=("data",))
    finally:
        ckpt.close()


def test_no_checkpoint_gives_none(tmp_path, state):
    params, opt, _ = state
    assert _restore(tmp_path, params, opt) is None


def test_intact_checkpoint_restores_exactly(tmp_path, state):
    params, opt, params2 = state
    _save(tmp_path, [1, 2], params, opt, {2: params2})
    r = _restore(tmp_path, params, opt)
    assert r.step == 2 and r.meta == _meta(2)
    assert _same(r.params, params2) and _same(r.opt_state, opt)
    assert not os.path.exists(tmp_path / BAD_DIR)


def _truncate(step_dir):
    for path in _data_files(step_dir):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _overwrite(step_dir):
    for path in _data_files(step_dir):
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("damage", [_truncate, _overwrite], ids=["truncated", "overwritten"])
def test_damaged_data_file_falls_back_to_the_previous_checkpoint(tmp_path, state, damage, caplog):
    params, opt, params2 = state
    _save(tmp_path, [1, 2], params, opt, {2: params2})
    damage(tmp_path / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="srft_jax.checkpoint"):
        r = _restore(tmp_path, params2, opt)
    assert r.step == 1 and _same(r.params, params) and _same(r.opt_state, opt)
    moved = glob.glob(str(tmp_path / BAD_DIR / "2-*"))
    assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], "params"))  # moved, not deleted
    assert not os.path.exists(tmp_path / "checkpoints" / "2")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "step 2 does not restore" in warnings[0] and moved[0] in warnings[0]
    # The next run starts from step 1 and can save step 2 again.
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 1
    ckpt.save(2, params2, opt, _meta(2))
    ckpt.close()
    assert _restore(tmp_path, params, opt).step == 2


def test_bytes_that_decode_but_changed_are_caught_by_the_fingerprints(tmp_path, state, caplog):
    """Checkpoint 2's parameter files replaced by those of another checkpoint of the same shapes:
    every file decodes, only the fingerprints recorded at save time can tell."""
    params, opt, params2 = state
    _save(tmp_path, [1, 2], params, opt, {2: params2})
    _save(tmp_path / "other", [7], params, opt)
    target = tmp_path / "checkpoints" / "2" / "params"
    shutil.rmtree(target)
    shutil.copytree(tmp_path / "other" / "checkpoints" / "7" / "params", target)
    with caplog.at_level(logging.WARNING, logger="srft_jax.checkpoint"):
        r = _restore(tmp_path, params, opt)
    assert r.step == 1
    assert "does not match the fingerprint" in caplog.text


GARBAGE_META = {
    "not_json": (b"{\"step\": 2, \"data\": ", "is not valid JSON"),
    "not_utf8": (b"\xff\xfe\x00garbage", "is not UTF-8"),
    "no_data_key": (b"{\"step\": 2}", "has no 'data' key"),
    "not_an_object": (b"[1, 2]", "not an object"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE_META))
def test_bad_meta_record_names_the_file(tmp_path, state, caplog, name):
    params, opt, _ = state
    _save(tmp_path, [1, 2], params, opt)
    meta_path = tmp_path / "checkpoints" / "2" / META_FILE
    content, expected = GARBAGE_META[name]
    meta_path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="srft_jax.checkpoint"):
        r = _restore(tmp_path, params, opt)
    assert r.step == 1
    assert str(meta_path) in caplog.text and expected in caplog.text


def test_none_restores_one_line_error_and_nothing_deleted(tmp_path, state):
    params, opt, _ = state
    _save(tmp_path, [1, 2], params, opt)
    _truncate(tmp_path / "checkpoints" / "2")
    (tmp_path / "checkpoints" / "1" / META_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointRestoreError) as err:
        _restore(tmp_path, params, opt)
    message = str(err.value)
    assert "\n" not in message and "step 2" in message and "step 1" in message
    assert str(tmp_path / BAD_DIR) in message
    assert sorted(os.path.basename(p).split("-")[0] for p in glob.glob(str(tmp_path / BAD_DIR / "*"))) == ["1", "2"]
    assert _restore(tmp_path, params, opt) is None  # the run now starts afresh


def test_checkpoint_of_another_model_is_a_config_error_not_damage(tmp_path, state):
    params, opt, _ = state
    _save(tmp_path, [1], params, opt)
    mesh = make_mesh(MeshConfig(fsdp=-1))
    with jax.set_mesh(mesh):
        wider = nnx.to_pure_dict(nnx.state(create_sharded_model(CFG.replace(hidden_size=64), mesh, seed=0)))
    with pytest.raises(CheckpointRestoreError, match="different model") as err:
        _restore(tmp_path, wider, None)
    assert "\n" not in str(err.value)
    assert os.path.isdir(tmp_path / "checkpoints" / "1") and not os.path.exists(tmp_path / BAD_DIR)


def test_params_only_and_skip_without_moving(tmp_path, state):
    """Reading another run's checkpoints (model.path=RUN_DIR): damaged ones are skipped, not moved."""
    params, opt, params2 = state
    _save(tmp_path, [1, 2], params, opt, {2: params2})
    _truncate(tmp_path / "checkpoints" / "2")
    ckpt = Checkpointer(str(tmp_path))
    r = ckpt.restore_latest(params, move_aside=False)
    ckpt.close()
    assert r.step == 1 and r.opt_state is None and _same(r.params, params)
    assert os.path.isdir(tmp_path / "checkpoints" / "2") and not os.path.exists(tmp_path / BAD_DIR)


# ---- failed saves ------------------------------------------------------------------------------
def _non_daemon_threads():
    return {t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()}


def _until_raises(ckpt):
    """Calls ckpt.check() until it raises (the failing background save finishes by itself)."""
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        ckpt.check()
        time.sleep(0.05)
    raise AssertionError(f"check() did not report the failed save within {PATIENCE_S} s")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KiB tmpfs (room for one checkpoint of the tiny state, not two)."""
    with mount_tmpfs(tmp_path / "disk", "600k") as mount:
        yield mount


def test_full_disk_save_failure_is_one_error_and_keeps_the_previous_checkpoint(tiny_disk, state):
    params, opt, params2 = state
    before = _non_daemon_threads()
    ckpt = Checkpointer(str(tiny_disk), keep=1)
    ckpt.save(1, params, opt, _meta(1))
    ckpt.check()
    with pytest.raises(RunWriteError) as err:
        ckpt.save(2, params2, opt, _meta(2))
        _until_raises(ckpt)
    e = err.value
    message = str(e)
    assert "\n" not in message and "step 2" in message and str(tiny_disk) in message
    assert e.errno == 28 and "No space left on device" in message
    assert "latest complete checkpoint is step 1" in message
    ckpt.close()  # returns (the failure was reported once)
    assert _non_daemon_threads() <= before
    r = _restore(tiny_disk, params, opt)
    assert r.step == 1 and _same(r.params, params)
    assert os.listdir(tiny_disk / "checkpoints") == ["1"]  # the partial save was cleaned up


def test_injected_save_error_names_path_and_os_error(tmp_path, state, monkeypatch):
    """The same on any machine: orbax raising an OSError while saving."""
    import orbax.checkpoint as ocp

    params, opt, _ = state
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, params, opt, _meta(1))

    def fail(self, step, *args, **kwargs):
        raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(ocp.CheckpointManager, "save", fail)
    with pytest.raises(RunWriteError, match=r"step 2 .*\[Errno 122\] Disk quota exceeded") as err:
        ckpt.save(2, params, opt, _meta(2))
    assert err.value.path == str(tmp_path / "checkpoints" / "2")
    monkeypatch.undo()
    ckpt.close()
    assert _restore(tmp_path, params, opt).step == 1


# ---- two processes -------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_state(mesh):
    with jax.set_mesh(mesh):
        params = nnx.to_pure_dict(nnx.state(create_sharded_model(CFG, mesh, seed=0)))
        tx = make_optimizer(OptimizerConfig(lr=1e-3))
        opt = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, param_shardings(params, mesh), mesh))(params)
        params2 = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p))(params)
    return params, opt, params2


def _gathered_sum(tree):
    """One number per tree, the same on every process (a check that the values are the saved ones)."""
    return float(jax.jit(lambda t: sum(jax.numpy.sum(x.astype(jax.numpy.float32)) for x in jax.tree.leaves(t)))(tree))


def process_main(run_dir: str, port: int, process_id: int) -> None:
    """Saves checkpoints 1 and 2; process 0 empties the data files process 1 wrote for
    checkpoint 2 (only process 1 reads them back); both restore.

    Emptied, not cut in half: how orbax groups values into data files and orders them varies
    from run to run (4 to 11 files per process, of other sizes, in three runs of this save), so
    the first halves sometimes held every value process 1 reads back, and no process saw damage
    (both restored step 2: twice in CI runs under load)."""
    from srft_jax import distributed

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    mesh = make_mesh(distributed.initialize(MeshConfig(
        fsdp=-1, coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)))
    params, opt, params2 = _tiny_state(mesh)
    _save(run_dir, [1, 2], params, opt, {2: params2})
    distributed.barrier("saved")
    if process_id == 0:
        written_by_1 = glob.glob(os.path.join(run_dir, "checkpoints", "2", "params", "ocdbt.process_1", "d", "*"))
        assert written_by_1
        for path in written_by_1:
            with open(path, "r+b") as f:
                f.truncate(0)
    distributed.barrier("damaged")
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("srft_jax.checkpoint").addHandler(handler)
    r = _restore(run_dir, params, opt)
    with open(os.path.join(run_dir, f"result{process_id}.json"), "w") as f:
        json.dump({"step": r.step, "sum": _gathered_sum(r.params), "expected": _gathered_sum(params),
                   "warnings": records}, f)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_when_only_one_reads_the_damage(tmp_path):
    run_dir = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    procs, logs = [], [tmp_path / f"process{pid}.log" for pid in range(2)]
    try:
        for pid in range(2):
            with open(logs[pid], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--run-dir", str(run_dir), "--port", str(port),
                     "--process-id", str(pid)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + PATIENCE_S
        for p, log in zip(procs, logs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:  # killed below (SIGKILL: JAX's notifier catches SIGTERM)
                raise AssertionError(f"the processes did not finish within {PATIENCE_S:.0f} s and were "
                                     f"killed; last lines of {log}:\n{log.read_text()[-2000:]}") from None
            assert p.returncode == 0, f"{log} (exit {p.returncode}):\n{log.read_text()[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads((run_dir / f"result{pid}.json").read_text()) for pid in range(2)]
    assert [r["step"] for r in results] == [1, 1]
    assert all(r["sum"] == r["expected"] for r in results)  # step 1's values, not step 2's
    assert len(glob.glob(str(run_dir / BAD_DIR / "2-*"))) == 1 and not (run_dir / "checkpoints" / "2").exists()
    # Process 1 read the damage; process 0 read its own intact shards and followed.
    assert "(it failed to restore on another process)" in results[0]["warnings"][0]
    assert "checkpoint step 2 does not restore (Exception: " in results[1]["warnings"][0]
    assert [len(r["warnings"]) for r in results] == [1, 1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    a = parser.parse_args()
    process_main(a.run_dir, a.port, a.process_id)
