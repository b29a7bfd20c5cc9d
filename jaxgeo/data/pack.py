"""BigEarthNet-S2 packed into one ArrayRecord file per split, read back by `PackedSource`.

  python -m jaxgeo.data.pack --root=/data/BigEarthNet-v1.0 [--metadata=meta.parquet] --out=/data/ben_packed \
      [--bands=all] [--workers=4] [--on_bad_sample=error|skip] [--nodata=0] [--max_nodata_fraction=1]

Why: the folder layout costs 12 GeoTIFF opens (each a GDAL dataset with its own header parse) per patch; a packed
record is one read of contiguous bytes, so a CPU core serves many more patches per second and the loader stops
being the thing the GPU waits for (benchmarks/data_loader.py measures both).

Store layout (format version 2; version 1 stores are read too):
  <out>/jaxgeo_packed.json          manifest: format, version, bands, band shapes, dtype, splits (count, files),
                                    source root / metadata, the nodata policy it was checked with, skipped samples
  <out>/<split>.array_record        one record per patch, in the split order of BigEarthNetSource
  <out>/<split>.names.txt           patch names, one per line, record i <-> line i

A record: b"JGPK" | uint32 little-endian header length | JSON header {"name", "labels": [19-class indices],
optional "shapes"} | the packed bands' raw little-endian uint16 pixels, band after band in manifest order, each
at the size its file had: normally the NATIVE size of `band_shapes` (120 px at 10 m, 60 px at 20 m, 20 px at
60 m); a patch whose files were already resampled to 120 px lists every band's [H, W] in "shapes" (version 2).
No pickle anywhere. Native size, not pre-resampled to 120 px: the reader builds the image with the very function
the folder reader uses (bigearthnet.bands_to_image), so samples are bit-equal to BigEarthNetSource's (a uint16
store of resampled bands would have to round the bilinear values), any `image_size` still works, and the store
is 2.5x smaller than one at 120 px for all bands. Integer bands of other dtypes (e.g. int16) are stored as
uint16: their values are checked non-negative when read, and one above 65535 is an error naming the file.

The store is written in a temporary sibling folder and renamed into place once complete (manifest last), so a
crash never leaves a folder that looks like a finished store.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from jaxgeo import logs
from jaxgeo.data import ben_labels
from jaxgeo.data import bigearthnet as ben
from jaxgeo.data.geotiff import BadSampleError

log = logging.getLogger(__name__)

MANIFEST = "jaxgeo_packed.json"
FORMAT = "jaxgeo-packed-bigearthnet"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1: no per-record "shapes"; packed rejecting any 0 pixel
MAGIC = b"JGPK"
_HEADER = struct.Struct("<4sI")
# One record per ArrayRecord chunk: the store is read by random access (shuffled indices), and a bigger group
# would decompress a whole group to return one patch.
_WRITER_OPTIONS = "group_size:1,{compression}"


def is_packed(root: str | os.PathLike | None) -> bool:
  """True if `root` is a packed store (its manifest exists)."""
  return root is not None and os.path.isfile(os.path.join(os.path.expanduser(os.fspath(root)), MANIFEST))


def encode_record(
  name: str, labels: np.ndarray, bands: Sequence[np.ndarray], band_shapes: Sequence[tuple[int, int]]
) -> bytes:
  """One record; `bands` are uint16-valued [H, W] arrays, `band_shapes` the manifest's sizes of them."""
  header = {"name": name, "labels": [int(i) for i in np.flatnonzero(labels)]}
  shapes = [list(b.shape) for b in bands]
  if shapes != [list(s) for s in band_shapes]:
    header["shapes"] = shapes
  payload = b"".join(np.ascontiguousarray(b, dtype="<u2").tobytes() for b in bands)
  header_bytes = json.dumps(header).encode()
  return _HEADER.pack(MAGIC, len(header_bytes)) + header_bytes + payload


def decode_header(record: bytes, path: str, where: str) -> tuple[dict, int]:
  """(header dict, offset of the first pixel byte); BadSampleError naming `path` and `where` (record / patch)."""
  if len(record) < _HEADER.size:
    raise BadSampleError(path, f"{where}: {len(record)} bytes, shorter than the {_HEADER.size}-byte header")
  magic, header_len = _HEADER.unpack_from(record)
  if magic != MAGIC:
    raise BadSampleError(path, f"{where}: starts with {magic!r}, expected {MAGIC!r} (not a jaxgeo packed record)")
  start = _HEADER.size
  try:
    header = json.loads(record[start : start + header_len])
  except ValueError as e:
    raise BadSampleError(path, f"{where}: unreadable record header: {e}") from e
  if not isinstance(header, dict):
    raise BadSampleError(path, f"{where}: record header is {type(header).__name__}, expected a JSON object")
  return header, start + header_len


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def read_manifest(root: str) -> dict:
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no packed-store manifest (make one with python -m jaxgeo.data.pack)")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("version") not in _READABLE_VERSIONS:
    raise ValueError(
      f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
      f"jaxgeo reads {FORMAT!r} versions {list(_READABLE_VERSIONS)}: re-pack with python -m jaxgeo.data.pack"
    )
  return manifest


def packed_nodata_policy(manifest: dict) -> tuple[float | None, float]:
  """(nodata, max_nodata_fraction) a store's bands were checked with when packed."""
  if "max_nodata_fraction" not in manifest:  # version 1 stores were packed rejecting any 0 pixel
    return ben.S2_NODATA, 0.0
  return manifest["nodata"], manifest["max_nodata_fraction"]


class PackedSource:
  """grain RandomAccessDataSource over one split of a packed store; a drop-in for BigEarthNetSource.

  Same `source[i]` dict ({"image": float32 [image_size, image_size, C], "labels": float32 [19], "index": int32}),
  same band selection and scaling (bands == "rgb" -> clip(refl / 2000, 0, 1), else refl / 10000), same names and
  split order as the BigEarthNetSource the store was packed from. Only the requested bands are decoded. A record
  that cannot be read raises BadSampleError naming the .array_record file, the record index and the patch.
  `nodata` / `max_nodata_fraction`: the policy the store's patches were checked with when packed.
  """

  name = "bigearthnet"
  label_kind = "multilabel"
  class_names = ben_labels.CLASSES_19

  @property
  def norm_stats(self):
    return {"image": ben.normalization_stats("rgb" if self.rgb_scaling else self.bands)}

  def __init__(
    self,
    root: str | os.PathLike,
    split: str = "train",
    bands: str | Sequence[str] = "rgb",
    image_size: int = ben.PATCH_SIZE,
  ):
    if split not in ben.SPLITS:
      raise ValueError(f"split: expected one of {ben.SPLITS}, got {split!r}")
    import grain  # pylint: disable=g-import-not-at-top

    self.root = os.path.expanduser(os.fspath(root))
    self.split = split
    self.bands = ben.resolve_bands(bands)
    self.rgb_scaling = isinstance(bands, str) and bands == "rgb"
    self.image_size = int(image_size)
    self.manifest = read_manifest(self.root)
    self.nodata, self.max_nodata_fraction = packed_nodata_policy(self.manifest)
    packed = tuple(self.manifest["bands"])
    missing = [b for b in self.bands if b not in packed]
    if missing:
      raise ValueError(
        f"{os.path.join(self.root, MANIFEST)}: band(s) {missing} requested by data.bands are not "
        f"in this store (packed: {list(packed)}); re-pack with --bands=all"
      )
    if split not in self.manifest["splits"]:
      raise ValueError(
        f"{os.path.join(self.root, MANIFEST)}: split {split!r} is not in this store "
        f"(packed: {sorted(self.manifest['splits'])})"
      )
    entry = self.manifest["splits"][split]
    self.path = os.path.join(self.root, entry["file"])
    with open(os.path.join(self.root, entry["names"])) as f:
      self.names = f.read().splitlines()
    if len(self.names) != entry["count"]:
      raise ValueError(
        f"{os.path.join(self.root, entry['names'])}: {len(self.names)} names, manifest says {entry['count']}"
      )
    if not self.names:
      raise ValueError(f"{self.path}: split {split!r} is empty (no patches)")
    self._wanted = [packed.index(b) for b in self.bands]
    self._layout = self._band_layout([tuple(s) for s in self.manifest["band_shapes"]])
    try:
      self._records = grain.sources.ArrayRecordDataSource([self.path])
    except RuntimeError as e:  # riegeli: a truncated or corrupt file fails here, without naming it
      raise ValueError(f"{self.path}: cannot open as ArrayRecord (truncated or corrupt; re-pack): {e}") from e
    if len(self._records) != len(self.names):
      raise ValueError(f"{self.path}: {len(self._records)} records, {len(self.names)} names in the store")

  def _band_layout(self, shapes: Sequence[tuple[int, int]]) -> tuple[int, list[tuple[int, tuple[int, int]]]]:
    """(pixel bytes of a record, (byte offset, shape) of each requested band) for the packed bands' shapes."""
    offsets, offset = [], 0
    for shape in shapes:
      offsets.append(offset)
      offset += shape[0] * shape[1] * 2
    return offset, [(offsets[i], tuple(shapes[i])) for i in self._wanted]

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return f"PackedSource(root={self.root!r}, split={self.split!r}, bands={self.bands}, {len(self)} patches)"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    where = f"record {index} (patch {self.names[index]})"
    try:
      record = self._records[index]
    except RuntimeError as e:  # riegeli's checksums catch flipped or overwritten bytes, without naming the file
      raise BadSampleError(self.path, f"{where}: unreadable (corrupt file; re-pack): {e}") from e
    header, start = decode_header(record, self.path, where)
    if header.get("name") != self.names[index]:
      raise BadSampleError(self.path, f"{where}: holds patch {header.get('name')!r}, the names file says otherwise")
    try:
      payload_bytes, layout = self._layout if "shapes" not in header else self._band_layout(header["shapes"])
      labels = np.zeros(len(ben_labels.CLASSES_19), np.float32)
      labels[header["labels"]] = 1.0
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise BadSampleError(self.path, f"{where}: malformed record header {header}: {e!r}") from e
    if len(record) - start != payload_bytes:
      raise BadSampleError(self.path, f"{where}: {len(record) - start} pixel bytes, expected {payload_bytes}")
    pixels = memoryview(record)[start:]
    bands = [
      np.frombuffer(pixels, "<u2", count=shape[0] * shape[1], offset=offset).reshape(shape) for offset, shape in layout
    ]
    image = ben.bands_to_image(bands, self.image_size, self.rgb_scaling)
    return {"image": image, "labels": labels, "index": np.int32(index)}

  def problems(self, index: int) -> list[BadSampleError]:
    """The problem of record `index` (empty when it reads); the store was checked band by band when packed."""
    try:
      self[index]
    except BadSampleError as e:
      return [e]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


class _PatchReader:
  """Reads one patch's packed bands at native size + labels through BigEarthNetSource's own checks.

  A picklable callable, so a multiprocessing pool can run it; returns (index, record bytes) or (index, error).
  """

  def __init__(self, source: ben.BigEarthNetSource, bands: Sequence[str]):
    self.source = source
    self.bands = tuple(bands)
    self.band_shapes = [ben.band_shape(b) for b in self.bands]

  def _stored_band(self, patch_dir: str, band: str) -> np.ndarray:
    pixels = self.source.read_stored_band(patch_dir, band)
    if pixels.dtype != np.uint16 and pixels.size and pixels.max() > np.iinfo(np.uint16).max:
      path = os.path.join(patch_dir, f"{os.path.basename(patch_dir)}_{band}.tif")
      raise BadSampleError(path, f"{pixels.dtype.name} value {pixels.max()} does not fit the packed store's uint16")
    return pixels

  def __call__(self, index: int):
    try:
      patch_dir = self.source.patch_dir(index)
      pixels = [self._stored_band(patch_dir, band) for band in self.bands]
      labels = self.source.labels_of(index, patch_dir)
      return index, encode_record(self.source.names[index], labels, pixels, self.band_shapes)
    except BadSampleError as e:
      return index, e


def pack(
  root: str,
  out: str,
  metadata: str | None = None,
  bands: str | Sequence[str] = "all",
  splits: Sequence[str] = ben.SPLITS,
  workers: int = 1,
  on_bad_sample: str = "error",
  compression: str = "uncompressed",
  log_every: int = 1000,
  overwrite: bool = False,
  nodata: float | None = ben.S2_NODATA,
  max_nodata_fraction: float = ben.DEFAULT_MAX_NODATA_FRACTION,
) -> dict:
  """Packs the BigEarthNet tree at `root` (splits from `metadata` or hash_split) into `out`; returns the manifest.

  on_bad_sample: "error" stops at the first bad patch (the error names the file); "skip" leaves it out of the
  store and lists it in the manifest's "skipped". nodata / max_nodata_fraction: the policy bands are checked
  with (BigEarthNetSource's; config.data.nodata / data.max_nodata_fraction), recorded in the manifest.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  if on_bad_sample not in ("error", "skip"):
    raise ValueError(f"on_bad_sample: expected 'error' or 'skip', got {on_bad_sample!r}")
  band_names = ben.resolve_bands(bands)
  nodata, max_nodata_fraction = ben.nodata_policy({"nodata": nodata, "max_nodata_fraction": max_nodata_fraction})
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out):
    if not overwrite:
      raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.packing-", dir=parent)
  manifest = {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "bands": list(band_names),
    "band_shapes": [list(ben.band_shape(b)) for b in band_names],
    "dtype": "uint16",
    "source_root": os.path.abspath(root),
    "source_metadata": metadata and os.path.abspath(metadata),
    "nodata": nodata,
    "max_nodata_fraction": max_nodata_fraction,
    "record": "b'JGPK' | uint32 LE header length | JSON {name, labels: 19-class indices, optional shapes} | raw "
    "LE uint16 bands in 'bands' order at 'band_shapes' (or at the record's 'shapes')",
    "splits": {},
    "skipped": {},
  }
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  try:
    sources = {}
    for split in splits:
      try:
        sources[split] = ben.BigEarthNetSource(
          root, metadata, split=split, bands=band_names, nodata=nodata, max_nodata_fraction=max_nodata_fraction
        )
      except ValueError as e:
        if "is empty" not in str(e):
          raise
        log.warning("split %s has no patches; not packed", split)
    total = sum(len(s) for s in sources.values())
    done, start = 0, time.perf_counter()
    log.info("packing %d patches (%s) from %s into %s", total, ",".join(sources), root, out)
    log.info("checking bands with %s", ben.describe_nodata_policy(nodata, max_nodata_fraction))
    for split, source in sources.items():
      reader = _PatchReader(source, band_names)
      writer = ArrayRecordWriter(
        os.path.join(staging, f"{split}.array_record"), _WRITER_OPTIONS.format(compression=compression)
      )
      names, skipped = [], []
      results = pool.imap(reader, range(len(source)), chunksize=16) if pool else map(reader, range(len(source)))
      for index, result in results:
        if isinstance(result, BadSampleError):
          if on_bad_sample == "error":
            raise BadSampleError(
              result.path,
              f"{result.problem} (patch {source.names[index]}, split {split}; "
              "pass --on_bad_sample=skip to leave bad patches out)",
            )
          log.warning("skipping bad patch %s: %s", source.names[index], result)
          skipped.append({"name": source.names[index], "error": str(result)})
        else:
          writer.write(result)
          names.append(source.names[index])
        done += 1
        if done % log_every == 0 or done == total:
          elapsed = time.perf_counter() - start
          rate = done / max(elapsed, 1e-9)
          log.info(
            "packed %d/%d patches (%.0f/s), ETA %s",
            done,
            total,
            rate,
            time.strftime("%H:%M:%S", time.gmtime((total - done) / max(rate, 1e-9))),
          )
      writer.close()
      with open(os.path.join(staging, f"{split}.names.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
      manifest["splits"][split] = {"count": len(names), "file": f"{split}.array_record", "names": f"{split}.names.txt"}
      if skipped:
        manifest["skipped"][split] = skipped
    manifest["seconds"] = round(time.perf_counter() - start, 3)
    with open(os.path.join(staging, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(out):  # overwrite: the old store goes only once the new one is complete
      shutil.rmtree(out)
    os.rename(staging, out)
  finally:
    if pool is not None:
      pool.terminate()
    if os.path.isdir(staging):
      shutil.rmtree(staging)
  log.info("packed store complete: %s (%s)", out, ", ".join(f"{s} {e['count']}" for s, e in manifest["splits"].items()))
  return manifest


def add_nodata_arguments(parser: argparse.ArgumentParser) -> None:
  """--nodata and --max_nodata_fraction (config.data.nodata / max_nodata_fraction), shared with data.check."""

  def pixel_value(text: str) -> float | None:
    if text.lower() == "none":
      return None
    value = float(text)
    return int(value) if value.is_integer() else value

  parser.add_argument(
    "--nodata",
    type=pixel_value,
    default=ben.S2_NODATA,
    help="pixel value that marks missing data when a file declares none ('none': only a file's own tag)",
  )
  parser.add_argument(
    "--max_nodata_fraction",
    type=float,
    default=ben.DEFAULT_MAX_NODATA_FRACTION,
    help="a band is bad when all of it or more than this fraction of it is nodata (default: only when all)",
  )


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m jaxgeo.data.pack", description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="BigEarthNet-S2 folder (v1 <patch>/ or v2 <tile>/<patch>/)")
  parser.add_argument(
    "--metadata", default=None, help="gdf-builder or v2 parquet (splits, labels); default: json labels + hash split"
  )
  parser.add_argument("--out", required=True, help="folder of the packed store (must not exist)")
  parser.add_argument("--bands", default="all", help="all | rgb | comma-separated band names")
  parser.add_argument("--splits", default=",".join(ben.SPLITS))
  parser.add_argument("--workers", type=int, default=1, help="processes reading GeoTIFFs")
  parser.add_argument("--on_bad_sample", default="error", choices=("error", "skip"))
  parser.add_argument("--compression", default="uncompressed", help="ArrayRecord option, e.g. zstd:3")
  parser.add_argument("--log_every", type=int, default=1000)
  parser.add_argument("--overwrite", action="store_true")
  add_nodata_arguments(parser)
  args = parser.parse_args(argv)
  bands = args.bands if args.bands in ("all", "rgb") else [b for b in args.bands.split(",") if b]
  with logs.command_logging("%(asctime)s %(levelname)s %(message)s"):
    return _pack_command(args, bands)


def _pack_command(args, bands):
  try:
    pack(
      args.root,
      args.out,
      metadata=args.metadata,
      bands=bands,
      splits=args.splits.split(","),
      workers=args.workers,
      on_bad_sample=args.on_bad_sample,
      compression=args.compression,
      log_every=args.log_every,
      overwrite=args.overwrite,
      nodata=args.nodata,
      max_nodata_fraction=args.max_nodata_fraction,
    )
  except (BadSampleError, ValueError, FileNotFoundError, FileExistsError) as e:
    log.error("%s", e)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
