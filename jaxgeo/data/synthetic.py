"""A synthetic BigEarthNet-S2 in the real v1 on-disk format, so everything runs with no download.

Each patch mixes 1-3 land-cover themes laid out as large smooth regions (plus sometimes a river on top). Themes
have Sentinel-2 L2A-like spectra (water dark in NIR/SWIR, vegetation bright in red edge/NIR, soil and sand
bright in SWIR, roofs flat and bright) and their own spatial structure (fields in rectangles, urban blocks on a
street grid, blobby forest crowns, smooth water), so a self-supervised model has real structure to find and the
19-class labels are predictable from the pixels. Labels name the themes that cover a patch. Each patch is then
seen through its own acquisition (`acquisition_nuisance`: illumination, spectral tilt, haze, noise), as real
patches are, so the mean colour of a patch is a blurred cue and the spatial structure carries the labels.
"""

from __future__ import annotations

import json
import os

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from jaxgeo.data import ben_labels
from jaxgeo.data import bigearthnet as ben
from jaxgeo.data.geotiff import resize_bilinear, write_geotiff
from jaxgeo.data.source import write_once

_FORMAT_VERSION = 4  # bump when the written data changes, so stale caches are not reused
_SIZE = ben.PATCH_SIZE
_CRS = "EPSG:32633"  # UTM 33N, the zone of much of BigEarthNet's central Europe
_TILE = "S2A_MSIL2A_20170613T101031"
_TILE_SOURCE = "S2A_MSIL1C_20170613T101031_N0205_R022_T33UUP_20170613T101026"
_ORIGIN = (399960.0, 5800020.0)  # upper-left of tile T33UUP; patches are cut on a 1.2 km grid from here

# Surface reflectance per band, ALL_BANDS order: B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12.
_SPECTRA = {
  "water": (0.035, 0.038, 0.042, 0.024, 0.020, 0.016, 0.020, 0.018, 0.016, 0.010, 0.008, 0.006),
  "sea": (0.045, 0.052, 0.045, 0.022, 0.016, 0.012, 0.012, 0.010, 0.009, 0.006, 0.005, 0.004),
  "river": (0.045, 0.055, 0.070, 0.055, 0.050, 0.035, 0.030, 0.028, 0.025, 0.015, 0.012, 0.009),
  "conifer": (0.020, 0.020, 0.035, 0.020, 0.060, 0.170, 0.210, 0.230, 0.240, 0.225, 0.110, 0.050),
  "broadleaf": (0.025, 0.028, 0.055, 0.030, 0.090, 0.270, 0.330, 0.350, 0.365, 0.340, 0.170, 0.075),
  "crop_green": (0.040, 0.040, 0.070, 0.040, 0.110, 0.300, 0.370, 0.390, 0.400, 0.370, 0.200, 0.100),
  "crop_ripe": (0.070, 0.070, 0.100, 0.120, 0.160, 0.220, 0.250, 0.270, 0.280, 0.260, 0.280, 0.190),
  "soil": (0.080, 0.090, 0.120, 0.150, 0.180, 0.210, 0.230, 0.250, 0.260, 0.250, 0.300, 0.230),
  "pasture": (0.035, 0.035, 0.065, 0.045, 0.100, 0.250, 0.300, 0.320, 0.330, 0.310, 0.210, 0.110),
  "grassland": (0.045, 0.050, 0.080, 0.075, 0.120, 0.200, 0.230, 0.250, 0.260, 0.245, 0.260, 0.170),
  "shrub": (0.030, 0.030, 0.050, 0.040, 0.085, 0.200, 0.240, 0.260, 0.270, 0.255, 0.180, 0.090),
  "roof": (0.090, 0.100, 0.110, 0.120, 0.130, 0.150, 0.160, 0.170, 0.175, 0.165, 0.200, 0.180),
  "bright_roof": (0.140, 0.160, 0.170, 0.180, 0.190, 0.200, 0.205, 0.210, 0.215, 0.205, 0.240, 0.220),
  "asphalt": (0.060, 0.065, 0.070, 0.075, 0.080, 0.085, 0.090, 0.095, 0.095, 0.090, 0.110, 0.100),
  "sand": (0.120, 0.140, 0.180, 0.220, 0.250, 0.270, 0.280, 0.290, 0.300, 0.290, 0.350, 0.300),
}
_SPECTRA = {k: np.asarray(v, np.float32) for k, v in _SPECTRA.items()}


def _smooth(rng, cells: int) -> np.ndarray:
  """Unit-scale smooth random field on the patch grid; `cells` sets the feature count across the patch."""
  return resize_bilinear(rng.standard_normal((cells + 1, cells + 1)), (_SIZE, _SIZE)) * 1.6


def _flat(name, rng, amplitude=0.05, cells=6):
  return _SPECTRA[name] * (1.0 + amplitude * _smooth(rng, cells))[..., None]


def _mix(a, b, weight):
  return _SPECTRA[a] * (1.0 - weight[..., None]) + _SPECTRA[b] * weight[..., None]


def _forest(kind):
  # Crown texture tells the forest types apart as much as colour does (in true colour they are close):
  # conifers are small, dense, dark-shadowed crowns; broadleaf crowns are larger and softer; mixed forest
  # alternates stands of both.
  def crowns(rng, cells, depth):
    return 1.0 + depth * _smooth(rng, cells) + 0.08 * _smooth(rng, 6)

  def render(rng):
    if kind == "mixed":
      weight = 1.0 / (1.0 + np.exp(-4.0 * _smooth(rng, 8)))
      base = _mix("conifer", "broadleaf", weight)
      texture = crowns(rng, 40, 0.3) * (1.0 - weight) + crowns(rng, 14, 0.18) * weight
    else:
      base = _SPECTRA[kind] * np.ones((_SIZE, _SIZE, 1), np.float32)
      texture = crowns(rng, 40, 0.3) if kind == "conifer" else crowns(rng, 14, 0.18)
    return base * np.maximum(texture, 0.2)[..., None]

  return render


def _cuts(rng, low, high):
  """Sorted cut positions splitting [0, _SIZE) into segments of random length in [low, high)."""
  return np.cumsum(rng.integers(low, high, size=_SIZE // low + 1))


def _fields(rng):
  # Strips across the patch, each cut into fields with their own crop state: the rectangles of arable land.
  row_of = np.searchsorted(_cuts(rng, 10, 35), np.arange(_SIZE), side="right")
  field_id = np.zeros((_SIZE, _SIZE), np.int64)
  for strip in np.unique(row_of):
    col_of = np.searchsorted(_cuts(rng, 15, 60), np.arange(_SIZE), side="right")
    field_id[row_of == strip] = strip * 64 + col_of
  _, field_id = np.unique(field_id, return_inverse=True)
  field_id = field_id.reshape(_SIZE, _SIZE)
  states = np.stack([_SPECTRA["crop_green"], _SPECTRA["crop_ripe"], _SPECTRA["soil"]])
  weights = rng.dirichlet((0.4, 0.4, 0.4), size=field_id.max() + 1).astype(np.float32)
  image = (weights @ states)[field_id] * (1.0 + 0.03 * _smooth(rng, 30))[..., None]
  return image if rng.random() < 0.5 else image.transpose(1, 0, 2)


def _blocks(rng, spacing, street, roof, garden_p):
  # A street grid; each block is a roof of its own brightness or a garden: the blocky look of built-up land.
  pos = np.arange(_SIZE)
  row_cuts, col_cuts = _cuts(rng, *spacing), _cuts(rng, *spacing)
  row_of = np.searchsorted(row_cuts, pos, side="right")
  col_of = np.searchsorted(col_cuts, pos, side="right")
  # A street runs along the first `street` pixels of every block row and column.
  row_street = pos - np.concatenate([[0], row_cuts])[row_of] < street
  col_street = pos - np.concatenate([[0], col_cuts])[col_of] < street
  on_street = row_street[:, None] | col_street[None, :]
  block = row_of[:, None] * 64 + col_of[None, :]
  _, block = np.unique(block, return_inverse=True)
  block = block.reshape(_SIZE, _SIZE)
  brightness = rng.uniform(0.75, 1.3, size=block.max() + 1).astype(np.float32)
  garden = rng.random(block.max() + 1) < garden_p
  image = np.where(garden[block][..., None], _SPECTRA["pasture"], _SPECTRA[roof] * brightness[block][..., None])
  image = np.where(on_street[..., None], _SPECTRA["asphalt"], image)
  return image * (1.0 + 0.04 * _smooth(rng, 40))[..., None]


def _dunes(rng):
  ripples = 1.0 + 0.06 * np.sin(np.arange(_SIZE) / rng.uniform(2.0, 4.0))[None, :] + 0.05 * _smooth(rng, 10)
  return _SPECTRA["sand"] * ripples[..., None]


# theme -> (43-class name in the json, renderer of a full-patch [H, W, 12] reflectance image)
THEMES = {
  "water": ("Water bodies", lambda rng: _flat("water", rng, 0.04, 4)),
  "sea": ("Sea and ocean", lambda rng: _flat("sea", rng, 0.03, 3)),
  "coniferous": ("Coniferous forest", _forest("conifer")),
  "broadleaf": ("Broad-leaved forest", _forest("broadleaf")),
  "mixed_forest": ("Mixed forest", _forest("mixed")),
  "arable": ("Non-irrigated arable land", _fields),
  "pasture": ("Pastures", lambda rng: _flat("pasture", rng, 0.1, 10)),
  "urban": ("Discontinuous urban fabric", lambda rng: _blocks(rng, (8, 16), 2, "roof", 0.3)),
  "industrial": ("Industrial or commercial units", lambda rng: _blocks(rng, (18, 36), 3, "bright_roof", 0.05)),
  "grassland": ("Natural grassland", lambda rng: _flat("grassland", rng, 0.15, 14)),
  "shrub": (
    "Transitional woodland/shrub",
    lambda rng: _mix("grassland", "shrub", 1.0 / (1.0 + np.exp(-3.0 * _smooth(rng, 16)))),
  ),
  "sand": ("Beaches, dunes, sands", _dunes),
}
RIVER = "Water courses"
_MIN_COVER = 0.08  # a theme covering less of a patch than this would be an unfair label, so layouts are redrawn


def render_patch(rng: np.random.Generator, themes: list[str], river: bool = False):
  """-> (reflectance float32 [120, 120, 12] in ALL_BANDS order, class_map int [120, 120], 43-class names).

  class_map indexes the returned names; the river, when drawn, is the last name.
  """
  for _ in range(20):
    region = np.argmax(np.stack([_smooth(rng, 2) + rng.normal(0, 0.3) for _ in themes]), axis=0)
    cover = np.bincount(region.ravel(), minlength=len(themes)) / region.size
    if cover.min() >= _MIN_COVER:
      break
  image = np.zeros((_SIZE, _SIZE, len(ben.ALL_BANDS)), np.float32)
  for i, theme in enumerate(themes):
    image = np.where((region == i)[..., None], THEMES[theme][1](rng), image)
  names = [THEMES[t][0] for t in themes]
  if river:
    x = np.arange(_SIZE)
    centre = rng.uniform(30, 90) + rng.uniform(5, 20) * np.sin(x / rng.uniform(12, 30) + rng.uniform(0, 6.3))
    on_river = np.abs(np.arange(_SIZE)[:, None] - centre[None, :]) < rng.uniform(2.0, 4.5)
    on_river = on_river if rng.random() < 0.5 else on_river.T
    image = np.where(on_river[..., None], _flat("river", rng, 0.04, 4), image)
    region = np.where(on_river, len(themes), region)
    names.append(RIVER)
  return image, region, names


def _sample_themes(rng):
  count = rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2])
  themes = list(rng.choice(sorted(THEMES), size=count, replace=False))
  return themes, bool(count < 3 and rng.random() < 0.15)


# Relative strength of path radiance (haze) per band, ALL_BANDS order: Rayleigh-like, strongest in the blue.
_HAZE_SHAPE = np.asarray((1.0, 0.85, 0.65, 0.45, 0.38, 0.32, 0.28, 0.25, 0.23, 0.2, 0.1, 0.06), np.float32)
# Centre wavelengths (um) in ALL_BANDS order, for the per-acquisition spectral tilt.
_WAVELENGTH = np.asarray((0.443, 0.490, 0.560, 0.665, 0.705, 0.740, 0.783, 0.842, 0.865, 0.945, 1.61, 2.19), np.float32)


def acquisition_nuisance(reflectance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """What differs between two acquisitions of the same ground: sun elevation and season (an overall gain),
  atmosphere and phenology (a smooth spectral tilt plus small per-band gains), haze (an additive, blue-heavy,
  spatially uneven veil that also lowers contrast) and sensor noise. Real Sentinel-2 patches vary this way,
  so a patch's mean colour alone is an unreliable cue and the land cover must be read from its structure.
  """
  gain = np.exp(rng.normal(0.0, 0.15))
  tilt = rng.normal(0.0, 0.2) * (np.log(_WAVELENGTH) - np.log(0.665))
  band_gain = gain * np.exp(tilt + rng.normal(0.0, 0.04, len(_WAVELENGTH))).astype(np.float32)
  haze_amount = rng.uniform(0.0, 0.045) if rng.random() < 0.6 else 0.0
  veil = np.clip(1.0 + 0.6 * _smooth(rng, 2), 0.2, 2.0)[..., None] * haze_amount
  reflectance = reflectance * band_gain * (1.0 - 2.0 * veil) + veil * _HAZE_SHAPE
  noise = rng.uniform(0.002, 0.008)
  return reflectance + rng.normal(0.0, noise, reflectance.shape).astype(np.float32)


def _write_patch(patch_dir: str, name: str, reflectance: np.ndarray, ulx: float, uly: float, rng) -> None:
  # Negative reflectance (noise over dark water) is written as DN 0, as Sentinel-2 L2A before processing baseline
  # 04.00 (all of BigEarthNet) writes it: so the readers meet legitimate 0 pixels, as they do in the real data.
  reflectance = acquisition_nuisance(reflectance, rng)
  os.makedirs(patch_dir)
  for b, band in enumerate(ben.ALL_BANDS):
    factor = ben.BAND_RESOLUTION_M[band] // 10
    size = _SIZE // factor
    coarse = reflectance[..., b].reshape(size, factor, size, factor).mean(axis=(1, 3))
    dn = np.clip(np.round(coarse * 10000.0), 0, 20000).astype(np.uint16)
    write_geotiff(
      os.path.join(patch_dir, f"{name}_{band}.tif"),
      dn,
      crs=_CRS,
      transform=Affine(10.0 * factor, 0.0, ulx, 0.0, -10.0 * factor, uly),
    )


def write_synthetic_bigearthnet(directory: str | os.PathLike, num_patches: int, seed: int = 0) -> tuple[str, str]:
  """Writes (once; later calls with the same arguments reuse it) a BigEarthNet-S2 v1-layout dataset.

  Returns (root, metadata_parquet_path). The parquet is in the bigearthnet-gdf-builder format (name,
  original_split, labels, new_labels, ...), with the split `hash_split` gives, so the json-only reading of the
  same folder yields the same splits. Written to a temporary folder and renamed into place, so concurrent
  writers (several hosts, several test processes) never see half a dataset.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  def write(staging):
    rng = np.random.default_rng(seed)
    projection = CRS.from_string(_CRS).to_wkt()
    rows = {"name": [], "original_split": [], "labels": [], "new_labels": [], "snow": [], "cloud_or_shadow": []}
    grid_cols = max(1, int(np.ceil(np.sqrt(num_patches))))
    for i in range(num_patches):
      row, col = divmod(i, grid_cols)
      name = f"{_TILE}_{row}_{col}"
      ulx, uly = _ORIGIN[0] + col * 1200.0, _ORIGIN[1] - row * 1200.0
      reflectance, _, labels_43 = render_patch(rng, *_sample_themes(rng))
      patch_dir = os.path.join(staging, "BigEarthNet-v1.0", name)
      # The acquisition draws from its own stream, so retuning it never reshuffles the scenes.
      _write_patch(patch_dir, name, reflectance, ulx, uly, np.random.default_rng((seed, i)))
      with open(os.path.join(patch_dir, f"{name}_labels_metadata.json"), "w") as f:
        json.dump(
          {
            "labels": labels_43,
            "coordinates": {"ulx": ulx, "uly": uly, "lrx": ulx + 1200.0, "lry": uly - 1200.0},
            "projection": projection,
            "tile_source": _TILE_SOURCE,
            "acquisition_date": "2017-06-13 10:10:31",
          },
          f,
        )
      rows["name"].append(name)
      rows["original_split"].append(ben_labels.hash_split(name))
      rows["labels"].append(labels_43)
      rows["new_labels"].append(
        sorted({ben_labels.LABEL_43_TO_19[l] for l in labels_43}, key=ben_labels.CLASSES_19.index)
      )
      rows["snow"].append(False)
      rows["cloud_or_shadow"].append(False)
    pq.write_table(pa.table(rows), os.path.join(staging, "metadata.parquet"))
    return json.dumps({"num_patches": num_patches, "seed": seed, "version": _FORMAT_VERSION})

  final = write_once(directory, f"ben_s2_v{_FORMAT_VERSION}_n{num_patches}_seed{seed}", write, marker="COMPLETE")
  return os.path.join(final, "BigEarthNet-v1.0"), os.path.join(final, "metadata.parquet")
