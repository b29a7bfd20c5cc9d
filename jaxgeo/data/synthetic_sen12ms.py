"""A synthetic SEN12MS in the real on-disk layout (see data/sen12ms.py), so MoCo and classification run with no
download.

Each scene (spread over the four season folders) gets one IGBP land-cover map: smooth regions of a handful of
classes from one biome (temperate, boreal, dryland, farmland, tropical; snow in boreal winters). Both sensors
render that same map, with the same parcel layout and texture: Sentinel-2 L1C-like top-of-atmosphere spectra
per material (water dark in NIR and SWIR, vegetation bright in NIR, soil and sand bright in SWIR, snow bright in
the visible and dark in SWIR; deciduous trees, grass and crops greener in summer than in winter) and Sentinel-1
backscatter per material (calm water darkest, bare sand and asphalt dark, vegetation brighter in VH by volume
scattering, built-up land brightest by double bounce). So a sensor pair shares content a model can find.

Patches are cut on a half-patch stride, as the real tiling is (overlapping patches share ground). Each patch is
then seen through its own acquisition (the real data has one per scene; per patch gives a small set the spread
of many scenes): S2 illumination gain, spectral tilt, haze and noise; S1 calibration offset, an incidence-angle
gradient across the swath and multiplicative speckle. Spatial structure is scaled with the patch size, so a
small test patch looks like a thumbnail of a 256-px one, and the transform says so (pixel = 2560 m / size).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
from affine import Affine

from jaxgeo.data import sen12ms
from jaxgeo.data.geotiff import resize_bilinear, write_geotiff
from jaxgeo.data.source import write_once

_FORMAT_VERSION = 1  # bump when the written data changes, so stale caches are not reused
_REAL_SIZE = 256  # structure sizes below are in pixels of a real 256-px, 10 m patch

# Top-of-atmosphere reflectance, S2_BANDS order B01..B08, B8A, B09, B10, B11, B12; then (VV, VH) sigma0 in dB.
_MATERIALS = {
  "water": ((0.075, 0.058, 0.045, 0.030, 0.024, 0.020, 0.018, 0.016, 0.014, 0.008, 0.002, 0.006, 0.004), (-21, -28)),
  "conifer": ((0.080, 0.062, 0.055, 0.035, 0.070, 0.170, 0.205, 0.225, 0.235, 0.085, 0.003, 0.110, 0.050), (-7.5, -13)),
  "broadleaf": (
    (0.082, 0.064, 0.068, 0.040, 0.095, 0.260, 0.320, 0.345, 0.360, 0.120, 0.004, 0.170, 0.075),
    (-7, -12.5),
  ),
  "bare_trees": (
    (0.090, 0.075, 0.080, 0.085, 0.110, 0.150, 0.170, 0.180, 0.190, 0.075, 0.004, 0.220, 0.160),
    (-9, -16),
  ),
  "shrub": ((0.085, 0.072, 0.078, 0.070, 0.110, 0.190, 0.225, 0.245, 0.255, 0.090, 0.004, 0.220, 0.140), (-9.5, -16.5)),
  "dry_grass": (
    (0.095, 0.085, 0.100, 0.115, 0.145, 0.190, 0.210, 0.225, 0.235, 0.085, 0.004, 0.290, 0.210),
    (-12, -20),
  ),
  "grass": (
    (0.085, 0.070, 0.085, 0.065, 0.120, 0.250, 0.300, 0.320, 0.330, 0.115, 0.004, 0.220, 0.130),
    (-10.5, -17.5),
  ),
  "wetland": ((0.078, 0.062, 0.066, 0.048, 0.085, 0.180, 0.210, 0.220, 0.225, 0.080, 0.003, 0.130, 0.065), (-6, -15)),
  "crop": ((0.082, 0.066, 0.082, 0.050, 0.115, 0.310, 0.380, 0.400, 0.410, 0.135, 0.004, 0.200, 0.100), (-9, -15)),
  "soil": ((0.105, 0.098, 0.120, 0.150, 0.180, 0.210, 0.230, 0.250, 0.260, 0.095, 0.005, 0.300, 0.230), (-13, -21)),
  "roof": ((0.125, 0.112, 0.115, 0.120, 0.130, 0.150, 0.160, 0.170, 0.175, 0.070, 0.005, 0.200, 0.180), (-2, -9)),
  "asphalt": ((0.095, 0.080, 0.078, 0.080, 0.085, 0.090, 0.095, 0.100, 0.100, 0.040, 0.003, 0.110, 0.100), (-16, -24)),
  "snow": ((0.420, 0.450, 0.430, 0.410, 0.400, 0.390, 0.370, 0.350, 0.340, 0.170, 0.012, 0.050, 0.040), (-13, -21)),
  "sand": ((0.135, 0.135, 0.170, 0.220, 0.250, 0.270, 0.280, 0.290, 0.300, 0.110, 0.006, 0.350, 0.300), (-17, -26)),
}
_S2 = {k: np.asarray(v[0], np.float32) for k, v in _MATERIALS.items()}
_S1 = {k: np.asarray(v[1], np.float32) for k, v in _MATERIALS.items()}
_WAVELENGTH_UM = np.asarray((0.443, 0.49, 0.56, 0.665, 0.705, 0.74, 0.783, 0.842, 0.865, 0.945, 1.375, 1.61, 2.19))

# IGBP value -> (material A, material B, how they mix, texture size px, texture amplitude):
#   static: A only; seasonal: B (dormant) -> A (green) with the season; patchy: a fine spatial mix of A and B;
#   fields: parcels, each its own crop state; mosaic: parcels of crops and of woodland; blocks: roofs and streets.
_CLASSES = {
  1: ("conifer", "conifer", "static", 5, 0.25),
  2: ("broadleaf", "broadleaf", "static", 8, 0.2),
  3: ("conifer", "bare_trees", "seasonal", 5, 0.25),
  4: ("broadleaf", "bare_trees", "seasonal", 8, 0.2),
  5: ("conifer", "broadleaf", "patchy", 6, 0.22),
  6: ("shrub", "shrub", "static", 10, 0.15),
  7: ("shrub", "sand", "patchy", 6, 0.1),
  8: ("broadleaf", "dry_grass", "patchy", 8, 0.15),
  9: ("shrub", "dry_grass", "patchy", 12, 0.12),
  10: ("grass", "dry_grass", "seasonal", 20, 0.1),
  11: ("wetland", "water", "patchy", 15, 0.1),
  12: ("crop", "soil", "fields", 15, 0.04),
  13: ("roof", "asphalt", "blocks", 6, 0.05),
  14: ("crop", "broadleaf", "mosaic", 10, 0.08),
  15: ("snow", "snow", "static", 50, 0.04),
  16: ("sand", "sand", "static", 30, 0.08),
  17: ("water", "water", "static", 80, 0.03),
}
_BIOMES = {
  "temperate": (4, 5, 12, 10, 13, 17),
  "boreal": (1, 3, 5, 8, 11, 17),
  "dryland": (7, 9, 10, 16, 13),
  "farmland": (12, 14, 13, 10, 17),
  "tropical": (2, 9, 8, 12, 14, 17),
}
_GREENNESS = {"spring": 0.7, "summer": 1.0, "fall": 0.5, "winter": 0.15}
# Plausible MODIS LCCS land cover / land use / surface hydrology codes per IGBP value (the reader uses band 1).
_LCCS = np.asarray(
  [
    (0, 0, 0),
    (11, 10, 10),
    (12, 10, 10),
    (13, 10, 10),
    (14, 10, 10),
    (15, 10, 10),
    (41, 40, 40),
    (43, 40, 40),
    (21, 20, 20),
    (22, 30, 30),
    (31, 30, 30),
    (31, 30, 50),
    (31, 36, 30),
    (1, 9, 1),
    (31, 25, 30),
    (2, 2, 2),
    (1, 1, 1),
    (3, 3, 3),
  ],
  np.uint16,
)


def _field(rng, shape, size_px) -> np.ndarray:
  """Smooth random field of about unit spread whose features are `size_px` pixels across."""
  size_px = max(float(size_px), 1.0)
  coarse = rng.standard_normal((int(np.ceil(shape[0] / size_px)) + 2, int(np.ceil(shape[1] / size_px)) + 2))
  return resize_bilinear(coarse, shape) * 1.6


def _parcels(rng, shape, low, high):
  """Rectangular parcels from random cuts along both axes -> (parcel id [H, W], distance to the last cut [H, W])."""
  ids, offset = [], []
  for length in shape:
    cuts = np.cumsum(rng.integers(max(2, int(low)), max(3, int(high)), size=length // max(2, int(low)) + 2))
    pos = np.arange(length)
    index = np.searchsorted(cuts, pos, side="right")
    ids.append(index)
    offset.append(pos - np.concatenate([[0], cuts])[index])
  parcel = ids[0][:, None] * (ids[1].max() + 1) + ids[1][None, :]
  return np.unique(parcel, return_inverse=True)[1].reshape(shape), np.minimum(offset[0][:, None], offset[1][None, :])


def _render_class(value, rng, shape, unit, greenness):
  """Ground of IGBP class `value` over a whole scene -> (S2 reflectance [H, W, 13], S1 dB [H, W, 2])."""
  a, b, how, texture_px, amplitude = _CLASSES[value]
  texture = np.maximum(1.0 + amplitude * _field(rng, shape, texture_px * unit), 0.3)
  if how == "static":
    weight = np.zeros(shape, np.float32)
  elif how == "seasonal":
    weight = np.clip(1.0 - greenness + 0.1 * _field(rng, shape, 40 * unit), 0.0, 1.0)
  elif how == "patchy":
    weight = 1.0 / (1.0 + np.exp(-3.0 * _field(rng, shape, 2.5 * texture_px * unit)))
  else:
    low, high = (6, 14) if how == "blocks" else (20, 60)
    parcel, edge = _parcels(rng, shape, low * unit, high * unit)
    if how == "fields":  # each field its own crop state, greener in summer
      state = np.clip(greenness + rng.normal(0.0, 0.4, parcel.max() + 1), 0.0, 1.0)
      weight = 1.0 - state[parcel]
    elif how == "mosaic":
      weight = (rng.random(parcel.max() + 1) < 0.5)[parcel].astype(np.float32)
    else:  # blocks: streets along the cuts, each roof its own brightness and orientation (S1 double bounce)
      weight = (edge < round(2 * unit)).astype(np.float32)  # none in a thumbnail: a 20 m street < 1 pixel
      texture = texture * rng.uniform(0.75, 1.3, parcel.max() + 1)[parcel]
  weight = weight.astype(np.float32)[..., None]
  s2 = (_S2[a] * (1.0 - weight) + _S2[b] * weight) * texture[..., None]
  s1 = _S1[a] * (1.0 - weight) + _S1[b] * weight + (6.0 * np.log10(texture))[..., None]
  if how == "blocks":
    s1 = s1 + rng.normal(0.0, 3.0, parcel.max() + 1)[parcel][..., None] * (1.0 - weight)
  return s2.astype(np.float32), s1.astype(np.float32)


def _render_scene(rng, shape, unit, season):
  """-> (IGBP map uint16 [H, W], S2 reflectance [H, W, 13], S1 dB [H, W, 2]) of one scene."""
  biome = rng.choice(sorted(_BIOMES))
  classes = list(_BIOMES[biome]) + ([15] if biome == "boreal" and season == "winter" else [])
  classes = list(rng.choice(classes, size=rng.integers(3, min(5, len(classes)) + 1), replace=False))
  weights = rng.dirichlet(np.full(len(classes), 2.0))
  rough = 0.25 * _field(rng, shape, 16 * unit)
  score = [_field(rng, shape, 0.5 * _REAL_SIZE * unit) + rough + np.log(w * len(classes)) for w in weights]
  region = np.argmax(np.stack(score), axis=0)
  igbp = np.asarray(classes, np.uint16)[region]
  s2 = np.zeros(shape + (len(sen12ms.S2_BANDS),), np.float32)
  s1 = np.zeros(shape + (len(sen12ms.S1_BANDS),), np.float32)
  for i, value in enumerate(classes):
    class_s2, class_s1 = _render_class(int(value), rng, shape, unit, _GREENNESS[season])
    s2 = np.where((region == i)[..., None], class_s2, s2)
    s1 = np.where((region == i)[..., None], class_s1, s1)
  return igbp, s2, s1


def s2_acquisition(reflectance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Sun and season (a gain), atmosphere (a smooth spectral tilt, small band gains), haze (a blue-heavy, uneven,
  contrast-lowering veil) and sensor noise: what differs between two Sentinel-2 looks at the same ground."""
  tilt = rng.normal(0.0, 0.15) * np.log(_WAVELENGTH_UM / 0.665)
  gain = np.exp(rng.normal(0.0, 0.12) + tilt + rng.normal(0.0, 0.03, len(_WAVELENGTH_UM))).astype(np.float32)
  haze = rng.uniform(0.0, 0.04) if rng.random() < 0.5 else 0.0
  veil = np.clip(1.0 + 0.6 * _field(rng, reflectance.shape[:2], reflectance.shape[0] / 2), 0.2, 2.0)[..., None] * haze
  shape = ((0.443 / _WAVELENGTH_UM) ** 1.5).astype(np.float32)
  reflectance = reflectance * gain * (1.0 - 2.0 * veil) + veil * shape
  return reflectance + rng.uniform(0.002, 0.006) * rng.standard_normal(reflectance.shape, dtype=np.float32)


def s1_acquisition(sigma0_db: np.ndarray, rng: np.random.Generator, looks: float = 4.4) -> np.ndarray:
  """Calibration offset, an incidence-angle gradient across the swath (columns) and multiplicative speckle of a
  multi-looked GRD product (gamma, `looks` equivalent looks: IW GRD high resolution has about 4.4)."""
  width = sigma0_db.shape[1]
  offset = rng.normal(0.0, 0.7) + rng.normal(0.0, 0.3, sigma0_db.shape[-1])
  gradient = rng.normal(0.0, 1.0) * (np.arange(width) / max(width - 1, 1) - 0.5)
  db = sigma0_db + offset + gradient[None, :, None]
  speckle = rng.standard_gamma(looks, db.shape, dtype=np.float32) / looks
  return (db + 10.0 * np.log10(speckle)).astype(np.float32)


def _write_patch(root, season, scene, patch, window, crs, transform, rng):
  igbp, s2, s1 = window
  name = f"{season}_s2_{scene}_p{patch}.tif"
  path = lambda sensor: sen12ms.sensor_path(root, name, sensor)
  for sensor in ("s1", "s2", "lc"):
    os.makedirs(os.path.dirname(path(sensor)), exist_ok=True)
  dn = np.clip(np.round(s2_acquisition(s2, rng) * 10000.0), 1, 65535).astype(np.uint16)
  write_geotiff(path("s2"), np.moveaxis(dn, -1, 0), crs=crs, transform=transform)
  write_geotiff(path("s1"), np.moveaxis(s1_acquisition(s1, rng), -1, 0), crs=crs, transform=transform)
  lc = np.concatenate([igbp[None], np.moveaxis(_LCCS[igbp], -1, 0)])
  write_geotiff(path("lc"), lc, crs=crs, transform=transform)
  return name


def write_synthetic_sen12ms(
  directory: str | os.PathLike, num_scenes: int, patches_per_scene: int, *, patch_size: int = 256, seed: int = 0
) -> str:
  """Writes (once; later calls with the same arguments reuse it) a SEN12MS-layout dataset; returns its root.

  The root holds the season folders and the split lists: `train_list.{txt,pkl}` (scenes not held out, in random
  order like the seed's subset lists, so the last-20% validation spans seasons), `test_list.{txt,pkl}` (held-out
  scenes, about a fifth, sorted like the real one), `train_list_small.pkl` (a random quarter of the train list,
  the analogue of the seed's train_list_1024.pkl) and `SEN12MS_holdOutScenes.txt`. Pickles hold numpy.str_ as
  the seed's do. Written to a temporary folder and renamed into place, so concurrent writers never see half.
  """
  if num_scenes < 2 or patches_per_scene < 1 or patch_size < 8:
    raise ValueError(
      f"synthetic SEN12MS: expected data.synthetic_num_scenes >= 2 (train and held-out test scenes), "
      f"data.synthetic_patches_per_scene >= 1 and data.synthetic_patch_size >= 8, got {num_scenes}, "
      f"{patches_per_scene}, {patch_size}"
    )

  def write(staging):
    rng = np.random.default_rng(seed)
    unit, stride = patch_size / _REAL_SIZE, patch_size // 2
    cols = int(np.ceil(np.sqrt(patches_per_scene)))
    rows = int(np.ceil(patches_per_scene / cols))
    shape = ((rows - 1) * stride + patch_size, (cols - 1) * stride + patch_size)
    pixel_m = 10.0 * _REAL_SIZE / patch_size
    per_season = -(-num_scenes // 4)
    scene_ids = {s: sorted(rng.choice(150 + num_scenes, size=per_season, replace=False) + 1) for s in sen12ms.SEASONS}
    num_test = max(1, round(0.2 * num_scenes))
    train, test, holdout = [], [], []
    for i in range(num_scenes):
      season, scene = sen12ms.SEASONS[i % 4], int(scene_ids[sen12ms.SEASONS[i % 4]][i // 4])
      scene_rng = np.random.default_rng((seed, i))  # scenes do not shift when other settings change
      igbp, s2, s1 = _render_scene(scene_rng, shape, unit, season.split("_")[1])
      zone = int(scene_rng.integers(1, 61))
      crs = f"EPSG:{(32600 if scene_rng.random() < 0.75 else 32700) + zone}"
      x0, y0 = scene_rng.uniform(2e5, 7e5), scene_rng.uniform(1e6, 9e6)
      names = []
      for k in range(patches_per_scene):
        r, c = divmod(k, cols)
        window = tuple(
          a[r * stride : r * stride + patch_size, c * stride : c * stride + patch_size] for a in (igbp, s2, s1)
        )
        transform = Affine(pixel_m, 0.0, x0 + c * stride * pixel_m, 0.0, -pixel_m, y0 - r * stride * pixel_m)
        names.append(_write_patch(staging, season, scene, k + 1, window, crs, transform, scene_rng))
      held_out = i >= num_scenes - num_test
      (test if held_out else train).extend(names)
      if held_out:
        holdout.append(f"{season}/s1_{scene}")
    train = [train[j] for j in rng.permutation(len(train))]
    small = [train[j] for j in rng.permutation(len(train))[: max(min(8, len(train)), len(train) // 4)]]
    for stem, names in (("train_list", train), ("test_list", sorted(test))):
      with open(os.path.join(staging, f"{stem}.txt"), "w") as f:
        f.write("".join(f"{n}\n" for n in names))
    for stem, names in (("train_list", train), ("test_list", sorted(test)), ("train_list_small", small)):
      with open(os.path.join(staging, f"{stem}.pkl"), "wb") as f:
        pickle.dump([np.str_(n) for n in names], f)
    with open(os.path.join(staging, "SEN12MS_holdOutScenes.txt"), "w") as f:
      f.write("".join(f"{h}\n" for h in holdout))
    return json.dumps(
      {"version": _FORMAT_VERSION, "scenes": num_scenes, "patches": len(train) + len(test), "seed": seed}
    )

  folder = f"sen12ms_v{_FORMAT_VERSION}_{num_scenes}x{patches_per_scene}_px{patch_size}_seed{seed}"
  return write_once(directory, folder, write, marker="COMPLETE")
