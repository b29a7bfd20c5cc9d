"""Which bands of a scene feed the model, and how its pixels are scaled: as in training, or a clear error.

The model's bands come from the run (dataset.json "bands", in order). A scene's bands are matched to them:
  --bands given      1-based band numbers of the scene, or band names (its band descriptions / colour
                     interpretation), one per model band, in the model's order
  by name            every model band is the description of a scene band (e.g. a Sentinel-2 stack whose bands are
                     described "B04", "B03", "B02"), in any order
  by colour          a red / green / blue model on a scene whose colour interpretation says which band is which
  in order           as many scene bands as model bands (alpha bands aside), taken in file order
Anything else (a 3-band model on a 4-band scene with nothing to say which 3) is an error naming both.
Pixel scale: a model trained on 8-bit imagery (/ 255) refuses a 16-bit scene unless image_scale is given.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _scene_bands(src) -> tuple[list[int], dict[str, int]]:
  """(the scene's non-alpha band numbers, {lower-case name: band number} from descriptions and colours)."""
  from rasterio.enums import ColorInterp

  colour_bands = [i for i, c in zip(src.indexes, src.colorinterp) if c != ColorInterp.alpha]
  names = {}
  for i, description, colour in zip(src.indexes, src.descriptions, src.colorinterp):
    if colour in (ColorInterp.red, ColorInterp.green, ColorInterp.blue):
      names.setdefault(colour.name, i)
    if description:
      names[description.strip().lower()] = i
  return colour_bands, names


def describe_scene_bands(src) -> str:
  parts = []
  for i, description, colour in zip(src.indexes, src.descriptions, src.colorinterp):
    label = description or colour.name
    parts.append(f"{i}:{label}")
  return f"{src.count} band(s) [{', '.join(parts)}]"


def select_bands(
  src, path: str, model_bands: Sequence[str], where: str, requested: Sequence[str] | None = None
) -> list[int]:
  """1-based band numbers of `src` to read, in the model's band order (see the module docstring)."""
  colour_bands, names = _scene_bands(src)
  wanted = [b.lower() for b in model_bands]
  model = f"the model ({where}) was trained on {len(model_bands)} band(s) {tuple(model_bands)}"
  if requested:
    chosen = []
    for token in requested:
      token = str(token).strip()
      if token.isdigit() and 1 <= int(token) <= src.count:
        chosen.append(int(token))
      elif token.lower() in names:
        chosen.append(names[token.lower()])
      else:
        raise ValueError(
          f"{path}: --bands names {token!r}, which is neither a band number 1..{src.count} nor a band name; the "
          f"scene has {describe_scene_bands(src)}"
        )
    if len(chosen) != len(model_bands):
      raise ValueError(f"{path}: --bands picks {len(chosen)} band(s) {list(requested)}, but {model}")
    return chosen
  if all(name in names for name in wanted):
    by_name = [names[name] for name in wanted]
    if len(set(by_name)) == len(by_name):
      return by_name
  if len(colour_bands) == len(model_bands):
    return colour_bands
  raise ValueError(
    f"{path}: the scene has {describe_scene_bands(src)}, but {model} and nothing says which scene bands those are; "
    f"pass --bands with {len(model_bands)} band numbers of the scene in the model's order (e.g. --bands="
    f"{','.join(str(i) for i in colour_bands[: len(model_bands)])})"
  )


def check_scale(dtype, path: str, image_scale: float | None, where: str) -> None:
  """A model trained on 8-bit imagery (/ 255) reads only 8-bit scenes unless image_scale says otherwise."""
  if image_scale is None and np.dtype(dtype) != np.uint8:
    raise ValueError(
      f"{path}: {np.dtype(dtype).name} pixels, but the model ({where}) was trained on 8-bit imagery (/ 255, no "
      "image_scale in its dataset.json); pass --image-scale with the value of full brightness (e.g. 10000 for "
      "Sentinel-2 L2A reflectance) if the model was trained on such data scaled that way"
    )
