"""Test set-up: 8 forced host CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled programs are shared between tests and the subprocesses some tests start (the same
# tiny models compile many times otherwise). Cache entries are keyed by the full program.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "srft_jax_test_xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def mount_tmpfs(mount, size: str):
    """A tmpfs of `size` (e.g. "64k") mounted at the new directory `mount` for a `with` block;
    skips the test where mounting is not allowed. Unmounted afterwards, whatever happens."""
    import contextlib
    import subprocess

    import pytest

    @contextlib.contextmanager
    def mounted():
        mount.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        try:
            yield mount
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)

    return mounted()

