"""Polygons of chosen classes of a class map, as RFC 7946 GeoJSON in WGS84 (longitude, latitude).

GDAL's polygonize (rasterio.features.shapes) streams over the map row by row: it reads the working raster whose
band 1 is class id + 1 where the pixel's class was chosen (0 elsewhere, also nodata) and band 2 the winning class's
probability (uint8, / 254). Each polygon then gets:
  simplified   Douglas-Peucker on every ring, tolerance in pixels (turns pixel staircases into straight edges;
               a ring that would collapse keeps its pixel outline)
  reprojected  pixel corners -> the scene's CRS (its affine) -> EPSG:4326 with rasterio.warp.transform (a batch at a time)
  properties   class (name), class_id, score (mean probability of its class over its pixels), pixels, area_m2
               (on the sphere of radius 6378137 m from the WGS84 ring, as Mapbox's geojson-area: within about
               0.5 % of the ellipsoidal area)
and polygons under `min_area` m^2 are dropped. Features are written as they come, so memory holds one batch.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

EARTH_RADIUS = 6378137.0


def _douglas_peucker(points: np.ndarray, tolerance: float) -> np.ndarray:
  """The points of an open polyline [n, 2] that Douglas-Peucker keeps (both ends always)."""
  keep = np.zeros(len(points), bool)
  keep[[0, -1]] = True
  stack = [(0, len(points) - 1)]
  while stack:
    first, last = stack.pop()
    if last <= first + 1:
      continue
    chord, offsets = points[last] - points[first], points[first + 1 : last] - points[first]
    length = math.hypot(*chord)
    if length > 0:
      distance = np.abs(chord[0] * offsets[:, 1] - chord[1] * offsets[:, 0]) / length
    else:
      distance = np.hypot(offsets[:, 0], offsets[:, 1])
    worst = int(np.argmax(distance))
    if distance[worst] > tolerance:
      middle = first + 1 + worst
      keep[middle] = True
      stack += [(first, middle), (middle, last)]
  return points[keep]


def simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
  """A closed ring [n, 2] (first point repeated last) simplified, split at the point farthest from its first
  point; the ring itself when fewer than 3 distinct points would remain."""
  if tolerance <= 0 or len(ring) <= 4:
    return ring
  far = int(np.argmax(np.hypot(*(ring[:-1] - ring[0]).T)))
  halves = [_douglas_peucker(ring[: far + 1], tolerance), _douglas_peucker(ring[far:], tolerance)]
  simplified = np.concatenate([halves[0], halves[1][1:]])
  return simplified if len(simplified) >= 4 else ring


def ring_area_m2(lonlat: np.ndarray) -> float:
  """Area in m^2 enclosed by a closed WGS84 ring [n, 2] (degrees), on the sphere (see the module docstring)."""
  lon, lat = np.radians(lonlat[:-1, 0]), np.radians(lonlat[:-1, 1])
  if len(lon) < 3:
    return 0.0
  total = np.sum((np.roll(lon, -1) - np.roll(lon, 1)) * np.sin(lat))
  return abs(float(total)) * EARTH_RADIUS**2 / 2


def _affine(transform, points: np.ndarray) -> np.ndarray:
  """points [n, 2] (x, y) through an affine transform."""
  a, b, c, d, e, f = transform[:6]
  return np.stack([a * points[:, 0] + b * points[:, 1] + c, d * points[:, 0] + e * points[:, 1] + f], axis=-1)


def _counter_clockwise(ring: np.ndarray, exterior: bool) -> np.ndarray:
  """RFC 7946's right-hand rule: exterior rings counter-clockwise, holes clockwise (planar shoelace sign)."""
  x, y = ring[:, 0], ring[:, 1]
  positive = np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0
  return ring if positive == exterior else ring[::-1]


def pixels_inside(rings, top: int, left: int, height: int, width: int) -> np.ndarray:
  """bool [height, width]: the pixels of the window at (top, left) whose centres lie inside the rings (even-odd
  rule, holes included) of a polygon traced along pixel edges (integer vertices, horizontal / vertical edges)."""
  toggles = np.zeros((height, width + 1), np.int32)
  for ring in rings:
    start, end = ring[:-1], ring[1:]
    vertical = start[:, 0] == end[:, 0]
    x = start[vertical, 0].astype(np.int64) - left
    low = np.minimum(start[vertical, 1], end[vertical, 1]).astype(np.int64) - top
    high = np.maximum(start[vertical, 1], end[vertical, 1]).astype(np.int64) - top
    spans = high - low
    rows = np.repeat(low, spans) + (np.arange(spans.sum()) - np.repeat(np.cumsum(spans) - spans, spans))
    np.add.at(toggles, (rows, np.repeat(x, spans)), 1)  # every pixel right of a crossed edge flips
  return np.cumsum(toggles, axis=1)[:, :width] % 2 == 1


def _features_of(batch, src, class_names, simplify, min_area):
  """GeoJSON features of a batch of (pixel rings, value) polygons: one reprojection call for all of them."""
  import rasterio.warp

  scored, projected = [], []
  for rings, value in batch:
    (c0, r0), (c1, r1) = rings[0].min(0).astype(int), rings[0].max(0).astype(int)
    inside = pixels_inside(rings, r0, c0, r1 - r0, c1 - c0)
    confidence = src.read(2, window=((r0, r1), (c0, c1)))[inside]
    rings = [simplify_ring(ring, simplify) for ring in rings]
    projected += [_affine(src.transform, ring) for ring in rings]
    scored.append((len(rings), int(value) - 1, confidence))
  flat = np.concatenate(projected)
  lon, lat = rasterio.warp.transform(src.crs, "EPSG:4326", flat[:, 0], flat[:, 1])
  lonlat = np.split(np.stack([lon, lat], axis=-1), np.cumsum([len(ring) for ring in projected])[:-1])
  start = 0
  for count, class_id, confidence in scored:
    rings, start = lonlat[start : start + count], start + count
    area = ring_area_m2(rings[0]) - sum(ring_area_m2(hole) for hole in rings[1:])
    if area < min_area:
      continue
    rings = [_counter_clockwise(ring, i == 0) for i, ring in enumerate(rings)]
    yield {
      "type": "Feature",
      "geometry": {"type": "Polygon", "coordinates": [np.round(ring, 8).tolist() for ring in rings]},
      "properties": {
        "class": str(class_names[class_id]),
        "class_id": class_id,
        "score": round(float(confidence.mean()) / 254, 4),
        "pixels": int(confidence.size),
        "area_m2": round(area, 2),
      },
    }


def polygon_features(
  source_path: str,
  class_names,
  *,
  simplify: float = 1.0,
  min_area: float = 0.0,
  connectivity: int = 4,
  batch: int = 512,
):
  """Yields GeoJSON features (dicts) of the polygons of the working raster at `source_path` (module docstring)."""
  import rasterio
  import rasterio.features

  with rasterio.open(source_path) as src:
    if src.crs is None:
      raise ValueError(f"{source_path}: the scene has no CRS, so its polygons cannot be placed in WGS84")
    selected, to_pixels, pending = rasterio.band(src, 1), ~src.transform, []
    for geometry, value in rasterio.features.shapes(selected, mask=selected, connectivity=connectivity):
      # GDAL places the polygons with the raster's transform; back to pixel corners (integers)
      rings = [np.rint(_affine(to_pixels, np.asarray(ring, np.float64))) for ring in geometry["coordinates"]]
      pending.append((rings, value))
      if len(pending) == batch:
        yield from _features_of(pending, src, class_names, simplify, min_area)
        pending = []
    if pending:
      yield from _features_of(pending, src, class_names, simplify, min_area)


def write_geojson(path: str, features, name: str | None = None) -> int:
  """Streams features into a FeatureCollection at `path` (via `<path>.partial`); returns how many."""
  partial, count = path + ".partial", 0
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(partial, "w") as f:
    f.write('{"type": "FeatureCollection",' + (f' "name": {json.dumps(name)},' if name else "") + ' "features": [\n')
    for feature in features:
      f.write((",\n" if count else "") + json.dumps(feature, separators=(",", ":")))
      count += 1
    f.write("\n]}\n")
  os.replace(partial, path)
  return count
