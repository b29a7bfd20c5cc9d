"""Joint image + mask views for segmentation: `segmentation_views` gives one view of each image and its class
mask, geometrically identical (crop, quarter turns, small rotations, flips), colour on the image only; its
recipes are `landcoverai` (TorchGeo's LandCover.ai training augmentation, made label-safe) and `robosat`.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from jaxgeo.data.augment.ops import (
  _KERNELS,
  _batch_of_images,
  _check_colour,
  _check_scale,
  _clip,
  _color_jitter,
  _crop_box,
  _image_batch,
  _may_happen,
  _nearest_source,
  _read_fields,
  _resample,
  _resize_weights,
  _resolve_clip,
  _shard_like_batch,
)

_WHERE = "jaxgeo/data/augment/segmentation.py"
_SEGMENTATION_FIELDS = tuple(
  "scale ratio interpolation flip_p vflip_p rot90_p rotate_p rotate_degrees jitter jitter_p clip rgb".split()
)
_MAX_ROTATE_DEGREES = 45.0  # beyond this a quarter turn plus a smaller angle does the same with less fill


def _segmentation_settings(recipe, channels, size):
  cfg = _read_fields(recipe, _SEGMENTATION_FIELDS, "recipe")
  cfg["rgb"] = bool(cfg["rgb"])
  _check_colour(cfg, channels, "recipe")
  _check_scale(cfg["scale"], cfg["ratio"], "recipe")
  if cfg["interpolation"] not in _KERNELS:
    raise ValueError(f"{_WHERE}: recipe.interpolation must be one of {sorted(_KERNELS)}, got {cfg['interpolation']!r}")
  degrees = float(cfg["rotate_degrees"])
  if not 0.0 <= degrees <= _MAX_ROTATE_DEGREES:
    raise ValueError(
      f"{_WHERE}: recipe.rotate_degrees must be in [0, {_MAX_ROTATE_DEGREES:g}] (larger turns: rot90_p), got {degrees}"
    )
  rotates = degrees > 0.0 and _may_happen(cfg["rotate_p"])
  # The canvas reaches `margin` output pixels past the crop on every side: enough for the corners of a view
  # rotated by up to rotate_degrees, plus one for the bilinear neighbour.
  half = (size - 1) / 2
  theta = math.radians(degrees)
  margin = math.ceil(half * (math.cos(theta) + math.sin(theta)) - half) + 1 if rotates else 0
  cfg.update(
    clip=_resolve_clip(cfg["clip"], channels, "recipe"),
    ratio=tuple(cfg["ratio"]),
    scale=tuple(cfg["scale"]),
    jitter=tuple(float(v) for v in cfg["jitter"]),
    rotates=rotates,
    margin=margin,
  )
  return cfg


def _orient(size, canvas, flip, vflip, quarter, angle):
  """Where each output pixel reads the canvas: (rows, cols) [size, size] float.

  Offsets from the centre are flipped, turned by `quarter` quarter turns, then rotated by `angle` radians, as one
  2x2 matrix of per-sample scalars (arithmetic, not selects of arrays: under Explicit sharding a select between
  unbatched arrays on a batched flag loses the mesh). Quarter-turn entries are exactly 0 / +-1, so with angle 0
  every read is an exact canvas pixel.
  """
  flip_rows = 1.0 - 2.0 * jnp.asarray(vflip, jnp.float32)
  flip_cols = 1.0 - 2.0 * jnp.asarray(flip, jnp.float32)
  turn_cos = (quarter == 0).astype(jnp.float32) - (quarter == 2).astype(jnp.float32)
  turn_sin = (quarter == 1).astype(jnp.float32) - (quarter == 3).astype(jnp.float32)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # rotation(angle) @ quarter_turn @ diag(flip_rows, flip_cols), quarter_turn = [[c, s], [-s, c]].
  m00 = (cos * turn_cos + sin * turn_sin) * flip_rows
  m01 = (cos * turn_sin - sin * turn_cos) * flip_cols
  m10 = (sin * turn_cos - cos * turn_sin) * flip_rows
  m11 = (sin * turn_sin + cos * turn_cos) * flip_cols
  offsets = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  di, dj = offsets[:, None], offsets[None, :]
  centre = (canvas - 1) / 2
  return centre + m00 * di + m01 * dj, centre + m10 * di + m11 * dj


def _gather(values, rows, cols):
  """values [S, S, ...] at integer (rows, cols) [s, s] -> [s, s, ...]."""
  flat = values.reshape((-1,) + values.shape[2:])
  return jnp.take(flat, rows * values.shape[1] + cols, axis=0)


def _bilinear(image, rows, cols):
  """image [S, S, C] at fractional (rows, cols) [s, s], neighbours clamped to the canvas."""
  last = image.shape[0] - 1
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
  r1, c1 = jnp.clip(r0 + 1, 0, last), jnp.clip(c0 + 1, 0, last)
  r0, c0 = jnp.clip(r0, 0, last), jnp.clip(c0, 0, last)
  top = (1 - fc) * _gather(image, r0, c0) + fc * _gather(image, r0, c1)
  bottom = (1 - fc) * _gather(image, r1, c0) + fc * _gather(image, r1, c1)
  return (1 - fr) * top + fr * bottom


def _segmentation_view(key, image, mask, cfg, size, ignore_index):
  """One view of image [H, W, C] and mask [H, W] -> ([size, size, C], [size, size] int32).

  Two stages keep the crop antialiased and the mask exact: (1) the crop box, widened by a margin, is resampled
  to a canvas (separable PIL-style weights for the image, PIL NEAREST for the mask, canvas pixels whose centre
  lies outside the source marked); (2) the view reads the canvas through flips, quarter turns and a small
  rotation about its centre (bilinear for the image, nearest for the mask). Pixels that would come from outside
  the source are 0 in the image and `ignore_index` in the mask.
  """
  height, width, _ = image.shape
  margin = cfg["margin"]
  canvas = size + 2 * margin
  k_crop, k_jit, k_coins = jax.random.split(key, 3)
  u_flip, u_vflip, u_rot90, u_quarter, u_rotate, u_angle, u_jit = jax.random.uniform(k_coins, (7,))

  top, left, h, w = _crop_box(k_crop, height, width, cfg["scale"], cfg["ratio"])
  row_start, row_length = top - margin * h / size, h * canvas / size
  col_start, col_length = left - margin * w / size, w * canvas / size
  kernel = _KERNELS[cfg["interpolation"]]
  rows = _resize_weights(height, canvas, row_start, row_length, kernel=kernel)
  canvas_image = _resample(image, rows, _resize_weights(width, canvas, col_start, col_length, kernel=kernel))
  canvas_image = _clip(canvas_image, cfg["clip"])
  src_rows, rows_exist = _nearest_source(height, canvas, row_start, row_length)
  src_cols, cols_exist = _nearest_source(width, canvas, col_start, col_length)
  canvas_inside = rows_exist[:, None] & cols_exist[None, :]
  canvas_mask = _gather(mask, *jnp.meshgrid(src_rows, src_cols, indexing="ij"))

  quarter = jnp.where(u_rot90 < cfg["rot90_p"], 1 + jnp.floor(3 * u_quarter).astype(jnp.int32), 0)
  angle = 0.0
  if cfg["rotates"]:
    turn = math.radians(cfg["rotate_degrees"]) * (2.0 * u_angle - 1.0)
    angle = jnp.where(u_rotate < cfg["rotate_p"], turn, 0.0)
  read_rows, read_cols = _orient(size, canvas, u_flip < cfg["flip_p"], u_vflip < cfg["vflip_p"], quarter, angle)
  near_rows = jnp.floor(read_rows + 0.5).astype(jnp.int32)
  near_cols = jnp.floor(read_cols + 0.5).astype(jnp.int32)
  in_canvas = (near_rows >= 0) & (near_rows < canvas) & (near_cols >= 0) & (near_cols < canvas)
  near_rows, near_cols = jnp.clip(near_rows, 0, canvas - 1), jnp.clip(near_cols, 0, canvas - 1)
  inside = in_canvas & _gather(canvas_inside, near_rows, near_cols)
  out_mask = jnp.where(inside, _gather(canvas_mask, near_rows, near_cols), ignore_index)
  valid = inside[..., None]
  if cfg["rotates"]:
    # Interpolate over source pixels only (weights renormalised), so rotated edges do not fade into the fill.
    weight = canvas_inside[..., None].astype(jnp.float32)
    source_only = jnp.where(canvas_inside[..., None], canvas_image, 0.0)
    both = _bilinear(jnp.concatenate([source_only, weight], axis=-1), read_rows, read_cols)
    view = both[..., :-1] / jnp.maximum(both[..., -1:], 1e-6)  # the nearest source pixel weighs >= 1/4 here
  else:  # flips and quarter turns only: every read is an exact pixel
    view = _gather(canvas_image, near_rows, near_cols)
  view = jnp.where(valid, view, 0.0)

  if _may_happen(cfg["jitter_p"]):
    jittered = _color_jitter(k_jit, view, cfg["jitter"], cfg["rgb"], cfg["clip"], valid.astype(jnp.float32))
    view = jnp.where((u_jit < cfg["jitter_p"]) & valid, jittered, view)
  return view, out_mask


def segmentation_views(rng, images, masks, recipe, size, ignore_index):
  """Joint augmentation: (images [B, size, size, C] float32, masks [B, size, size] int32), NOT normalised.

  images [B, H, W, C] in their own units, masks [B, H, W] integer class ids. `recipe` has the fields of
  `landcoverai()`. Each sample gets its own key; crop box, flips, quarter turns and rotation are the same for a
  sample's image and mask (image: bilinear / bicubic, mask: nearest, so no new class values appear); colour
  jitter touches the image only. Where a rotated view reaches past the source the image is 0 and the mask
  `ignore_index`.
  """
  size = int(size)
  images = _image_batch(images, "segmentation_views")
  cfg = _segmentation_settings(recipe, images.shape[-1], size)
  images = _batch_of_images(images, "segmentation_views", cfg["clip"])
  masks = jnp.asarray(masks)
  if masks.shape != images.shape[:3]:
    raise ValueError(
      f"{_WHERE}: segmentation_views expects masks [B, H, W] matching images {images.shape}, got {masks.shape}"
    )
  if not jnp.issubdtype(masks.dtype, jnp.integer):
    raise ValueError(f"{_WHERE}: segmentation_views expects integer class-id masks, got dtype {masks.dtype}")
  keys = _shard_like_batch(jax.random.split(rng, images.shape[0]), images)
  masks = _shard_like_batch(masks.astype(jnp.int32), images)
  one = lambda k, img, m: _segmentation_view(k, img, m, cfg, size, int(ignore_index))
  return jax.vmap(one)(keys, images, masks)


def landcoverai(rgb=True, rotate_degrees=0.0):
  """TorchGeo's LandCover.ai training augmentation as a `segmentation_views` recipe, made label-safe.

  TorchGeo: RandomRotation(90, p 0.5), horizontal and vertical flips (p 0.5), RandomSharpness (p 0.5, not
  reproduced), ColorJitter(0.1, 0.1, 0.1, 0.1, p 0.5), no crop. Its arbitrary rotation fills the corners with
  zeros, which the mask then calls class 0 "Background"; here the rotation is a uniform quarter turn
  (rot90_p 0.75: with the flips, all 8 orientations equally likely, no fill), and an optional small angle
  (`rotate_degrees`, p 0.5) whose fill is `ignore_index`. rgb=False: brightness / contrast only, no clipping.
  Set recipe.scale (e.g. (0.25, 1.0)) for random resized crops of larger tiles.
  """
  return ml_collections.ConfigDict(
    dict(
      scale=(1.0, 1.0),
      ratio=(1.0, 1.0),
      interpolation="bilinear",
      flip_p=0.5,
      vflip_p=0.5,
      rot90_p=0.75,
      rotate_p=0.5,
      rotate_degrees=float(rotate_degrees),
      jitter=(0.1, 0.1, 0.1, 0.1) if rgb else (0.1, 0.1, 0.0, 0.0),
      jitter_p=0.5,
      clip=(0.0, 1.0) if rgb else None,
      rgb=bool(rgb),
    )
  )


def robosat(rgb=True):
  """RoboSat's joint transforms (rs train): horizontal flip p 0.5 and three independent 90/180/270 degree
  rotations at p 0.5, whose sum is a uniform quarter turn (rot90_p 0.75). No colour, no crop."""
  recipe = landcoverai(rgb)
  recipe.vflip_p = 0.0
  recipe.rotate_p = 0.0
  recipe.jitter_p = 0.0
  return recipe
