"""On-device augmentation as pure JAX, run on the accelerator inside the jitted training step, for any band count.

Three entry points share one set of operations (crop, flips, colour, blur, solarise):
  multicrop            DINO's global + local crops, normalised (facebookresearch/dino `DataAugmentationDINO`)
  views                N independent views from a recipe (MoCo-v2, the seed's sensor-pair sets), not normalised
  segmentation_views   one view of each image and its class mask, geometrically identical (crop, quarter turns,
                       small rotations, flips), colour on the image only

The host ships raw patches in their own units (RGB in [0, 1], reflectance / 10000, S2 digital numbers, S1 dB);
every random choice is drawn here from an explicit key, one key per sample and per view, so a batch is
reproducible from the step key alone and the work vmaps with no Python loop over samples. Recipes and aug
configs are read at trace time: sizes, ranges and strengths are static, probabilities may be traced.

Rooms: ops.py (the shared operations: config reading and checks, PIL-style resizing and crop boxes, colour for any
band count, blur), selfsup.py (multicrop, views and their recipes moco_v2 / sensor_pair_set; normalize and
center_resize for evaluation), segmentation.py (segmentation_views and its recipes landcoverai / robosat).
Callers reach the entry points through this package (`augment.multicrop(...)`), so a stand-in set on it (or on
a caller's `augment` name) is what they call.
"""

from jaxgeo.data.augment.ops import AUTO
from jaxgeo.data.augment.segmentation import landcoverai, robosat, segmentation_views
from jaxgeo.data.augment.selfsup import center_resize, moco_v2, multicrop, normalize, sensor_pair_set, views

__all__ = [
  "AUTO",
  "center_resize",
  "landcoverai",
  "moco_v2",
  "multicrop",
  "normalize",
  "robosat",
  "segmentation_views",
  "sensor_pair_set",
  "views",
]
