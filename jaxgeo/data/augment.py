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

Colour for any band count: with 3 bands marked RGB, torchvision's ops (ITU-R 601 luma for grayscale and
contrast, saturation and hue through HSV). Otherwise there is no luma: brightness scales, contrast pulls each band
toward its own mean, grayscale replaces every band by the mean over bands (TorchGeo's RandomGrayscale with equal
weights, SSL4EO's ToGray), and saturation / hue do not exist. The value range (`clip`) is part of the recipe:
RGB lives in [0, 1] (PIL clamps to uint8 after every op), S1 backscatter in dB is negative and must not be cut.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

_WHERE = "jaxgeo/data/augment.py"
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
_SEGMENTATION_FIELDS = tuple(
  "scale ratio interpolation flip_p vflip_p rot90_p rotate_p rotate_degrees jitter jitter_p clip rgb".split()
)
_LENGTHS = {"global_scale": 2, "local_scale": 2, "scale": 2, "ratio": 2, "jitter": 4, "blur_sigma": 2}
# `clip` value meaning "[0, 1] for 3 bands, a floor at 0 otherwise": what DINO was trained with (RGB in [0, 1],
# reflectance >= 0). Wrong for dB or any signed unit: pass clip=None or (lo, hi) there.
AUTO = "auto"
# ITU-R 601-2 luma as PIL's convert("L"), which is what the reference's RandomGrayscale runs on.
_LUMA = (0.299, 0.587, 0.114)
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop tries this many boxes before its centre-crop fallback
_MAX_ROTATE_DEGREES = 45.0  # beyond this a quarter turn plus a smaller angle does the same with less fill


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


def _read_config(aug_config):
  cfg = _read_fields(aug_config, _FIELDS, "aug_config")
  if len(cfg["blur_p"]) != 3:
    raise ValueError(f"{_WHERE}: aug_config.blur_p must have 3 entries, got {cfg['blur_p']!r}")
  for name, default in (("vflip_p", 0.0), ("clip", AUTO), ("multispectral_grayscale", False)):
    cfg[name] = getattr(aug_config, name) if hasattr(aug_config, name) else default
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


# -------------------------------------------------------------------------------------------------- views


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


# ----------------------------------------------------------------------------------------- segmentation


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
