"""Orbax checkpoints of a training run: parameters, optimiser state and a JSON record of the
step, the data iterator position and anything else the loop needs to continue exactly.

Saves are asynchronous and committed atomically by orbax (written to a temporary directory and
renamed when complete), so a run killed at any moment, `kill -9` included, leaves either a
complete checkpoint or one that `latest_step()` does not see.

With several processes (`jax.distributed`) every process calls `save`, `restore` and `close`
together: each writes and reads only the shards its devices hold, and orbax's primary host
(process 0) writes the JSON record, so the run directory must be storage all hosts see.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under RUN_DIR/checkpoints/STEP."""

    def __init__(self, run_dir: str, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))
        log.info("checkpoint %d: saving to %s", step, self.directory)

    def restore(self, step: int, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict]:
        """Restores onto the shardings/dtypes of the given (abstract or concrete) pytrees."""
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        out = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params_like)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
            meta=ocp.args.JsonRestore()))
        return out["params"], out["opt_state"], dict(out["meta"])

    def restore_params(self, step: int, params_like: Any) -> Any:
        """Parameters only (initialising a new run from an earlier run's checkpoint)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params_like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))
        return out["params"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
