"""Read PyTorch checkpoints (``torch.save`` zip or legacy files) and safetensors as numpy, without torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. The reader therefore
allows only the globals a checkpoint legitimately holds (tensor/parameter rebuilders, storage types, dtypes,
OrderedDict, argparse.Namespace, a few builtins and numpy scalars) and refuses everything else *before* it
is called, naming the global and the file. Tensors come back as numpy arrays (bfloat16/float8 through
ml_dtypes); ``requires_grad`` and hooks are dropped.

Supported: the zip format written by torch >= 1.6 (``<name>/data.pkl`` + ``<name>/data/<key>``), the legacy
non-zip format (torch < 1.6 or ``_use_new_zipfile_serialization=False``) and ``.safetensors``. Not supported:
the pre-1.0 tar format and TorchScript archives.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

__all__ = ["load_state", "read_safetensors", "UnsafeCheckpointError"]


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint names a global the reader will not import."""


_DTYPE_BY_TORCH_NAME = {
  "float64": np.float64,
  "double": np.float64,
  "float32": np.float32,
  "float": np.float32,
  "float16": np.float16,
  "half": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64,
  "long": np.int64,
  "int32": np.int32,
  "int": np.int32,
  "int16": np.int16,
  "short": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "bool": np.bool_,
  "complex64": np.complex64,
  "cfloat": np.complex64,
  "complex128": np.complex128,
  "cdouble": np.complex128,
  "uint16": np.uint16,
  "uint32": np.uint32,
  "uint64": np.uint64,
  "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
  "float8_e5m2": ml_dtypes.float8_e5m2,
}
_DTYPE_BY_STORAGE = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "ComplexFloatStorage": np.complex64,
  "ComplexDoubleStorage": np.complex128,
  "UntypedStorage": np.uint8,  # raw bytes; _rebuild_tensor_v3 reinterprets them with its dtype
}


class _StorageType:
  """Stands in for ``torch.FloatStorage`` & co: only its numpy dtype matters."""

  def __init__(self, name):
    self.name, self.dtype = name, np.dtype(_DTYPE_BY_STORAGE[name])


class _TorchDtype:
  """Stands in for ``torch.float32`` & co (they appear in args and in ``_rebuild_tensor_v3``)."""

  def __init__(self, name):
    self.name, self.dtype = name, np.dtype(_DTYPE_BY_TORCH_NAME[name])

  def __repr__(self):
    return f"torch.{self.name}"


def _strided_view(flat: np.ndarray, offset, size, stride, where) -> np.ndarray:
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"{where}: bad tensor geometry size={size} stride={stride}")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  # as_strided trusts its arguments; an out-of-range stride would read foreign memory, so check first.
  last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= flat.size:
    raise pickle.UnpicklingError(
      f"{where}: tensor (offset {offset}, size {size}, stride {stride}) reads past its storage of {flat.size} elements"
    )
  view = np.lib.stride_tricks.as_strided(
    flat[int(offset) :], size, tuple(s * flat.itemsize for s in stride), writeable=False
  )
  return np.array(view)  # own, contiguous copy


def _rebuilders(where):
  def rebuild_tensor(storage, offset, size, stride, *unused):
    return _strided_view(storage, offset, size, stride, where)

  def rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
    return _strided_view(storage.view(dtype.dtype), offset, size, stride, where)

  def rebuild_parameter(data, *unused):
    return data

  def numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype)[0] if data is not None else np.zeros((), dtype)[()]

  def codecs_encode(text, encoding="utf-8"):
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
      raise UnsafeCheckpointError(f"{where}: refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)

  def numpy_reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
      raise UnsafeCheckpointError(f"{where}: refusing to reconstruct {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)

  allowed: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): codecs_encode,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): numpy_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
  }
  for name in _DTYPE_BY_STORAGE:
    allowed[("torch", name)] = _StorageType(name)
  allowed[("torch.storage", "UntypedStorage")] = allowed[("torch", "UntypedStorage")]
  for name in _DTYPE_BY_TORCH_NAME:
    allowed[("torch", name)] = _TorchDtype(name)
  return allowed


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, file, where: str, load_storage: Callable[[tuple], np.ndarray]):
    super().__init__(file, encoding="utf-8")
    self._where, self._load_storage = where, load_storage
    self._allowed = _rebuilders(where)

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f"refusing global '{module}.{name}' in checkpoint {self._where}: only tensors, containers, "
        "numbers, strings and argparse.Namespace are allowed"
      ) from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"{self._where}: unexpected persistent id {pid!r:.80}")
    return self._load_storage(pid)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected exactly one data.pkl in the torch zip archive, found {pickles}")
    root = pickles[0][: -len("data.pkl")]
    order = archive.read(root + "byteorder").decode() if root + "byteorder" in names else "little"
    cache: dict[str, np.ndarray] = {}

    def load_storage(pid):
      _, storage_type, key, _location, numel = pid[:5]
      if key not in cache:
        raw = archive.read(f"{root}data/{key}")
        dtype = storage_type.dtype.newbyteorder("<" if order == "little" else ">")
        if len(raw) < int(numel) * dtype.itemsize:
          raise ValueError(f"{path}: storage data/{key} holds {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
        flat = np.frombuffer(raw, dtype, count=int(numel))
        cache[key] = flat.astype(flat.dtype.newbyteorder("="), copy=False)
      return cache[key]

    with archive.open(pickles[0]) as handle:
      return _RestrictedUnpickler(io.BytesIO(handle.read()), path, load_storage).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Pending:
  """A tensor of a legacy file whose storage bytes follow the object pickle; resolved after reading them."""

  def __init__(self, key, view=None, geometry=None):
    self.key, self.view, self.geometry = key, view, geometry


def _load_legacy(path: str) -> Any:
  """torch < 1.6 layout: magic, protocol, sys_info, the object pickle, storage keys, then raw storages."""
  with open(path, "rb") as handle:
    plain = lambda: _RestrictedUnpickler(handle, path, _no_storage).load()
    if plain() != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a torch checkpoint (no zip archive and no legacy magic number)")
    plain()  # protocol version
    if not plain().get("little_endian", True):
      raise ValueError(f"{path}: big-endian legacy checkpoints are not supported")
    dtypes: dict[str, np.dtype] = {}

    def record(pid):
      _, storage_type, key, _location, _numel, view = (tuple(pid) + (None,))[:6]
      dtypes[key] = storage_type.dtype
      return _Pending(key, view)

    unpickler = _RestrictedUnpickler(handle, path, record)
    rebuild = lambda storage, offset, size, stride, *_: _Pending(storage.key, storage.view, (offset, size, stride))
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
      unpickler._allowed[("torch._utils", name)] = rebuild
    obj = unpickler.load()
    storages = {}
    for key in plain():
      (count,) = struct.unpack("<q", handle.read(8))
      raw = handle.read(count * dtypes[key].itemsize)
      storages[key] = np.frombuffer(raw, dtypes[key], count=count)

  def resolve(node):
    if isinstance(node, _Pending):
      flat = storages[node.key]
      if node.view is not None:  # (view_key, element offset, view size) of an old storage slice
        _, view_offset, view_size = node.view
        flat = flat[int(view_offset) : int(view_offset) + int(view_size)]
      if node.geometry is None:
        return np.array(flat)
      return _strided_view(flat, *node.geometry, path)
    if isinstance(node, argparse.Namespace):
      return argparse.Namespace(**{k: resolve(v) for k, v in vars(node).items()})
    if isinstance(node, dict):
      return type(node)((k, resolve(v)) for k, v in node.items())
    if isinstance(node, (list, tuple)):
      return type(node)(resolve(v) for v in node)
    return node

  return resolve(obj)


def _no_storage(pid):
  raise pickle.UnpicklingError(f"unexpected storage reference {pid!r:.80}")


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Returns (tensors, metadata). Own parser so that BF16/F8 work (safetensors.numpy has no bfloat16)."""
  types = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "C64": np.complex64,
  }
  with open(path, "rb") as handle:
    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len > 100_000_000:
      raise ValueError(f"{path}: safetensors header of {header_len} bytes is implausible")
    header = json.loads(handle.read(header_len))
    data = handle.read()
  metadata = header.pop("__metadata__", None) or {}
  tensors = {}
  for name, info in header.items():
    if info["dtype"] not in types:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(types[info["dtype"]]).newbyteorder("<")
    start, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if end - start != count * dtype.itemsize or end > len(data):
      raise ValueError(f"{path}: tensor {name!r} has inconsistent data_offsets {start, end}")
    flat = np.frombuffer(data, dtype, count=count, offset=start)
    tensors[name] = flat.astype(dtype.newbyteorder("="), copy=True).reshape(info["shape"])
  return tensors, metadata


def load_state(path: str | os.PathLike) -> Any:
  """Loads a ``torch.save`` checkpoint or a ``.safetensors`` file as python containers of numpy arrays."""
  path = os.fspath(path)
  with open(path, "rb") as handle:
    head = handle.read(8)
  if path.endswith(".safetensors"):
    return read_safetensors(path)[0]
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  if head[:1] == b"\x80":
    return _load_legacy(path)
  raise ValueError(f"{path}: neither a torch zip checkpoint, a legacy torch pickle nor .safetensors")
