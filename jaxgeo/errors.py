"""Failures whose message says everything a user needs: the entry points print them as one line, no traceback."""


class RunError(RuntimeError):
  """A run cannot go on, for a reason the message names (the file, the setting, what to do)."""
