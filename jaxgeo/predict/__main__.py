"""python -m jaxgeo.predict: a trained segmentation model over whole GeoTIFF scenes or a slippy-map tile folder.

  python -m jaxgeo.predict --checkpoint=RUN_DIR --input=scene.tif --out=map.tif [--polygons] [--probabilities]
  python -m jaxgeo.predict --checkpoint=RUN_DIR --input='scenes/*.tif,other.tif' --out=maps/
  python -m jaxgeo.predict --checkpoint=RUN_DIR --tiles=tiles/ --out=masks/ [--tile-buffer=32]
  python -m jaxgeo.predict --checkpoint=model.pth --num-classes=2 --input=scene.tif --out=map.tif

Outputs of a scene (one set per input; every option also takes its underscore spelling, e.g. --max_memory_mb):
  the class map     --out=FILE.tif with one input; else --out is a folder and the map of `<name>.tif` is
                    `<folder>/<name>_classes.tif`. A Cloud-Optimised GeoTIFF with the input's CRS, transform and
                    nodata mask: uint8 class ids (255: no data), the class colours as its colour table
  beside it         `<map stem>_preview.png` (the scene with the map over it, and a legend); with --probabilities
                    `<map stem>_probabilities.tif` (one uint8 band per class, probability * 254, 255: no data)
  --polygons        GeoJSON in WGS84 of --polygon-classes (default every class but 0): with no value
                    `<map stem>.geojson`; a .geojson path (one input); or a folder (`<folder>/<name>.geojson`)
Outputs of --tiles: `<out>/{z}/{x}/{y}.png` masks (mode P, class palette) and `<out>/preview.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
import sys

from jaxgeo import logs
from jaxgeo.predict import model, scene, slippy


def _option(parser, name: str, **kwargs) -> None:
  """--some-name, also spelled --some_name (absl style, as jaxgeo.main's flags)."""
  spellings = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
  parser.add_argument(*spellings, **kwargs)


def _csv(text: str) -> list[str]:
  return [part.strip() for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
  return [float(v) for v in _csv(text)]


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m jaxgeo.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  _option(p, "checkpoint", required=True, help="a jaxgeo segmentation run folder, or a PyTorch .pth/.safetensors")
  _option(p, "input", type=_csv, help="GeoTIFF scene(s): comma-separated paths or glob patterns")
  _option(p, "tiles", help="a slippy map folder {z}/{x}/{y}.png|jpg|webp|tif to predict tile by tile")
  _option(p, "out", required=True, help="the class map .tif (one input), or a folder")
  _option(p, "window", type=int, help="window size in pixels (default: the run's tile size; 256 for a .pth)")
  _option(p, "overlap", type=int, help="pixels shared by neighbouring windows (default: a quarter of the window)")
  _option(p, "batch-size", type=int, default=8, help="windows per step, rounded up to a multiple of the devices")
  _option(p, "tta", action="store_true", help="average the 8 flips/quarter turns of each window (8x the compute)")
  _option(p, "probabilities", action="store_true", help="also write every class's probability (uint8 bands)")
  _option(p, "max-memory-mb", type=float, default=1024.0, help="bound on the blending buffers (strips beyond it)")
  _option(p, "bands", type=_csv, help="scene band numbers (1-based) or names feeding the model, in its band order")
  _option(p, "polygons", nargs="?", const="", help="write polygons: a .geojson path, a folder, or no value")
  _option(p, "polygon-classes", type=_csv, help="class names or ids to vectorise (default: all but class 0)")
  _option(p, "simplify", type=float, default=1.0, help="polygon simplification tolerance in pixels (0: none)")
  _option(p, "min-area", type=float, default=0.0, help="drop polygons smaller than this many square metres")
  _option(p, "no-preview", action="store_true", help="do not write the preview PNG")
  _option(p, "quiet", action="store_true", help="no progress line")
  _option(p, "tile-buffer", type=int, default=32, help="--tiles: margin taken from neighbouring tiles (px)")
  _option(p, "image-scale", type=float, help="divide pixels by this (the value of full brightness) instead of 255")
  torch = p.add_argument_group("PyTorch checkpoints (a jaxgeo run records all of these itself)")
  _option(torch, "num-classes", type=int, help="class count, when the file has no segmentation head")
  _option(torch, "class-names", type=_csv, help="class names (default class_0, class_1, ...)")
  _option(torch, "mean", type=_floats, help="per-band mean of the 0-1 scaled input (default: from the layout)")
  _option(torch, "std", type=_floats, help="per-band std (default: from the layout)")
  _option(torch, "input-scaling", choices=("unit", "imagenet"), help="Satlas 0-1 or torchvision ImageNet inputs")
  return p


def scene_outputs(inputs, out: str, polygons: str | None) -> list[tuple[str, str, str | None]]:
  """(input, class map path, polygons path or None) per input, by the naming rule of the module docstring."""
  single_file = out.lower().endswith((".tif", ".tiff"))
  if single_file and len(inputs) > 1:
    raise ValueError(f"--out={out} is a file, but there are {len(inputs)} inputs; give a folder")
  stems = {}
  for path in inputs:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in stems:
      raise ValueError(f"{stems[stem]} and {path} would write the same outputs ({stem}); predict them separately")
    stems[stem] = path
  rows = []
  for stem, path in stems.items():
    target = out if single_file else os.path.join(out, f"{stem}_classes.tif")
    if os.path.abspath(target) == os.path.abspath(path):
      raise ValueError(f"--out={out} would overwrite the input {path}")
    if polygons is None:
      vectors = None
    elif polygons == "":
      vectors = os.path.splitext(target)[0] + ".geojson"
    elif polygons.lower().endswith((".geojson", ".json")):
      if len(inputs) > 1:
        raise ValueError(f"--polygons={polygons} is one file for {len(inputs)} inputs; give a folder or no value")
      vectors = polygons
    else:
      vectors = os.path.join(polygons, f"{stem}.geojson")
    rows.append((path, target, vectors))
  return rows


def expand_inputs(patterns) -> list[str]:
  paths = []
  for pattern in patterns:
    found = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [os.path.expanduser(pattern)]
    if not found:
      raise FileNotFoundError(f"--input: {pattern!r} matches no file")
    for path in found:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"--input: {path} does not exist")
    paths += found
  return paths


def run(args) -> list[dict]:
  if bool(args.input) == bool(args.tiles):
    raise ValueError("give either --input (GeoTIFF scenes) or --tiles (a slippy map folder)")
  torch_options = dict(
    num_classes=args.num_classes,
    class_names=args.class_names,
    mean=args.mean,
    std=args.std,
    input_scaling=args.input_scaling,
  )
  if args.window and not os.path.isdir(args.checkpoint):
    torch_options["window"] = args.window
  predictor = model.load_predictor(args.checkpoint, **torch_options)
  if args.image_scale is not None:
    predictor = dataclasses.replace(predictor, image_scale=args.image_scale)
  mesh = model.prediction_mesh()
  forward = model.make_forward(predictor, mesh, tta=args.tta)
  logging.info(
    "model %s: bands %s, classes %s, %d device(s)", predictor.where, predictor.bands, predictor.class_names, mesh.size
  )
  if args.tiles:
    result = slippy.predict_tiles(
      predictor, forward, args.tiles, args.out, buffer=args.tile_buffer, batch_size=args.batch_size,
      device_count=mesh.size, preview=not args.no_preview, progress=not args.quiet,
    )  # fmt: skip
    print(f"{args.tiles}: {result['tiles']} tiles -> {args.out} ({result['tiles_per_s']:.1f} tiles/s)")
    return [result]
  results = []
  for path, target, vectors in scene_outputs(expand_inputs(args.input), args.out, args.polygons):
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    options = scene.Options(
      window=args.window, overlap=args.overlap, batch_size=args.batch_size, tta=args.tta,
      probabilities=args.probabilities, max_memory_mb=args.max_memory_mb,
      bands=tuple(args.bands) if args.bands else None, polygons=vectors,
      polygon_classes=tuple(args.polygon_classes) if args.polygon_classes else None, simplify=args.simplify,
      min_area=args.min_area, preview=not args.no_preview, progress=not args.quiet,
    )  # fmt: skip
    result = scene.predict_scene(predictor, forward, path, target, options, device_count=mesh.size)
    written = [p for p in (result["classes"], result["probabilities"], result["polygons"], result["preview"]) if p]
    polygons = f", {result['polygon_count']} polygons" if result["polygons"] else ""
    print(f"{path}: {result['windows_per_s']:.1f} windows/s{polygons} -> {', '.join(written)}")
    results.append(result)
  return results


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  with logs.command_logging("%(levelname)s %(message)s", quiet=("absl", "jax", "rasterio", "matplotlib", "PIL")):
    try:
      run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
      # The message names the file or option and what was expected; a traceback would bury it.
      print(f"error: {e}", file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
