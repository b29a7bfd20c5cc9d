"""Logging set-up shared by the command-line entry points."""

import logging

from absl import logging as absl_logging


class _LibraryChatter(logging.Filter):
  """Orbax and Grain narrate every save and read at INFO; keep their warnings, drop the narration."""

  def filter(self, record):
    quiet = ("/orbax/", "/grain/")
    return record.levelno >= logging.WARNING or not any(q in record.pathname for q in quiet)


def quiet_library_logs():
  absl_logging.get_absl_handler().addFilter(_LibraryChatter())
