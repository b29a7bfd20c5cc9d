"""Entry point: `python -m jaxgeo.main --config=configs/dino_ben.py[:variant] --workdir=DIR [--config.a.b=v]`.

The config is locked before overrides apply, so a mistyped key fails here, before any compute.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxgeo.errors import RunError
from jaxgeo.logs import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/dino_ben.py:smoke", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and plots go here")


# config.method -> the module whose make_task the shared loop runs. Imported lazily so each method only loads its
# own code.
TASKS = {
  "dino": "jaxgeo.train.dino",
  "moco": "jaxgeo.train.moco",
  "classify": "jaxgeo.train.classify",
  "segment": "jaxgeo.train.segment",
}


def trainers():
  """config.method -> function(config, workdir)."""
  import importlib

  def task_runner(module):
    def train(config, workdir):
      from jaxgeo.train import loop

      return loop.run(config, workdir, importlib.import_module(module).make_task)

    return train

  def linear(config, workdir):
    from jaxgeo.evaluate import linear as linear_probe

    return linear_probe.run_linear_probe(config, workdir)

  return {**{name: task_runner(module) for name, module in TASKS.items()}, "linear": linear}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/dino_ben.py")
  methods = trainers()
  if config.method not in methods:
    raise app.UsageError(f"config.method={config.method!r}; expected one of {sorted(methods)}")
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  logging.info("method %s, workdir %s", config.method, workdir)
  try:
    status = methods[config.method](config, workdir)
  except RunError as e:
    # The message names the cause and what to do; a traceback would bury it.
    logging.error("%s", e)
    sys.exit(1)
  logging.info("finished: %s", status)


def run():
  quiet_library_logs()
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
