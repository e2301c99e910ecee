"""The failures a run turns into a one-line exit instead of a traceback or a hang.

`RunError` is the base: a problem the user can act on, whose `str()` is one line naming the file
or key; `srft-jax` prints it as `error: ...` and exits 1, without a traceback. `UsageError` (and
its subclass `config.ConfigError`) is a command line or config that is wrong as written, whatever
the files and devices: exit 2, as argparse does. `MissingDataError`: a path that does not exist or
lacks a file it needs (a model directory without weights or tokenizer). `MeshError`: a mesh that
does not fit the devices.

`RunWriteError`: writing a run's output failed (a checkpoint, metrics.jsonl, TensorBoard
events): disk full, quota, permissions, a vanished mount. It names the path and the OS error;
what was written before (the previous complete checkpoint, earlier metrics lines) is intact.

`CheckpointRestoreError`: no checkpoint of the run restores (each damaged one was moved aside).

Both carry a one-line `str()`; the loop catches them, prints that line and exits non-zero.
"""

from __future__ import annotations

import os
import re
from typing import Optional

# tensorstore (orbax's array writer) reports OS errors inside ValueError messages like
#   Failed writing: "/run/checkpoints/2.orbax-checkpoint-tmp/.../d/8db8": ... [os_error_code='28']
_TS_ERRNO = re.compile(r"os_error_code=\W*(\d+)")
_TS_PATH = re.compile(r'(?:Failed writing|Error writing local file|local file|Failed to open|Error opening)\W*"([^"]+)"')


class RunError(Exception):
    """A problem the user can act on; `str()` is one line naming the file or key."""


class UsageError(RunError, ValueError):
    """A command-line argument or config value that is wrong as written (an unknown name, a
    malformed size): `srft-jax` exits 2. The message names the argument or key."""


class MeshError(RunError, ValueError):
    """A mesh (`mesh.data/fsdp/tensor`) that does not fit the devices of this machine or job."""


class RunWriteError(RunError):
    """Writing `path` failed with an OS error (`errno`, `strerror`); `what` says what was written.

    `str()` is one line, e.g.
    ``cannot write checkpoint of step 20 (runs/x/checkpoints/20): [Errno 28] No space left on device``.
    """

    def __init__(self, what: str, path: str, errno: Optional[int], strerror: str, note: str = ""):
        self.what, self.path, self.errno, self.strerror, self.note = what, path, errno, strerror, note
        code = f"[Errno {errno}] " if errno is not None else ""
        super().__init__(f"cannot write {what} ({path}): {code}{strerror}{'; ' + note if note else ''}")

    @classmethod
    def from_exception(cls, what: str, path: str, exc: BaseException, note: str = "") -> "RunWriteError":
        """Wraps any exception raised while writing; finds the OS error in its chain or message."""
        code, text, where = os_error_of(exc)
        return cls(what, where or path, code, text, note)


class CheckpointRestoreError(RunError):
    """No checkpoint of a run restores; the message (one line) says where the bad ones went."""


class DataError(RunError, ValueError):
    """Training data that cannot be used; the message names the file or the config key."""


class DestinationExistsError(RunError, FileExistsError):
    """An output path that must be new (or empty) holds files already; the message names it."""


class BadModelError(RunError, ValueError):
    """A model file or directory that cannot be used: a config.json this project cannot read
    or does not support, tensors that do not match the architecture; the message names the file."""


class MissingExtraError(RunError, ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


class MissingDataError(RunError, FileNotFoundError):
    """A file or directory that does not exist, or lacks a file it needs (data, a model
    directory's weights or tokenizer, a run's metrics); the message names it and the argument."""


def os_error_of(exc: BaseException) -> tuple[Optional[int], str, Optional[str]]:
    """(errno, strerror, filename) of the OS error behind `exc`, searching its cause chain and,
    for tensorstore errors, the message; errno None (and the first message line) if none."""
    seen = set()
    chain: list[BaseException] = []
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno, e.strerror or os.strerror(e.errno), e.filename
    for e in chain:
        text = str(e)
        m = _TS_ERRNO.search(text)
        if m:
            code = int(m.group(1))
            path = _TS_PATH.search(text)
            return code, os.strerror(code), path.group(1) if path else None
    first = (str(exc).splitlines() or [""])[0]
    return None, f"{type(exc).__name__}: {first[:300]}", None


