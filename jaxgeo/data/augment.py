"""DINO multi-crop augmentation as pure JAX, run on the accelerator inside the jitted training step.

The host ships raw patches (RGB scaled to [0, 1], multispectral as reflectance / 10000); every random choice
is drawn here from an explicit key, one key per sample and per view, so a batch is reproducible from the step
key alone and the work vmaps with no Python loop over samples.

The recipe follows facebookresearch/dino `DataAugmentationDINO`, which runs torchvision on PIL images:
random resized crop (bicubic) -> horizontal flip -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p)
-> solarise (p, second global crop only) -> normalise. Numbers come from `aug_config` (see `_FIELDS`).
"""

import math

import jax
import jax.numpy as jnp

_WHERE = "jaxgeo/data/augment.py"
_FIELDS = (
  "global_size",
  "local_size",
  "local_crops_number",
  "global_scale",
  "local_scale",
  "ratio",
  "flip_p",
  "jitter",
  "jitter_p",
  "grayscale_p",
  "blur_p",
  "blur_sigma",
  "solarize_p",
  "solarize_threshold",
)
# ITU-R 601-2 luma as PIL's convert("L"), which is what the reference's RandomGrayscale runs on.
_LUMA = (0.299, 0.587, 0.114)
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop tries this many boxes before its centre-crop fallback


def _read_config(aug_config):
  """Pull every field up front so a missing one fails at trace time with its name, not deep in jax."""
  missing = [f for f in _FIELDS if not hasattr(aug_config, f)]
  if missing:
    raise ValueError(f"{_WHERE}: aug_config lacks field(s) {missing}; expected all of {list(_FIELDS)}")
  cfg = {f: getattr(aug_config, f) for f in _FIELDS}
  for name, length in (
    ("global_scale", 2),
    ("local_scale", 2),
    ("ratio", 2),
    ("jitter", 4),
    ("blur_p", 3),
    ("blur_sigma", 2),
  ):
    if len(cfg[name]) != length:
      raise ValueError(f"{_WHERE}: aug_config.{name} must have {length} entries, got {cfg[name]!r}")
  return cfg


# ----------------------------------------------------------------------------------------------- geometry


def _keys_cubic(x):
  """Keys cubic with a = -0.5: PIL's BICUBIC filter (torch's antialiased bicubic uses the same)."""
  x = jnp.abs(x)
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _resize_weights(in_size, out_size, start, length, flip=False):
  """[in_size, out_size] matrix resampling the window [start, start + length) to out_size pixels.

  Same arithmetic as PIL's `crop(box).resize(size, BICUBIC)`: pixel centres at +0.5, the kernel widened by
  the downscale factor (antialias), taps restricted to the window and renormalised. Restricting to the
  window is why this is not `jax.image.scale_and_translate`: that one lets the kernel reach pixels next to
  the window, which PIL's crop has already thrown away. `start`/`length` may be traced (per-sample boxes).
  """
  length = jnp.asarray(length, jnp.float32)
  start = jnp.asarray(start, jnp.float32)
  step = length / out_size
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step - 0.5
  support = jnp.maximum(step, 1.0)
  pixels = jnp.arange(in_size, dtype=jnp.float32)[:, None]
  weights = _keys_cubic((pixels - centres[None, :]) / support)
  inside = (pixels >= start) & (pixels < start + length)
  weights = jnp.where(inside, weights, 0.0)
  weights = weights / jnp.sum(weights, axis=0, keepdims=True)
  # Flipping the output columns of the matrix is a free horizontal flip of the resized crop.
  return jnp.where(flip, weights[:, ::-1], weights)


def _resample(image, rows, cols):
  """image [H, W, C] -> [h, w, C] through separable weight matrices rows [H, h], cols [W, w]."""
  # HIGHEST keeps GPUs off TF32 here; these matmuls are tiny next to the ViT, so exactness is free.
  hi = jax.lax.Precision.HIGHEST
  out = jnp.einsum("hH,hwc->Hwc", rows, image, precision=hi)
  return jnp.einsum("wW,Hwc->HWc", cols, out, precision=hi)


def _crop_box(key, height, width, scale, ratio):
  """torchvision RandomResizedCrop.get_params, vectorised: draw all attempts, keep the first that fits."""
  # One draw for everything: each jax.random call is a full threefry graph, and compile time adds up.
  u = jax.random.uniform(key, (2 * _CROP_ATTEMPTS + 2,))
  u_area, u_ratio, u_top, u_left = u[:_CROP_ATTEMPTS], u[_CROP_ATTEMPTS:-2], u[-2], u[-1]
  target = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
  # jnp.round is round-half-even like Python's round(), which torchvision uses.
  cand_w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  cand_h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (cand_w > 0) & (cand_w <= width) & (cand_h > 0) & (cand_h <= height)
  first = jnp.argmax(fits)
  found = fits[first]

  # Fallback: the whole image, narrowed to the nearest allowed aspect ratio (shapes are static here).
  in_ratio = width / height
  if in_ratio < min(ratio):
    fb_w, fb_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fb_w, fb_h = int(round(height * max(ratio))), height
  else:
    fb_w, fb_h = width, height

  h = jnp.where(found, cand_h[first], fb_h)
  w = jnp.where(found, cand_w[first], fb_w)
  rand_top = jnp.floor(u_top * (height - h + 1)).astype(jnp.int32)
  rand_left = jnp.floor(u_left * (width - w + 1)).astype(jnp.int32)
  top = jnp.where(found, jnp.minimum(rand_top, height - h), (height - fb_h) // 2)
  left = jnp.where(found, jnp.minimum(rand_left, width - w), (width - fb_w) // 2)
  return top, left, h, w


# ------------------------------------------------------------------------------------------------- colour


def _clip(image, rgb):
  # RGB lives in [0, 1] (PIL clamps to uint8 after every op); multispectral reflectance may exceed 1,
  # so only the physical floor is kept there.
  return jnp.clip(image, 0.0, 1.0) if rgb else jnp.maximum(image, 0.0)


def _grayscale(image):
  """[..., 3] -> [..., 1] luma."""
  return jnp.tensordot(image, jnp.asarray(_LUMA, image.dtype), axes=([-1], [0]))[..., None]


def _shift_hue(image, shift):
  """Rotate hue by `shift` (fraction of a turn) through HSV, keeping saturation and value."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.max(image, axis=-1)
  chroma = value - jnp.min(image, axis=-1)
  grey = chroma == 0.0
  safe_chroma = jnp.where(grey, 1.0, chroma)
  sat = chroma / jnp.where(grey, 1.0, value)
  # Hue sector by which channel is the maximum; ties resolve r, then g, then b.
  hue = jnp.where(
    value == r, (g - b) / safe_chroma, jnp.where(value == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma)
  )
  hue = jnp.mod(hue / 6.0 + shift, 1.0)

  # Back to RGB with the standard f(n) = V - V S max(0, min(k, 4 - k, 1)), k = (n + 6 H) mod 6.
  def channel(n):
    k = jnp.mod(n + hue * 6.0, 6.0)
    return value - value * sat * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def _color_jitter(key, image, jitter, rgb):
  """torchvision ColorJitter: brightness, contrast, saturation, hue in a random order, each drawn once.

  Brightness, contrast and saturation are all `blend(image, target, factor)` with targets black, the mean
  luma and the per-pixel luma, so each of the 4 ordered slots computes one blend with a selected target
  (and the hue rotation for RGB) instead of branching. For multispectral input saturation and hue are the
  identity and contrast pulls each band toward its own mean (there is no luma for 12 bands).
  """
  brightness, contrast, saturation, hue = jitter
  u = jax.random.uniform(key, (8,))

  def factor(u_i, spread):
    low = max(0.0, 1.0 - spread)
    return low + (1.0 + spread - low) * u_i

  factors = jnp.stack(
    [
      factor(u[0], brightness),
      factor(u[1], contrast),
      factor(u[2], saturation) if rgb else jnp.float32(1.0),
      jnp.float32(1.0),
    ]
  )
  hue_shift = hue * (2.0 * u[3] - 1.0)
  order = jnp.argsort(u[4:])  # ranks of iid uniforms: a uniformly random permutation

  def apply_slot(slot, image):
    op = order[slot]
    if rgb:
      luma = _grayscale(image)
      target = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(luma), luma))
    else:
      band_means = jnp.mean(image, axis=(0, 1), keepdims=True)
      target = jnp.where(op == 0, 0.0, jnp.where(op == 1, band_means, image))
    blended = _clip(factors[op] * image + (1.0 - factors[op]) * target, rgb)
    return jnp.where(op == 3, _shift_hue(image, hue_shift), blended) if rgb else blended

  # A rolled loop, not 4 unrolled copies: the body is large (HSV round trip) and compile time matters.
  return jax.lax.fori_loop(0, 4, apply_slot, image)


def _blur_weights(size, sigma, radius):
  """[size, size] matrix of a Gaussian (per-sample traced `sigma`, static `radius`) with edge replication.

  The reference calls PIL's GaussianBlur(radius=sigma), which PIL approximates with three box blurs of
  matching variance; a true Gaussian truncated at ceil(3 * sigma_max) taps is the same filter up to that
  approximation (both replicate edge pixels). Written as a matrix so blurring reuses `_resample`'s two
  matmuls: a small graph (fast to compile) that runs on the tensor cores.
  """
  taps = jnp.arange(-radius, radius + 1)
  kernel = jnp.exp(-0.5 * (taps.astype(jnp.float32) / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  pixels = jnp.arange(size)
  # source[t, out] is the input pixel tap t reads for output pixel `out`, clamped at the borders.
  source = jnp.clip(pixels[None, :] + taps[:, None], 0, size - 1)
  hits = (pixels[None, :, None] == source[:, None, :]).astype(jnp.float32)  # [taps, in, out]
  return jnp.tensordot(kernel, hits, axes=1)


def _gaussian_blur(image, sigma, radius):
  """Separable Gaussian blur of image [H, W, C]; see `_blur_weights`."""
  return _resample(image, _blur_weights(image.shape[0], sigma, radius), _blur_weights(image.shape[1], sigma, radius))


# -------------------------------------------------------------------------------------------------- views


def _augment_view(key, image, cfg, size, scale, blur_p, solarize_p):
  """One random view of one image [H, W, C] -> [size, size, C], not yet normalised.

  `blur_p` and `solarize_p` are traced so global views with different probabilities share one vmap.
  """
  height, width, channels = image.shape
  rgb = channels == 3
  k_crop, k_jit, k_coins = jax.random.split(key, 3)
  u_flip, u_jit, u_gray, u_blur, u_sigma, u_sol = jax.random.uniform(k_coins, (6,))

  top, left, h, w = _crop_box(k_crop, height, width, scale, cfg["ratio"])
  flip = u_flip < cfg["flip_p"]
  view = _resample(image, _resize_weights(height, size, top, h), _resize_weights(width, size, left, w, flip))
  view = _clip(view, rgb)  # bicubic overshoots; PIL's uint8 output clamps it

  jittered = _color_jitter(k_jit, view, cfg["jitter"], rgb)
  view = jnp.where(u_jit < cfg["jitter_p"], jittered, view)
  if rgb:
    gray = jnp.broadcast_to(_grayscale(view), view.shape)
    view = jnp.where(u_gray < cfg["grayscale_p"], gray, view)

  sigma_lo, sigma_hi = cfg["blur_sigma"]
  sigma = sigma_lo + (sigma_hi - sigma_lo) * u_sigma
  blurred = _gaussian_blur(view, sigma, radius=max(1, math.ceil(3 * sigma_hi)))
  view = jnp.where(u_blur < blur_p, blurred, view)

  # PIL's ImageOps.solarize inverts pixels at or above the threshold.
  solarized = jnp.where(view >= cfg["solarize_threshold"], 1.0 - view, view)
  return jnp.where(u_sol < solarize_p, solarized, view)


def _views_of_batch(keys, images, cfg, size, scale, blur_p, solarize_p):
  """keys [B, V], images [B, H, W, C], blur_p/solarize_p [V] -> [V, B, size, size, C]."""
  one_image = jax.vmap(lambda k, img, bp, sp: _augment_view(k, img, cfg, size, scale, bp, sp), in_axes=(0, None, 0, 0))
  return jax.vmap(lambda k, img: one_image(k, img, blur_p, solarize_p), out_axes=1)(keys, images)


def _shard_like_batch(keys, images):
  """Give the per-sample keys the batch sharding of the images.

  Under Explicit mesh axes vmap insists that every mapped input is sharded the same way along the mapped
  axis; keys split from one replicated key are replicated, while the batch is sharded over "data".
  """
  sharding = jax.typeof(images).sharding
  if not sharding.spec or sharding.spec[0] is None:
    return keys
  target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
  return jax.sharding.reshard(keys, target)


def multicrop(rng, images, aug_config, mean, std):
  """DINO multi-crop of a batch: (global_crops [2, B, G, G, C], local_crops [L, B, l, l, C]), normalised.

  images: [B, H, W, C] float, RGB in [0, 1]; `mean`/`std` per channel. Each sample gets its own key, split
  again per view, so one sample's crops do not depend on the others'. Output is float32.
  """
  cfg = _read_config(aug_config)
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f"{_WHERE}: multicrop expects images [B, H, W, C], got shape {images.shape}")
  batch = images.shape[0]
  num_local = int(cfg["local_crops_number"])
  view_keys = jax.vmap(lambda k: jax.random.split(k, 2 + num_local))(jax.random.split(rng, batch))
  view_keys = _shard_like_batch(view_keys, images)

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
    local_crops = jnp.zeros((0, batch, size, size, images.shape[-1]), jnp.float32)
  return normalize(global_crops, mean, std), normalize(local_crops, mean, std)


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


def center_resize(images, size):
  """Deterministic eval preprocessing: bicubic (antialiased) resize of whole patches [B, H, W, C] to size."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f"{_WHERE}: center_resize expects images [B, H, W, C], got shape {images.shape}")
  _, height, width, channels = images.shape
  rows = _resize_weights(height, size, 0, height)
  cols = _resize_weights(width, size, 0, width)
  return _clip(jax.vmap(lambda img: _resample(img, rows, cols))(images), channels == 3)
