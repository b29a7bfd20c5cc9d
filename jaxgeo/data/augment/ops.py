"""The operations every augmentation here is built from: config reading and checks, geometry (PIL-style resize
weights, resampling, torchvision's crop box), colour (value-range clipping, grayscale, hue, colour jitter, blur)
and the batch plumbing (per-sample sharding, image checks) that views.py and segmentation.py share.

Colour for any band count: with 3 bands marked RGB, torchvision's ops (ITU-R 601 luma for grayscale and
contrast, saturation and hue through HSV). Otherwise there is no luma: brightness scales, contrast pulls each band
toward its own mean, grayscale replaces every band by the mean over bands (TorchGeo's RandomGrayscale with equal
weights, SSL4EO's ToGray), and saturation / hue do not exist. The value range (`clip`) is part of the recipe:
RGB lives in [0, 1] (PIL clamps to uint8 after every op), S1 backscatter in dB is negative and must not be cut.
"""

import math

import jax
import jax.numpy as jnp

_WHERE = "jaxgeo/data/augment/ops.py"
# Fixed-length fields of every recipe kind (multicrop, views, segmentation): _read_fields checks them for all.
_LENGTHS = {"global_scale": 2, "local_scale": 2, "scale": 2, "ratio": 2, "jitter": 4, "blur_sigma": 2}
# `clip` value meaning "[0, 1] for 3 bands, a floor at 0 otherwise": what DINO was trained with (RGB in [0, 1],
# reflectance >= 0). Wrong for dB or any signed unit: pass clip=None or (lo, hi) there.
AUTO = "auto"
# ITU-R 601-2 luma as PIL's convert("L"), which is what the reference's RandomGrayscale runs on.
_LUMA = (0.299, 0.587, 0.114)
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop tries this many boxes before its centre-crop fallback


def _read_fields(config, fields, what):
  """Pull every field up front so a missing one fails at trace time with its name, not deep in jax."""
  missing = [f for f in fields if not hasattr(config, f)]
  if missing:
    raise ValueError(f"{_WHERE}: {what} lacks field(s) {missing}; expected all of {list(fields)}")
  cfg = {f: getattr(config, f) for f in fields}
  for name, value in cfg.items():
    if name in _LENGTHS and len(value) != _LENGTHS[name]:
      raise ValueError(f"{_WHERE}: {what}.{name} must have {_LENGTHS[name]} entries, got {value!r}")
  return cfg


def _may_happen(probability):
  """False only for a probability known at trace time to be 0: the op then costs no graph at all."""
  try:
    return float(probability) != 0.0
  except TypeError:  # traced (jax's ConcretizationTypeError is a TypeError) or one per view
    return True


def _resolve_clip(clip, channels, what):
  """AUTO -> DINO's rule; otherwise None or (lo, hi) with either end None, checked."""
  if isinstance(clip, str):
    if clip != AUTO:
      raise ValueError(f"{_WHERE}: {what}.clip must be None, (lo, hi) or {AUTO!r}, got {clip!r}")
    return (0.0, 1.0) if channels == 3 else (0.0, None)
  if clip is None:
    return None
  if len(clip) != 2:
    raise ValueError(f"{_WHERE}: {what}.clip must be None or (lo, hi) (either may be None), got {clip!r}")
  lo, hi = (None if v is None else float(v) for v in clip)
  if lo is not None and hi is not None and not lo < hi:
    raise ValueError(f"{_WHERE}: {what}.clip must have lo < hi, got {clip!r}")
  return lo, hi


def _check_colour(cfg, channels, what):
  """The colour settings that would otherwise do nothing, or something wrong, without a word."""
  if cfg["rgb"] and channels != 3:
    raise ValueError(
      f"{_WHERE}: {what}.rgb is True but the images have {channels} bands; luma grayscale, saturation and hue need "
      "exactly 3 (R, G, B). Use rgb=False for other band sets"
    )
  brightness, contrast, saturation, hue = cfg["jitter"]
  if not cfg["rgb"] and (saturation or hue):
    raise ValueError(
      f"{_WHERE}: {what}.jitter={tuple(cfg['jitter'])!r} asks for saturation / hue, which exist only for RGB "
      "(rgb=True); set them to 0 for multispectral bands"
    )
  if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
    raise ValueError(f"{_WHERE}: {what}.jitter must be >= 0 with hue in [0, 0.5], got {tuple(cfg['jitter'])!r}")


def _check_scale(scale, ratio, what):
  if not 0 < scale[0] <= scale[1]:
    raise ValueError(f"{_WHERE}: {what}.scale must be 0 < lo <= hi (fractions of the area), got {scale!r}")
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"{_WHERE}: {what}.ratio must be 0 < lo <= hi (width / height), got {ratio!r}")


# ----------------------------------------------------------------------------------------------- geometry


def _keys_cubic(x):
  """Keys cubic with a = -0.5: PIL's BICUBIC filter (torch's antialiased bicubic uses the same)."""
  x = jnp.abs(x)
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _triangle(x):
  """PIL's BILINEAR filter."""
  return jnp.maximum(1.0 - jnp.abs(x), 0.0)


_KERNELS = {"bicubic": _keys_cubic, "bilinear": _triangle}


def _resize_weights(in_size, out_size, start, length, flip=False, kernel=_keys_cubic):
  """[in_size, out_size] matrix resampling the window [start, start + length) to out_size pixels.

  Same arithmetic as PIL's `crop(box).resize(size, BICUBIC)` (BILINEAR with kernel=_triangle): pixel centres at
  +0.5, the kernel widened by the downscale factor (antialias), taps restricted to the window and renormalised.
  Restricting to the window is why this is not `jax.image.scale_and_translate`: that one lets the kernel reach
  pixels next to the window, which PIL's crop has already thrown away. `start`/`length` may be traced
  (per-sample boxes). A window reaching past the image (segmentation's rotation margin) renormalises over the
  pixels that exist; output pixels with no tap at all come out 0 (the caller marks them as outside).
  """
  length = jnp.asarray(length, jnp.float32)
  start = jnp.asarray(start, jnp.float32)
  step = length / out_size
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step - 0.5
  support = jnp.maximum(step, 1.0)
  pixels = jnp.arange(in_size, dtype=jnp.float32)[:, None]
  weights = kernel((pixels - centres[None, :]) / support)
  inside = (pixels >= start) & (pixels < start + length)
  weights = jnp.where(inside, weights, 0.0)
  total = jnp.sum(weights, axis=0, keepdims=True)
  weights = weights / jnp.where(total == 0.0, 1.0, total)
  # Flipping the output columns of the matrix is a free flip of the resized crop.
  return jnp.where(flip, weights[:, ::-1], weights)


def _nearest_source(in_size, out_size, start, length):
  """Source pixel of each of out_size pixels resampling [start, start + length) with PIL's NEAREST, and
  whether it exists: floor(start + (o + 0.5) * step), the centred rule, so flips commute with resizing."""
  step = jnp.asarray(length, jnp.float32) / out_size
  index = jnp.floor(start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step).astype(jnp.int32)
  exists = (index >= 0) & (index < in_size)
  return jnp.clip(index, 0, in_size - 1), exists


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


def _clip(image, clip):
  """clip: None, or (lo, hi) with either end None; AUTO is resolved by the callers."""
  if clip is None:
    return image
  lo, hi = clip
  if lo is not None and hi is not None:
    return jnp.clip(image, lo, hi)
  if lo is not None:
    return jnp.maximum(image, lo)
  return image if hi is None else jnp.minimum(image, hi)


def _grayscale(image):
  """[..., 3] -> [..., 1] luma."""
  return jnp.tensordot(image, jnp.asarray(_LUMA, image.dtype), axes=([-1], [0]))[..., None]


def _spatial_mean(image, valid):
  """Mean over H, W of [H, W, C] (keepdims); `valid` [H, W, 1] restricts it to pixels that came from the source."""
  if valid is None:
    return jnp.mean(image, axis=(0, 1), keepdims=True)
  return jnp.sum(image * valid, axis=(0, 1), keepdims=True) / jnp.maximum(jnp.sum(valid), 1.0)


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


def _color_jitter(key, image, jitter, rgb, clip=AUTO, valid=None):
  """torchvision ColorJitter: brightness, contrast, saturation, hue in a random order, each drawn once.

  Brightness, contrast and saturation are all `blend(image, target, factor)` with targets black, the mean
  luma and the per-pixel luma, so each of the 4 ordered slots computes one blend with a selected target
  (and the hue rotation for RGB) instead of branching. For multispectral input saturation and hue are the
  identity and contrast pulls each band toward its own mean (there is no luma for 12 bands); brightness and
  contrast then commute, so the random order is SSL4EO's fixed brightness-then-contrast when nothing clips.
  `valid` [H, W, 1] keeps pixels outside a rotated source out of the contrast means.
  """
  clip = _resolve_clip(clip, 3 if rgb else 0, "_color_jitter")
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
      mean_luma = jnp.mean(luma) if valid is None else _spatial_mean(luma, valid)
      target = jnp.where(op == 0, 0.0, jnp.where(op == 1, mean_luma, luma))
    else:
      target = jnp.where(op == 0, 0.0, jnp.where(op == 1, _spatial_mean(image, valid), image))
    blended = _clip(factors[op] * image + (1.0 - factors[op]) * target, clip)
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


# ------------------------------------------------------------------------------------------------ batches


def _shard_like_batch(values, images):
  """Give per-sample arrays (keys, masks) the batch sharding of the images.

  Under Explicit mesh axes vmap insists that every mapped input is sharded the same way along the mapped
  axis; keys split from one replicated key are replicated, while the batch is sharded over "data".
  """
  sharding = jax.typeof(images).sharding
  if not sharding.spec or sharding.spec[0] is None:
    return values
  target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
  return jax.sharding.reshard(values, target)


def _image_batch(images, caller):
  """images as a jax array [B, H, W, C], dtype kept (so byte images can still be recognised)."""
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{_WHERE}: {caller} expects images [B, H, W, C], got shape {images.shape}")
  return images


def _batch_of_images(images, caller, clip=None):
  """float32 [B, H, W, C]. Integer pixels against a [0, 1] range are 0..255 bytes that would all clip to white."""
  images = _image_batch(images, caller)
  if clip is not None and clip[1] == 1.0 and jnp.issubdtype(images.dtype, jnp.integer):
    raise ValueError(f"{_WHERE}: {caller} got {images.dtype} images but the recipe clips to {clip}: scale to [0, 1]")
  return images.astype(jnp.float32)
