"""Checkpoints: the train state and the Grain iterator position, saved together with Orbax.

Orbax writes each step into a temporary directory and renames it only once complete, so a process killed
mid-save leaves the previous step as the latest restorable one (the partial one is ignored and cleaned up).
Restoring reads tensorstore arrays and JSON: nothing is unpickled on the resume path.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  def __init__(self, workdir, keep=3):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, iterator):
    """Asynchronous: training goes on while the arrays are written; `wait` before exiting."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator))
    self.manager.save(step, args=args, force=True)

  def restore(self, abstract_state, iterator, step=None):
    """Restores into the shardings of `abstract_state` (ShapeDtypeStructs) and moves `iterator` in place."""
    step = self.latest_step() if step is None else step
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)
    )
    restored = self.manager.restore(step, args=args)
    logging.info("restored step %d from %s", step, self.directory)
    return restored.state

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def load_state(workdir, step=None):
  """The whole saved train state as host arrays, for evaluation without rebuilding the optimizer."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {directory}; train first or check --workdir")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return jax.tree.map(jax.device_get, restored.state)


def load_params(workdir, which="teacher", step=None):
  """Params of a saved run: "teacher" (DINO's evaluation default, as the reference) or "params" (student)."""
  state = load_state(workdir, step)
  if which not in state:
    raise KeyError(f"checkpoint in {workdir} has no {which!r}; it holds {sorted(state)}")
  return state[which]
