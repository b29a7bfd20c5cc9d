"""Whole-scene and slippy-tile prediction: window grid and blending, georeferencing and nodata, the COG layout,
bounded memory, RoboSat's neighbour buffer, polygons in WGS84, and a trained smoke run predicted end to end."""

import json
import math
import os
import sys
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
import rasterio.warp
from affine import Affine
from PIL import Image

from jaxgeo.data import synthetic_aerial
from jaxgeo.data.geotiff import write_geotiff
from jaxgeo.predict import Options, Predictor, blend, cog_problems, make_forward, predict_scene, prediction_mesh, slippy
from jaxgeo.predict import __main__ as cli
from jaxgeo.train import loop

RGB = ("red", "green", "blue")


def _predictor(apply, params=None, classes=2, window=64, bands=RGB, multiple=1):
  return Predictor(
    apply=apply,
    params=params if params is not None else {"unused": jnp.zeros(())},
    bands=bands,
    mean=(0.0,) * len(bands),
    std=(1.0,) * len(bands),
    image_scale=None,
    class_names=tuple(f"class{i}" for i in range(classes)),
    class_colors=tuple((40 * i, 255 - 40 * i, 0) for i in range(classes)),
    window=window,
    where="<test model>",
    multiple=multiple,
  )


def threshold_model(margin=20.0):
  """Logits: a one-hot of red > 0.5 (times margin): a perfect pointwise model, equivariant under flips / turns."""

  def apply(params, images):
    building = (images[..., 0] > 0.5).astype(jnp.float32)
    return margin * jnp.stack([1 - building, building], axis=-1)

  return apply


def constant_model(logits):
  return lambda params, images: jnp.broadcast_to(jnp.asarray(logits, jnp.float32), images.shape[:3] + (len(logits),))


@pytest.fixture(scope="module")
def mesh():
  return prediction_mesh()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
  """A 560 x 640 UTM scene at 0.5 m with its nodata wedge on the right (over 512 px: the COG has an overview)."""
  image, mask = synthetic_aerial.write_synthetic_scene(tmp_path_factory.mktemp("scene"), height=560, width=640, gsd=0.5)
  return image, mask


def _run(predictor, mesh, path, out, tta=False, **options):
  forward = make_forward(predictor, mesh, tta=tta)
  options = Options(**{"progress": False, "preview": False, **options})
  return predict_scene(predictor, forward, path, str(out), options, device_count=mesh.size)


def _read(path, band=1):
  with rasterio.open(path) as src:
    return src.read(band), src.profile, src.dataset_mask() > 0


# ---------------------------------------------------------------------------------------------------------------
# The window grid and its weights
# ---------------------------------------------------------------------------------------------------------------


def test_window_grid_and_weights_cover_the_scene_without_seams_or_frame():
  assert blend.window_starts(100, 64, 16) == [0, 36]  # the last window pulled back inside, no overhang
  assert blend.window_starts(50, 64, 16) == [0]
  assert blend.window_starts(64 + 48 * 3, 64, 16) == [0, 48, 96, 144]
  with pytest.raises(ValueError, match="overlap"):
    blend.window_starts(100, 64, 64)
  grid = blend.Grid(height=173, width=200, size=64, overlap=16)
  total = np.zeros((grid.height, grid.width))
  for row in grid.rows:
    for col in grid.cols:
      weights = grid.weights(row, col)
      total[row : row + weights.shape[0], col : col + weights.shape[1]] += weights
      assert weights.min() > 0
  # Full weight along the scene's border (no dark frame), and complementary ramps over every regular overlap:
  # the weights of the windows covering a pixel sum to exactly 1 wherever two windows meet at the nominal stride
  # (everywhere before the last windows, which are pulled back inside the scene and overlap more).
  assert np.all(total[0] >= 1 - 1e-6) and np.all(total[:, 0] >= 1 - 1e-6) and np.all(total[-1] >= 1 - 1e-6)
  assert grid.cols[-1] - grid.cols[-2] < 48 and total[:, grid.cols[-1] :].max() > 1.5
  np.testing.assert_allclose(total[: grid.rows[-1], : grid.cols[-1]], 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------


def test_constant_model_gives_a_constant_map_keeping_georeferencing_nodata_and_cog_layout(scene, mesh, tmp_path):
  image, truth = scene
  logits = np.log([0.2, 0.7, 0.1])
  result = _run(_predictor(constant_model(logits), classes=3), mesh, image, tmp_path / "map.tif", probabilities=True)
  classes, profile, _ = _read(result["classes"])
  with rasterio.open(image) as src:
    valid, crs, transform, shape = src.dataset_mask() > 0, src.crs, src.transform, src.shape
  assert (profile["crs"], profile["transform"], (profile["height"], profile["width"])) == (crs, transform, shape)
  np.testing.assert_array_equal(valid, _read(truth)[0] != 255)  # the wedge really is nodata in the input
  np.testing.assert_array_equal(classes, np.where(valid, 1, 255))  # constant, and nodata kept as nodata
  with rasterio.open(result["probabilities"]) as src:
    probabilities = src.read()
    assert src.descriptions == ("p(class0)", "p(class1)", "p(class2)") and src.nodata == 255
  expected = np.rint(np.array([0.2, 0.7, 0.1]) * 254).astype(np.uint8)
  # No seam, no border fall-off: every valid pixel holds exactly the model's probabilities.
  np.testing.assert_array_equal(probabilities[:, valid], np.repeat(expected[:, None], valid.sum(), axis=1))
  assert (probabilities[:, ~valid] == 255).all()
  for path in (result["classes"], result["probabilities"]):
    assert cog_problems(path) == []
    with rasterio.open(path) as src:
      assert src.overviews(1) == [2] and src.profile["tiled"] and src.compression.name == "deflate"
  with rasterio.open(result["classes"]) as src:
    assert src.colormap(1)[1] == (40, 215, 0, 255) and json.loads(src.tags()["class_names"])[2] == "class2"
  # The check finds a plain GeoTIFF is not a COG.
  plain = tmp_path / "plain.tif"
  write_geotiff(plain, np.zeros((600, 600), np.uint8), crs="EPSG:32634", transform=Affine(1, 0, 500000, 0, -1, 5800000))
  problems = cog_problems(str(plain))
  assert any("LAYOUT=COG" in p for p in problems) and any("not tiled" in p for p in problems)


@pytest.mark.parametrize("tta", [False, True])
def test_pointwise_model_reproduces_its_input_exactly_across_window_borders(scene, mesh, tmp_path, tta):
  image, _ = scene
  predictor = _predictor(threshold_model())
  result = _run(predictor, mesh, image, tmp_path / "map.tif", tta=tta, window=64, overlap=23, batch_size=5)
  classes, _, _ = _read(result["classes"])
  with rasterio.open(image) as src:
    red, valid = src.read(1), src.dataset_mask() > 0
  np.testing.assert_array_equal(classes, np.where(valid, red / 255 > 0.5, 255))
  assert result["windows"] == len(blend.Grid(560, 640, 64, 23)) == 14 * 16
  # A scene smaller than a window is one reflected-padded window.
  small = tmp_path / "small.tif"
  pixels = np.random.default_rng(0).integers(1, 256, (3, 40, 50), dtype=np.uint8)
  write_geotiff(small, pixels, crs="EPSG:32634", transform=Affine(0.5, 0, 500000, 0, -0.5, 5800000))
  result = _run(predictor, mesh, str(small), tmp_path / "small_map.tif", tta=tta, window=64)
  np.testing.assert_array_equal(_read(result["classes"])[0], pixels[0] / 255 > 0.5)


def test_memory_stays_within_the_budget_on_a_scene_larger_than_it(mesh, tmp_path):
  height, width = 200, 1400
  pixels = np.random.default_rng(1).integers(1, 256, (3, height, width), dtype=np.uint8)
  path = tmp_path / "wide.tif"
  write_geotiff(path, pixels, crs="EPSG:32634", transform=Affine(0.5, 0, 500000, 0, -0.5, 5800000))
  predictor = _predictor(threshold_model(margin=2.0), window=64)
  budget_mb = 0.6
  full_width_band = 64 * width * (2 + 1) * 4  # the score band of one strip as wide as the scene
  assert full_width_band > budget_mb * 2**20
  _run(predictor, mesh, str(path), tmp_path / "warmup.tif", window=64, max_memory_mb=100)  # compile outside
  tracemalloc.start()
  bounded = _run(predictor, mesh, str(path), tmp_path / "bounded.tif", window=64, max_memory_mb=budget_mb)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  unbounded = _run(predictor, mesh, str(path), tmp_path / "unbounded.tif", window=64, max_memory_mb=100)
  assert bounded["strips"] > 1 and unbounded["strips"] == 1
  assert bounded["buffer_bytes"] <= budget_mb * 2**20 < unbounded["buffer_bytes"]
  # Everything numpy held at once: the buffers plus one batch of windows in and of probabilities out.
  batch_bytes = 8 * 64 * 64 * (3 + 2 * 4) * 2
  assert peak < budget_mb * 2**20 + batch_bytes + 2**20, peak
  # Windows straddling a strip edge are computed for both strips: the same map as in one strip.
  assert bounded["windows_computed"] > unbounded["windows_computed"] == unbounded["windows"]
  np.testing.assert_array_equal(_read(bounded["classes"])[0], _read(unbounded["classes"])[0])
  with pytest.raises(ValueError, match="max-memory-mb=0.01 is too small"):
    _run(predictor, mesh, str(path), tmp_path / "tiny.tif", window=64, max_memory_mb=0.01)


def test_bands_are_matched_by_name_colour_or_given_and_mismatches_name_both(mesh, tmp_path):
  rng = np.random.default_rng(2)
  pixels = rng.integers(1, 256, (4, 40, 40), dtype=np.uint8)
  path = str(tmp_path / "four.tif")
  profile = dict(driver="GTiff", height=40, width=40, count=4, dtype="uint8", crs="EPSG:32634")
  profile["transform"] = Affine(0.5, 0, 500000, 0, -0.5, 5800000)
  predictor = _predictor(threshold_model(), window=32)
  # GDAL writes 4 bytes per pixel as RGBA by default: the alpha band is the mask, not a band for the model.
  rgba = str(tmp_path / "rgba.tif")
  with rasterio.open(rgba, "w", **profile) as dst:
    alpha = np.broadcast_to(np.where(np.arange(40) < 10, 0, 255).astype(np.uint8), (1, 40, 40))
    dst.write(np.concatenate([pixels[:3], alpha]))
  result = _run(predictor, mesh, rgba, tmp_path / "rgba_map.tif")
  np.testing.assert_array_equal(_read(result["classes"])[0], np.where(np.arange(40) < 10, 255, pixels[0] / 255 > 0.5))
  with rasterio.open(path, "w", photometric="MINISBLACK", **profile) as dst:  # red, green, blue, near infrared
    dst.write(pixels)
  with pytest.raises(ValueError, match=r"four.tif: the scene has 4 band\(s\).*<test model>.*3 band\(s\).*--bands"):
    _run(predictor, mesh, path, tmp_path / "a.tif")
  result = _run(predictor, mesh, path, tmp_path / "b.tif", bands=("3", "2", "1"))
  np.testing.assert_array_equal(_read(result["classes"])[0], pixels[2] / 255 > 0.5)
  with rasterio.open(path, "r+") as dst:
    for i, name in enumerate(("nir", "blue", "green", "red"), start=1):
      dst.set_band_description(i, name)
  result = _run(predictor, mesh, path, tmp_path / "c.tif")  # by name: red is band 4
  np.testing.assert_array_equal(_read(result["classes"])[0], pixels[3] / 255 > 0.5)
  deep = str(tmp_path / "uint16.tif")
  write_geotiff(
    deep, pixels[:3].astype(np.uint16) * 40, crs="EPSG:32634", transform=Affine(1, 0, 500000, 0, -1, 5800000)
  )
  with pytest.raises(ValueError, match=r"uint16.tif: uint16 pixels.*8-bit imagery.*--image-scale"):
    _run(predictor, mesh, deep, tmp_path / "d.tif")


def test_polygons_of_a_known_square_in_wgs84(mesh, tmp_path):
  gsd, left, top = 0.5, 500123.0, 5786000.0
  pixels = np.full((3, 120, 100), 40, np.uint8)
  pixels[0, 30:50, 20:40] = 250  # a 10 m x 10 m square of class 1
  pixels[0, 100:102, 80:82] = 250  # a 1 m^2 speck, under --min-area
  path = str(tmp_path / "square.tif")
  write_geotiff(path, pixels, crs="EPSG:32634", transform=Affine(gsd, 0, left, 0, -gsd, top))
  geojson = tmp_path / "square.geojson"
  probability = 0.9  # of the winning class: the polygon's score
  margin = math.log(probability / (1 - probability))
  result = _run(_predictor(threshold_model(margin)), mesh, path, tmp_path / "m.tif", polygons=str(geojson), min_area=2)
  collection = json.loads(geojson.read_text())
  assert result["polygon_count"] == len(collection["features"]) == 1
  (feature,) = collection["features"]
  properties = feature["properties"]
  assert (properties["class"], properties["class_id"], properties["pixels"]) == ("class1", 1, 400)
  assert properties["score"] == pytest.approx(probability, abs=1 / 254)
  # UTM's scale factor near zone 34's central meridian is ~0.9996: 100 m^2 on the grid is ~100.1 m^2 on the ground.
  assert properties["area_m2"] == pytest.approx(100.0, rel=0.006)
  (ring,) = feature["geometry"]["coordinates"]
  corners = [(left + gsd * c, top - gsd * r) for r, c in ((30, 20), (30, 40), (50, 40), (50, 20))]
  lon, lat = rasterio.warp.transform("EPSG:32634", "EPSG:4326", *map(list, zip(*corners)))
  assert len(ring) == 5 and ring[0] == ring[-1]
  found = sorted(tuple(p) for p in ring[:-1])
  np.testing.assert_allclose(found, sorted(zip(lon, lat)), atol=1e-7)
  shoelace = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]))
  assert shoelace > 0  # RFC 7946: exterior rings counter-clockwise


def test_output_naming_rule():
  rows = cli.scene_outputs(["a/x.tif", "b/y.tif"], "out", "")
  assert rows == [
    ("a/x.tif", "out/x_classes.tif", "out/x_classes.geojson"),
    ("b/y.tif", "out/y_classes.tif", "out/y_classes.geojson"),
  ]
  assert cli.scene_outputs(["a/x.tif"], "m.tif", "p.geojson") == [("a/x.tif", "m.tif", "p.geojson")]
  assert cli.scene_outputs(["a/x.tif"], "m.tif", "vec") == [("a/x.tif", "m.tif", "vec/x.geojson")]
  with pytest.raises(ValueError, match="is a file, but there are 2 inputs"):
    cli.scene_outputs(["a/x.tif", "b/y.tif"], "m.tif", None)
  with pytest.raises(ValueError, match="would write the same outputs"):
    cli.scene_outputs(["a/x.tif", "b/x.tif"], "out", None)
  with pytest.raises(ValueError, match="would overwrite the input"):
    cli.scene_outputs(["a/x.tif"], "a/x.tif", None)


# ---------------------------------------------------------------------------------------------------------------
# Slippy tiles
# ---------------------------------------------------------------------------------------------------------------


def test_slippy_buffer_takes_neighbours_and_mirrors_missing_ones(mesh, tmp_path):
  size, buffer, shift = 32, 8, 5
  rng = np.random.default_rng(3)
  mosaic = rng.integers(1, 256, (3 * size, 3 * size, 3), dtype=np.uint8)
  root = tmp_path / "tiles"
  present = {}
  for dy in range(3):
    for dx in range(3):
      if (dx, dy) == (0, 0):
        continue  # the top-left neighbour is missing
      key = (100 + dx, 200 + dy, 17)
      path = root / "17" / str(key[0]) / f"{key[1]}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(mosaic[dy * size : (dy + 1) * size, dx * size : (dx + 1) * size]).save(path)
      present[key] = str(path)
  read = slippy._TileReader(present, 3, capacity=4)
  composite = slippy.buffered_tile(read, (101, 201, 17), set(present), buffer)
  expected = mosaic[size - buffer : 2 * size + buffer, size - buffer : 2 * size + buffer].copy()
  centre = mosaic[size : 2 * size, size : 2 * size]
  expected[:buffer, :buffer] = np.pad(centre, ((buffer, 0), (buffer, 0), (0, 0)), mode="reflect")[:buffer, :buffer]
  np.testing.assert_array_equal(composite, expected)
  # The top-left tile has neighbours to its right and below only: mirrored margins elsewhere.
  corner = slippy.buffered_tile(read, (101, 200, 17), set(present), buffer)
  top_middle = mosaic[:size, size : 2 * size]
  np.testing.assert_array_equal(
    corner[:buffer, buffer:-buffer], np.pad(top_middle, ((buffer, 0), (0, 0), (0, 0)), mode="reflect")[:buffer]
  )
  np.testing.assert_array_equal(corner[buffer:-buffer, -buffer:], mosaic[:size, 2 * size : 2 * size + buffer])

  # A model that looks `shift` pixels to the left: its mask at a tile's left edge comes from the neighbour.
  def look_left(params, images):
    red = jnp.roll(images[..., 0], shift, axis=2)
    return 20.0 * jnp.stack([red <= 0.5, red > 0.5], axis=-1).astype(jnp.float32)

  predictor = _predictor(look_left, window=size)
  out = tmp_path / "masks"
  result = slippy.predict_tiles(
    predictor,
    make_forward(predictor, mesh),
    str(root),
    str(out),
    buffer=buffer,
    batch_size=3,
    device_count=mesh.size,
    progress=False,
  )
  assert result["tiles"] == 8 and os.path.isfile(result["preview"])
  with Image.open(out / "17" / "101" / "201.png") as mask:
    assert mask.mode == "P" and mask.getpalette()[3:6] == [40, 215, 0]
    got = np.asarray(mask)
  shifted = np.roll(mosaic[..., 0], shift, axis=1)[size : 2 * size, size : 2 * size]
  np.testing.assert_array_equal(got, shifted / 255 > 0.5)


# ---------------------------------------------------------------------------------------------------------------
# End to end: configs/segment_tiles.py:smoke trained on synthetic slippy tiles, then the CLI on a new scene
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiles_run(tmp_path_factory):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
  import segment_tiles

  from jaxgeo.train import segment

  config = segment_tiles.get_config("smoke")
  config.data.synthetic_dir = str(tmp_path_factory.mktemp("synthetic_tiles"))
  config.lock()
  workdir = str(tmp_path_factory.mktemp("tiles_smoke"))
  assert loop.run(config, workdir, segment.make_task) == "done"
  return workdir


def test_trained_tiles_run_predicts_a_scene_to_cog_geojson_and_preview(tiles_run, scene, tmp_path, capsys):
  image, _ = scene
  out = tmp_path / "buildings.tif"
  argv = [f"--checkpoint={tiles_run}", f"--input={image}", f"--out={out}", "--polygons", "--polygon-classes=building"]
  assert cli.main(argv + ["--quiet", "--max_memory_mb=64"]) == 0
  assert "windows/s" in capsys.readouterr().out
  assert cog_problems(str(out)) == []
  classes, profile, _ = _read(out)
  with rasterio.open(image) as src:
    assert (profile["crs"], profile["transform"]) == (src.crs, src.transform)
    np.testing.assert_array_equal(classes == 255, src.dataset_mask() == 0)
  assert set(np.unique(classes)) <= {0, 1, 255}
  collection = json.loads((tmp_path / "buildings.geojson").read_text())
  assert collection["type"] == "FeatureCollection"
  assert all(f["properties"]["class"] == "building" for f in collection["features"])
  with Image.open(tmp_path / "buildings_preview.png") as preview:
    assert preview.size[0] > 400
  # The same weights as a PyTorch file (bridge's export names) give the same map, with the run's input statistics.
  from jaxgeo.bridge import save_state_dict, segmentation_to_torch
  from jaxgeo.train import segment

  model, params, info = segment.load_run(tiles_run)
  pth = tmp_path / "buildings.pth"
  save_state_dict(segmentation_to_torch(params, window_size=model.window_size), pth)
  mean, std = (",".join(str(float(v)) for v in info["input_stats"][k]) for k in ("mean", "std"))
  torch_out = tmp_path / "torch.tif"
  argv = [f"--checkpoint={pth}", f"--input={image}", f"--out={torch_out}", f"--mean={mean}", f"--std={std}"]
  assert cli.main(argv + ["--class-names=background,building", "--window=256", "--no-preview", "--quiet"]) == 0
  np.testing.assert_array_equal(_read(torch_out)[0], classes)
  # Errors name the option and what was expected, without a traceback.
  assert cli.main([f"--checkpoint={tiles_run}", f"--input={image}", "--out=x.tif", "--num-classes=3"]) == 2
  assert "is a jaxgeo run" in capsys.readouterr().err
