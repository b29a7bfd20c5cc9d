"""Self-supervised views: DINO's multi-crop, recipe views with their recipes (MoCo v2 "aug+", the seed's
sensor-pair sets), and the deterministic evaluation preprocessing that goes with them (normalize, center_resize).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from jaxgeo.data.augment.ops import (
  AUTO,
  _batch_of_images,
  _check_colour,
  _check_scale,
  _clip,
  _color_jitter,
  _crop_box,
  _gaussian_blur,
  _grayscale,
  _image_batch,
  _may_happen,
  _read_fields,
  _resample,
  _resize_weights,
  _resolve_clip,
  _shard_like_batch,
)

_WHERE = "jaxgeo/data/augment/selfsup.py"
# DINO's aug_config (multicrop). Optional extras, absent from the published configs: vflip_p (default 0), clip
# (default AUTO) and multispectral_grayscale (default False: DINO's multispectral runs never grayed their bands).
_FIELDS = tuple(
  "global_size local_size local_crops_number global_scale local_scale ratio flip_p jitter jitter_p grayscale_p blur_p "
  "blur_sigma solarize_p solarize_threshold".split()
)
_VIEW_FIELDS = tuple(
  "scale ratio flip_p vflip_p jitter jitter_p grayscale_p blur_p blur_sigma solarize_p solarize_threshold "
  "clip rgb".split()
)


def _read_config(aug_config):
  cfg = _read_fields(aug_config, _FIELDS, "aug_config")
  if len(cfg["blur_p"]) != 3:
    raise ValueError(f"{_WHERE}: aug_config.blur_p must have 3 entries, got {cfg['blur_p']!r}")
  for name, default in (("vflip_p", 0.0), ("clip", AUTO), ("multispectral_grayscale", False)):
    cfg[name] = getattr(aug_config, name) if hasattr(aug_config, name) else default
  return cfg


def _augment_view(key, image, cfg, size, scale, blur_p, solarize_p):
  """One random view of one image [H, W, C] -> [size, size, C], not yet normalised.

  `cfg` holds resolved settings (see `_view_settings`). `blur_p` and `solarize_p` may be traced so views with
  different probabilities share one vmap. The draws do not depend on which ops are on, so switching one op
  off leaves every other decision of the same key unchanged.
  """
  height, width, channels = image.shape
  k_crop, k_jit, k_coins = jax.random.split(key, 3)
  u_flip, u_jit, u_gray, u_blur, u_sigma, u_sol = jax.random.uniform(k_coins, (6,))

  top, left, h, w = _crop_box(k_crop, height, width, scale, cfg["ratio"])
  flip = u_flip < cfg["flip_p"]
  vflip = False  # DINO draws no vertical coin: its key stream stays what it always was
  if _may_happen(cfg["vflip_p"]):
    vflip = jax.random.uniform(jax.random.fold_in(k_coins, 1)) < cfg["vflip_p"]
  rows = _resize_weights(height, size, top, h, vflip)
  view = _resample(image, rows, _resize_weights(width, size, left, w, flip))
  view = _clip(view, cfg["clip"])  # bicubic overshoots; PIL's uint8 output clamps it

  if _may_happen(cfg["jitter_p"]):
    jittered = _color_jitter(k_jit, view, cfg["jitter"], cfg["rgb"], cfg["clip"])
    view = jnp.where(u_jit < cfg["jitter_p"], jittered, view)
  gray = None
  if cfg["rgb"]:
    gray = _grayscale(view)
  elif cfg["band_mean_grayscale"]:
    gray = jnp.mean(view, axis=-1, keepdims=True)
  if gray is not None and _may_happen(cfg["grayscale_p"]):
    view = jnp.where(u_gray < cfg["grayscale_p"], jnp.broadcast_to(gray, view.shape), view)

  if _may_happen(blur_p):
    sigma_lo, sigma_hi = cfg["blur_sigma"]
    sigma = sigma_lo + (sigma_hi - sigma_lo) * u_sigma
    blurred = _gaussian_blur(view, sigma, radius=max(1, math.ceil(3 * sigma_hi)))
    view = jnp.where(u_blur < blur_p, blurred, view)

  if _may_happen(solarize_p):
    # PIL's ImageOps.solarize inverts pixels at or above the threshold (within the value range).
    solarized = jnp.where(view >= cfg["solarize_threshold"], cfg["solarize_top"] - view, view)
    view = jnp.where(u_sol < solarize_p, solarized, view)
  return view


def _views_of_batch(keys, images, cfg, size, scale, blur_p, solarize_p):
  """keys [B, V], images [B, H, W, C] -> [V, B, size, size, C].

  blur_p / solarize_p: [V] arrays (one per view, as DINO's two global crops differ) or one number for all.
  """
  if jnp.ndim(blur_p) == 1:
    one_image = jax.vmap(
      lambda k, img, bp, sp: _augment_view(k, img, cfg, size, scale, bp, sp), in_axes=(0, None, 0, 0)
    )
    per_sample = lambda k, img: one_image(k, img, blur_p, solarize_p)
  else:
    per_sample = jax.vmap(lambda k, img: _augment_view(k, img, cfg, size, scale, blur_p, solarize_p), (0, None))
  return jax.vmap(per_sample, out_axes=1)(keys, images)


def _per_sample_keys(rng, images, num_views):
  """[B, V] keys: one per sample, split again per view, so one sample's views do not depend on the others'."""
  keys = jax.vmap(lambda k: jax.random.split(k, num_views))(jax.random.split(rng, images.shape[0]))
  return _shard_like_batch(keys, images)


def multicrop(rng, images, aug_config, mean, std):
  """DINO multi-crop of a batch: (global_crops [2, B, G, G, C], local_crops [L, B, l, l, C]), normalised.

  images: [B, H, W, C] float, RGB in [0, 1] or reflectance / 10000; `mean`/`std` per channel. Each sample gets
  its own key, split again per view, so one sample's crops do not depend on the others'. Output is float32.
  Optional aug_config fields beyond DINO's: vflip_p, clip (default AUTO) and multispectral_grayscale (default
  False, as DINO's multispectral runs so far; True grays non-RGB views by the band mean with grayscale_p).
  """
  cfg = _read_config(aug_config)
  images = _batch_of_images(images, "multicrop")
  channels = images.shape[-1]
  clip = _resolve_clip(cfg["clip"], channels, "aug_config")
  cfg.update(
    clip=clip,
    rgb=channels == 3,
    band_mean_grayscale=bool(cfg["multispectral_grayscale"]),
    # DINO inverts at 1 (RGB, reflectance / 10000) unless a full value range says otherwise.
    solarize_top=1.0 if clip is None or None in clip else clip[0] + clip[1],
  )
  batch = images.shape[0]
  num_local = int(cfg["local_crops_number"])
  view_keys = _per_sample_keys(rng, images, 2 + num_local)

  # Probabilities may be traced (a schedule, or one compiled test for many settings); sizes may not.
  blur_p = jnp.asarray(cfg["blur_p"], jnp.float32)
  solarize_p = jnp.asarray(cfg["solarize_p"], jnp.float32)
  global_crops = _views_of_batch(
    view_keys[:, :2],
    images,
    cfg,
    int(cfg["global_size"]),
    tuple(cfg["global_scale"]),
    blur_p[:2],
    jnp.stack([jnp.float32(0.0), solarize_p]),
  )
  if num_local > 0:
    local_crops = _views_of_batch(
      view_keys[:, 2:],
      images,
      cfg,
      int(cfg["local_size"]),
      tuple(cfg["local_scale"]),
      jnp.full((num_local,), blur_p[2]),
      jnp.zeros((num_local,), jnp.float32),
    )
  else:
    size = int(cfg["local_size"])
    local_crops = jnp.zeros((0, batch, size, size, channels), jnp.float32)
  return normalize(global_crops, mean, std), normalize(local_crops, mean, std)


def _view_settings(recipe, channels):
  """A views() recipe -> (cfg for `_augment_view`, scale, blur_p, solarize_p), checked against the band count."""
  cfg = _read_fields(recipe, _VIEW_FIELDS, "recipe")
  cfg["rgb"] = bool(cfg["rgb"])
  _check_colour(cfg, channels, "recipe")
  _check_scale(cfg["scale"], cfg["ratio"], "recipe")
  for name in ("flip_p", "vflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
    if jnp.ndim(cfg[name]) != 0:
      raise ValueError(f"{_WHERE}: recipe.{name} must be one probability for every view, got {cfg[name]!r}")
  clip = _resolve_clip(cfg["clip"], channels, "recipe")
  if _may_happen(cfg["solarize_p"]) and (clip is None or None in clip):
    raise ValueError(
      f"{_WHERE}: recipe.solarize_p needs a full value range to invert within: recipe.clip=(lo, hi), got {clip!r}"
    )
  cfg.update(
    clip=clip,
    band_mean_grayscale=True,
    solarize_top=None if clip is None or None in clip else clip[0] + clip[1],
    ratio=tuple(cfg["ratio"]),
    jitter=tuple(float(v) for v in cfg["jitter"]),
    blur_sigma=tuple(cfg["blur_sigma"]),
  )
  return cfg, tuple(cfg["scale"]), cfg["blur_p"], cfg["solarize_p"]


def views(rng, images, recipe, size, num_views=2):
  """`num_views` independent random views of every image: [num_views, B, size, size, C] float32, NOT normalised.

  images [B, H, W, C] in their own units; `recipe` has the fields of `moco_v2()` (scale, ratio, flip_p, vflip_p,
  jitter, jitter_p, grayscale_p, blur_p, blur_sigma, solarize_p, solarize_threshold, clip, rgb). Per view:
  random resized crop (bicubic, torchvision's box) with flips -> colour jitter (p) -> grayscale (p) -> Gaussian
  blur (p, sigma in output pixels) -> solarise (p). The caller normalises (MoCo's fusion modes zero raw channels
  first).
  """
  if int(num_views) < 1 or int(size) < 1:
    raise ValueError(f"{_WHERE}: views needs num_views >= 1 and size >= 1, got {num_views} and {size}")
  images = _image_batch(images, "views")
  cfg, scale, blur_p, solarize_p = _view_settings(recipe, images.shape[-1])
  images = _batch_of_images(images, "views", cfg["clip"])
  keys = _per_sample_keys(rng, images, int(num_views))
  return _views_of_batch(keys, images, cfg, int(size), scale, blur_p, solarize_p)


def moco_v2(rgb=True):
  """MoCo-v2 "aug+" (facebookresearch/moco main_moco.py) as a `views` recipe.

  RGB (rgb=True, values in [0, 1]): RandomResizedCrop scale 0.2-1, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8,
  RandomGrayscale (luma) p 0.2, Gaussian blur sigma 0.1-2 p 0.5, horizontal flip.
  Multispectral (rgb=False, any band count, raw units, nothing clipped): TorchGeo's / SSL4EO's version:
  brightness and contrast 0.4 p 0.8 (applied together, as SSL4EO; TorchGeo draws each with its own p),
  grayscale = band mean p 0.2, blur p 0.5, horizontal and vertical flips. Set recipe.clip = (0.0, None) for
  non-negative units (reflectance, S2 DN) to keep bicubic overshoot from going below 0.
  The reference draws sigma in [0.1, 2] on 224-px crops; sigma stays in pixels of the output at other sizes (on
  a 112-px crop it blurs twice the fraction of the view).
  """
  return ml_collections.ConfigDict(
    dict(
      scale=(0.2, 1.0),
      ratio=(3 / 4, 4 / 3),
      flip_p=0.5,
      vflip_p=0.0 if rgb else 0.5,
      jitter=(0.4, 0.4, 0.4, 0.1) if rgb else (0.4, 0.4, 0.0, 0.0),
      jitter_p=0.8,
      grayscale_p=0.2,
      blur_p=0.5,
      blur_sigma=(0.1, 2.0),
      solarize_p=0.0,
      solarize_threshold=0.5,
      clip=(0.0, 1.0) if rgb else None,
      rgb=bool(rgb),
    )
  )


def sensor_pair_set(number, rgb=False):
  """The seed's augmentation sets for S1/S2 pairs (hpt paper_draft.md), on MoCo-v2's numbers.

  1: random resized crop only; 2: + Gaussian blur (p 0.5); 3: set 2 + colour jitter (p 0.8) and grayscale
  (p 0.2). As written there, no set flips; override recipe.flip_p / vflip_p to add them. The seed's executed
  pipeline (albumentations on CHW arrays, flipping bands instead of pixels) is deliberately not reproduced.
  """
  if number not in (1, 2, 3):
    raise ValueError(f"{_WHERE}: sensor_pair_set number must be 1, 2 or 3 (the seed's aug sets), got {number!r}")
  recipe = moco_v2(rgb)
  recipe.flip_p = 0.0
  recipe.vflip_p = 0.0
  if number < 3:
    recipe.jitter_p = 0.0
    recipe.grayscale_p = 0.0
  if number < 2:
    recipe.blur_p = 0.0
  return recipe


# ------------------------------------------------------------------------------------------- evaluation


def normalize(images, mean, std):
  """(images - mean) / std over the last (channel) axis, float32."""
  images = jnp.asarray(images, jnp.float32)
  mean = jnp.asarray(mean, jnp.float32).reshape(-1)
  std = jnp.asarray(std, jnp.float32).reshape(-1)
  channels = images.shape[-1]
  if mean.shape[0] != channels or std.shape[0] != channels:
    raise ValueError(
      f"{_WHERE}: normalize needs one mean and std per channel ({channels}), "
      f"got {mean.shape[0]} means and {std.shape[0]} stds"
    )
  return (images - mean) / std


def center_resize(images, size, clip=AUTO):
  """Deterministic eval preprocessing: bicubic (antialiased) resize of whole patches [B, H, W, C] to size.

  clip: AUTO ([0, 1] for 3 bands, floor 0 otherwise, as DINO), None (signed units such as S1 dB) or (lo, hi).
  """
  images = _batch_of_images(images, "center_resize")
  _, height, width, channels = images.shape
  rows = _resize_weights(height, size, 0, height)
  cols = _resize_weights(width, size, 0, width)
  return _clip(jax.vmap(lambda img: _resample(img, rows, cols))(images), _resolve_clip(clip, channels, "center_resize"))
