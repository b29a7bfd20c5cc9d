"""Logging set-up shared by the command-line entry points."""

import contextlib
import logging
import sys

from absl import logging as absl_logging


class _LibraryChatter(logging.Filter):
  """Orbax and Grain narrate every save and read at INFO; keep their warnings, drop the narration."""

  def filter(self, record):
    quiet = ("/orbax/", "/grain/")
    return record.levelno >= logging.WARNING or not any(q in record.pathname for q in quiet)


def quiet_library_logs():
  absl_logging.get_absl_handler().addFilter(_LibraryChatter())


@contextlib.contextmanager
def command_logging(fmt="%(message)s", quiet=()):
  """A command-line tool's logging while its main() runs: INFO lines in `fmt` on stderr, the loggers named in
  `quiet` held at WARNING. Undone on exit (handlers, levels), so a main() called from Python (a notebook, the
  tests) leaves that process's logging as it found it; a global basicConfig / setLevel here once silenced every
  later INFO line of the test session."""
  root = logging.getLogger()
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter(fmt))
  saved_handlers = list(root.handlers)
  saved_levels = [(logger, logger.level) for logger in [root, *map(logging.getLogger, quiet)]]
  # Replaces the root handlers (absl's among them) so each line is printed once, in this format.
  for old in saved_handlers:
    root.removeHandler(old)
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  for name in quiet:
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    yield
  finally:
    root.removeHandler(handler)
    for old in saved_handlers:
      root.addHandler(old)
    for logger, level in saved_levels:
      logger.setLevel(level)
