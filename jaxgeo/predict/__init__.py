"""Segmentation of new imagery with a trained model: whole GeoTIFF scenes into Cloud-Optimised GeoTIFFs and
polygons, or slippy-map tile folders into RoboSat-style masks.

  python -m jaxgeo.predict --checkpoint=RUN_DIR --input=scene.tif --out=map.tif [--polygons] [--probabilities]
  python -m jaxgeo.predict --checkpoint=RUN_DIR --tiles=tiles/ --out=masks/

Library use (the CLI in __main__.py is a thin layer over these):

  predictor = model.load_predictor(checkpoint)              # a jaxgeo run folder or a PyTorch file
  forward = model.make_forward(predictor, model.prediction_mesh(), tta=False)
  scene.predict_scene(predictor, forward, "scene.tif", "map.tif", scene.Options(...), device_count)
  slippy.predict_tiles(predictor, forward, "tiles/", "masks/", buffer=32, ...)

Rooms: model.py (Predictor: weights + input contract; the jitted, sharded forward with D4 test-time augmentation),
bands.py (scene bands and scaling as in training), blend.py (window grid, seamless weights, the band of rows that
bounds memory), batches.py (device batches, progress), scene.py (a scene end to end), writers.py (COG, masks,
previews, the COG check), vector.py (polygons in WGS84), slippy.py (buffered tile prediction).
"""

from jaxgeo.predict.model import Predictor, load_predictor, make_forward, prediction_mesh
from jaxgeo.predict.scene import Options, predict_scene
from jaxgeo.predict.slippy import predict_tiles
from jaxgeo.predict.writers import cog_problems

__all__ = [
  "Options",
  "Predictor",
  "cog_problems",
  "load_predictor",
  "make_forward",
  "predict_scene",
  "predict_tiles",
  "prediction_mesh",
]
