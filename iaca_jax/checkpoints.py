"""Orbax checkpoints: the latest train states (for resumption) and the best-on-validation state.

Layout under `directory`: latest/<step>/{state,meta} and best/<step>/{state,meta}. Orbax writes each
step to a temporary name and renames it when complete, so an interrupted save never looks finished.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=('state', 'meta'))


class Checkpoints:
  """Saves and restores (state, meta) pairs; `meta` is a JSON-able dict (epoch, best score, ...)."""

  def __init__(self, directory: str, keep: int = 2):
    self.latest = _manager(os.path.join(directory, 'latest'), keep)
    self.best = _manager(os.path.join(directory, 'best'), 1)

  def save(self, step: int, state: Any, meta: dict, *, best: bool = False) -> None:
    manager = self.best if best else self.latest
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, *, best: bool = False, step: int | None = None):
    """(state, meta) of the given (default: newest) step, or None when there is no checkpoint."""
    manager = self.best if best else self.latest
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
    return restored.state, restored.meta

  def restore_part(self, abstract_part: dict[str, Any], *, best: bool = False, step: int | None = None):
    """(part, meta): only the state fields named in `abstract_part` (e.g. params and statistics,
    without the optimizer state), or None when there is no checkpoint."""
    manager = self.best if best else self.latest
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    state_args = ocp.args.PyTreeRestore(
      item=abstract_part,
      partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part),
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def latest_step(self, *, best: bool = False) -> int | None:
    return (self.best if best else self.latest).latest_step()

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
