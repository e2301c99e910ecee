"""Orbax checkpoints of a training run: parameters, optimiser state and a JSON record of the
step, the data iterator position and anything else the loop needs to continue exactly.

Saves are asynchronous and committed atomically by orbax (written to a temporary directory and
renamed when complete), so a run killed at any moment, `kill -9` included, leaves either a
complete checkpoint or one that `latest_step()` does not see; partial saves left behind are
removed when the next run starts.

Faults (see docs/faults.md, "What survives what"):
- A save that fails (disk full, quota, permissions) raises `RunWriteError` naming the path and
  the OS error: at once when orbax fails before returning, else at `check()` (call it once per
  step; it never blocks), at the next `save` or at `close`. The previous complete checkpoint is
  never touched by a failed save (orbax deletes old checkpoints only after a commit).
- `restore_latest` restores the newest checkpoint that restores. A damaged one (a data file
  truncated or overwritten, a meta record that is not JSON or lacks a required key, array bytes
  that do not match the fingerprints recorded at save time) is moved aside, never deleted, to
  RUN_DIR/checkpoints.bad/STEP-TIME with a one-line warning naming it and the error. A
  checkpoint saved for a different model or optimiser is not damage: it stops the run with a
  one-line error and stays where it is.

Every save records a fingerprint per array (a position-weighted sum of its bits, mod 2**32,
computed on device) in the JSON record; a restore recomputes it for arrays restored in their
saved dtype, so a data file whose bytes changed but still decode is caught too.

With several processes (`jax.distributed`) every process calls `save`, `check`, `restore_latest`
and `close` together: each writes and reads only the shards its devices hold, and orbax's primary
host (process 0) writes the JSON record, so the run directory must be storage all hosts see.
`restore_latest` reads through orbax's handlers (no orbax barrier inside, so a read that fails
on one process cannot leave the others waiting); the processes then agree on the outcome
(`distributed.all_gather` of a success flag): a checkpoint counts as restored only when it
restored on every process, and process 0 alone moves a bad one aside, between two barriers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from srft_jax import distributed
from srft_jax.faults import CheckpointRestoreError, RunWriteError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BAD_DIR = "checkpoints.bad"
META_FILE = os.path.join("meta", "metadata")  # orbax's JsonSave file inside STEP/
FINGERPRINTS = "_fingerprints"  # key added to the JSON record by `save`


class Restored(NamedTuple):
    step: int
    params: Any
    opt_state: Any  # None when restored without an optimiser state
    meta: dict


class _Damaged(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file or array."""


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under RUN_DIR/checkpoints/STEP."""

    def __init__(self, run_dir: str, keep: int = 2, async_save: bool = True):
        self.run_dir = os.path.abspath(run_dir)
        self.directory = os.path.join(self.run_dir, CHECKPOINT_DIR)
        self.bad_directory = os.path.join(self.run_dir, BAD_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "meta"))
        self._pending: Optional[int] = None  # step of a save not yet known to have succeeded

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ---- saving ---------------------------------------------------------------------------
    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Starts an asynchronous save; raises `RunWriteError` if it, or the previous one, failed."""
        self._finish_pending(block=True)
        record = {**meta, FINGERPRINTS: {"params": self._fingerprint(params),
                                         "opt_state": self._fingerprint(opt_state)}}
        try:
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(record)))
        except Exception as e:
            raise self._write_error(step, e) from None
        self._pending = step
        log.info("checkpoint %d: saving to %s", step, self.directory)

    def check(self) -> None:
        """Raises `RunWriteError` if a finished background save failed; never blocks."""
        self._finish_pending(block=False)

    def close(self) -> None:
        """Waits for the last save; raises `RunWriteError` if it failed."""
        try:
            self._finish_pending(block=True)
        finally:
            try:
                self._manager.close()
            except Exception as e:  # the failure was reported above
                log.debug("closing the checkpoint manager: %s", e)

    def _finish_pending(self, block: bool) -> None:
        if self._pending is None or (not block and self._manager.is_saving_in_progress()):
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(step, e) from None

    def _write_error(self, step: int, error: BaseException) -> RunWriteError:
        intact = self._complete_steps_on_disk()
        note = (f"the latest complete checkpoint is step {intact[-1]}" if intact
                else "no complete checkpoint was written")
        return RunWriteError.from_exception(f"the checkpoint of step {step}",
                                            os.path.join(self.directory, str(step)), error, note)

    def _complete_steps_on_disk(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _fingerprint(self, tree: Any) -> dict[str, list]:
        """path -> [dtype, fingerprint] of every array leaf (one jitted reduction, one copy)."""
        leaves = _array_leaves(tree)
        out = _fingerprints_jit([x for _, x in leaves])
        if not (out.is_fully_addressable or out.is_fully_replicated):
            raise AssertionError("fingerprints must come back replicated")
        values = np.asarray(jax.device_get(out))
        return {path: [str(x.dtype), int(v)] for (path, x), v in zip(leaves, values)}

    # ---- restoring ------------------------------------------------------------------------
    def restore_latest(self, params_like: Any, opt_state_like: Any = None,
                       meta_keys: Sequence[str] = (), move_aside: bool = True) -> Optional[Restored]:
        """The newest checkpoint that restores onto the shardings/dtypes of the given (abstract
        or concrete) pytrees, or None when the run has no checkpoint.

        opt_state_like None: parameters only (a new run starting from an earlier run's weights).
        meta_keys: keys the JSON record must have (e.g. 'data'); a record without them is damage.
        move_aside: move damaged checkpoints to RUN_DIR/checkpoints.bad (False: skip them, e.g.
          when reading another run's directory).
        Raises CheckpointRestoreError (one line) when checkpoints exist but none restores, or
        when one was saved for a different model or optimiser.
        """
        steps = self.all_steps()
        _agree_on_steps(steps, self.directory)
        failures = []
        for step in reversed(steps):
            result, error = None, None
            try:  # reads only this process's shards: no collective, so it may fail here alone
                result = self._read(step, params_like, opt_state_like, meta_keys)
            except CheckpointRestoreError:
                raise
            except Exception as e:  # orbax / tensorstore / our own checks: all damage
                error = _one_line(e)
            if _everywhere(error is None):
                try:  # a collective computation, the same outcome on every process
                    self._verify(result)
                    if failures and move_aside:
                        self._manager.reload()  # forget the steps moved aside
                    return result
                except _Damaged as e:
                    error = str(e)
            error = error or "it failed to restore on another process"
            where = self._move_aside(step) if move_aside else os.path.join(self.directory, str(step))
            log.warning("checkpoint step %d does not restore (%s); %s %s", step, error,
                        "moved it to" if move_aside else "skipping", where)
            failures.append(f"step {step} ({error})")
        if move_aside and failures:
            self._manager.reload()
        if not failures:
            return None
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} restores: {'; '.join(failures)}"
            + (f"; the damaged ones are in {self.bad_directory}" if move_aside else ""))

    def restore(self, step: int, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict]:
        """One given step (no fall-back); raises on any damage."""
        r = self._read(step, params_like, opt_state_like, ())
        self._verify(r)
        return r.params, r.opt_state, r.meta

    def restore_params(self, step: int, params_like: Any) -> Any:
        """Parameters only (initialising a new run from an earlier run's checkpoint)."""
        r = self._read(step, params_like, None, ())
        self._verify(r)
        return r.params

    def _read(self, step: int, params_like: Any, opt_state_like: Any,
              meta_keys: Sequence[str]) -> Restored:
        """The JSON record and this process's shards (orbax's handlers: no barrier, no collective).
        The record keeps the saved fingerprints for `_verify`."""
        step_dir = epath.Path(self.directory) / str(step)
        meta = read_meta(os.path.join(self.directory, str(step), META_FILE), meta_keys)
        items = {"params": params_like}
        if opt_state_like is not None:
            items["opt_state"] = opt_state_like
        out = {}
        for name, like in items.items():
            handler = ocp.StandardCheckpointHandler()
            try:
                saved = handler.metadata(step_dir / name).tree
                _check_same_layout(saved, like, f"{name} of checkpoint step {step} in {self.directory}")
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
                out[name] = handler.restore(step_dir / name, args=ocp.args.StandardRestore(abstract))
            finally:
                handler.close()
        return Restored(step, out["params"], out.get("opt_state"), meta)

    def _verify(self, restored: Restored) -> None:
        """Recomputes the fingerprints of arrays restored in their saved dtype (a collective
        computation on several processes) and drops them from the record."""
        recorded = restored.meta.pop(FINGERPRINTS, None) or {}  # none: saved before fingerprints
        for name, tree in (("params", restored.params), ("opt_state", restored.opt_state)):
            if tree is None or not recorded.get(name):
                continue
            for path, (dtype, value) in self._fingerprint(tree).items():
                saved = recorded[name].get(path)
                if saved is not None and saved[0] == dtype and int(saved[1]) != value:
                    raise _Damaged(f"{name} array {path!r} does not match the fingerprint recorded "
                                   f"when it was saved (its data file is damaged)")

    def _move_aside(self, step: int) -> str:
        """Renames STEP to checkpoints.bad/STEP-TIME (process 0, between barriers)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = os.path.join(self.bad_directory, f"{step}-{stamp}")
        distributed.barrier(f"srft_jax.checkpoint:move_aside:{step}:start")
        if distributed.is_main():
            os.makedirs(self.bad_directory, exist_ok=True)
            n = 1
            while os.path.exists(target):
                target = os.path.join(self.bad_directory, f"{step}-{stamp}-{n}")
                n += 1
            os.replace(os.path.join(self.directory, str(step)), target)
        distributed.barrier(f"srft_jax.checkpoint:move_aside:{step}:end")
        return target


def read_meta(path: str, required: Sequence[str] = ()) -> dict:
    """A checkpoint's JSON record; `_Damaged` with a one-line message naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise _Damaged(f"{path} is missing") from None
    except OSError as e:
        raise _Damaged(f"{path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Damaged(f"{path} is not UTF-8 text (byte {e.start})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Damaged(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(meta, dict):
        raise _Damaged(f"{path} holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in required if k not in meta]
    if missing:
        raise _Damaged(f"{path} has no {missing[0]!r} key")
    return meta


# ---- helpers --------------------------------------------------------------------------------
def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """'a/b/0' -> shape of every leaf with a shape (None and empty states are skipped)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "shape"):
            out["/".join(_key_name(k) for k in path)] = tuple(leaf.shape)
    return out


def _array_leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(path, x) for path, x in
            (("/".join(_key_name(k) for k in p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree))
            if isinstance(x, (jax.Array, np.ndarray))]


def _check_same_layout(saved: Any, like: Any, what: str) -> None:
    """A checkpoint of another model/optimiser is a config error, not damage."""
    have, want = _leaf_shapes(saved), _leaf_shapes(like)
    if have == want:
        return
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shape = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing:
        detail = f"it has no array {missing[0]!r}"
    elif extra:
        detail = f"it has an array {extra[0]!r} this run does not"
    else:
        detail = f"array {shape[0]!r} has shape {have[shape[0]]}, this run needs {want[shape[0]]}"
    raise CheckpointRestoreError(
        f"the {what} was saved for a different model or optimiser ({detail}); restore it with the "
        f"config it was trained with, or start a new run in another train.run_dir")


def _bits_u32(x: jax.Array) -> jax.Array:
    """The bits of each element as uint32 (elements of 1, 2 or 4 bytes; bool as 0/1)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size not in (1, 2, 4):
        return jnp.zeros(x.shape, jnp.uint32)  # 8-byte types: not fingerprinted
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fingerprints(leaves: list) -> jax.Array:
    """uint32[L]: per leaf, sum over elements of bits * (2 * flat_index + 1), mod 2**32.

    The odd weights make any change of one element, or a swap of two, change the sum; integer
    sums are exact, so the value does not depend on the sharding or the reduction order. The
    flat index is built from per-axis iotas (no reshape, so no resharding of sharded arrays).
    """
    out = []
    for x in leaves:
        index = jnp.zeros(x.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(x.ndim)):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
            stride *= x.shape[axis]
        out.append(jnp.sum(_bits_u32(x) * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


_fingerprints_jit = jax.jit(_fingerprints)


def _one_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = text.split(" [tensorstore_spec=")[0]
    if not isinstance(error, _Damaged):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 400 else text[:400] + "..."


def _everywhere(ok: bool) -> bool:
    """True when `ok` on every process (a collective on several processes)."""
    return bool(distributed.all_gather(np.int32(ok)).min())


def _agree_on_steps(steps: list[int], directory: str) -> None:
    """Every process must see the same checkpoints (storage all hosts see)."""
    if jax.process_count() == 1:
        return
    mine = np.asarray([len(steps), steps[-1] if steps else -1, sum(steps)], np.int64)
    everyone = distributed.all_gather(mine)
    if not (everyone == mine).all():
        raise CheckpointRestoreError(
            f"the processes see different checkpoints in {directory} (process index -> "
            f"[count, newest, sum]: {everyone.tolist()}); the run directory must be storage "
            "that every host sees")
