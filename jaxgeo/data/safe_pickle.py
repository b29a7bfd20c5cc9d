"""Pickled lists of names, read without running any pickle code.

People share dataset splits as pickles (schmitt-muc's `*_list.pkl`, the Berkeley SEN12MS seed's
`train_list_1024.pkl`: lists of numpy.str_). `pickle.load` on a downloaded file runs whatever it names, so this
unpickler allows only the four globals a pickled list of str / numpy string scalars needs (numpy's scalar
reconstruction under its old and new module names, `numpy.dtype` restricted to "U<n>" / "S<n>", and
`_codecs.encode` for latin-1) and refuses every other one before anything runs.
"""

from __future__ import annotations

import pickle
import re

import numpy as np


class UnsafeListError(pickle.UnpicklingError):
  """A pickled name list names a global other than numpy's string scalar reconstruction."""


class _StrDtype:
  """Stands in for numpy.dtype("U<n>") / ("S<n>") inside a list pickle; anything else is refused."""

  def __init__(self, where, spec, align=False, copy=False):
    if not (isinstance(spec, str) and re.fullmatch(r"[US]\d+", spec)):
      raise UnsafeListError(f"{where}: refusing numpy dtype {spec!r:.40}; a name list holds only string dtypes")
    self.where, self.spec, self.byteorder = where, spec, "="

  def __setstate__(self, state):
    # numpy's dtype state: (version, byteorder, subarray, names, fields, itemsize, alignment, flags)
    if not (isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "=")):
      raise UnsafeListError(f"{self.where}: unexpected numpy dtype state {state!r:.80}")
    self.byteorder = state[1]


class _NameListUnpickler(pickle.Unpickler):
  def __init__(self, file, where: str):
    super().__init__(file, encoding="latin1")  # latin1: Python 2 / numpy 1 pickles, as numpy advises
    self._where = where

  def find_class(self, module, name):
    where = self._where

    def scalar(dtype, data=None):
      if not isinstance(dtype, _StrDtype) or not isinstance(data, (bytes, str)):
        raise UnsafeListError(f"{where}: numpy scalar of {dtype!r:.40} is not a string")
      raw = data.encode("latin1") if isinstance(data, str) else data
      dt = np.dtype(dtype.spec).newbyteorder(dtype.byteorder)
      if len(raw) != dt.itemsize:
        raise UnsafeListError(f"{where}: numpy string scalar of {len(raw)} bytes, its dtype {dt} takes {dt.itemsize}")
      return np.frombuffer(raw, dt, count=1)[0]

    def encode(text, encoding="utf-8"):
      if encoding not in ("latin1", "latin-1"):  # what numpy's protocol-2 scalar pickles use
        raise UnsafeListError(f"{where}: refusing _codecs.encode with encoding {encoding!r:.40}")
      return text.encode(encoding)

    allowed = {
      ("numpy.core.multiarray", "scalar"): scalar,  # numpy < 2 pickles
      ("numpy._core.multiarray", "scalar"): scalar,
      ("numpy", "dtype"): lambda *args: _StrDtype(where, *args),
      ("_codecs", "encode"): encode,
    }
    if (module, name) not in allowed:
      raise UnsafeListError(
        f"refusing global '{module}.{name}' in list file {where}: a name list must be a pickled list of str / "
        "numpy.str_; nothing in it was run"
      )
    return allowed[(module, name)]


def load_string_list(path: str) -> list | tuple:
  """The object pickled in `path`, built only from strings and numpy string scalars; UnsafeListError for a file
  naming any other global, ValueError for one that is not a readable pickle."""
  with open(path, "rb") as f:
    try:
      return _NameListUnpickler(f, path).load()
    except UnsafeListError:
      raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
      raise ValueError(f"{path}: not a readable pickled list of names: {e!r}") from e
