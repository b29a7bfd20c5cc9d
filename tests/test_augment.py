"""Tests for the on-device augmentation (jaxgeo/data/augment/): DINO multi-crop, recipe views for MoCo, joint
image+mask views for segmentation, on tiny images. Compiles are the cost here: each helper below compiles once per
recipe family with the probabilities traced, and the tests reuse those compiles."""

import colorsys
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxgeo.data import augment
from jaxgeo.data.augment import ops

RGB_MEAN, RGB_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def small_config(**overrides):
  cfg = ml_collections.ConfigDict(
    dict(
      global_size=24,
      local_size=12,
      local_crops_number=2,
      global_scale=(0.4, 1.0),
      local_scale=(0.05, 0.4),
      ratio=(3 / 4, 4 / 3),
      flip_p=0.5,
      jitter=(0.4, 0.4, 0.2, 0.1),
      jitter_p=0.8,
      grayscale_p=0.2,
      blur_p=(1.0, 0.1, 0.5),
      blur_sigma=(0.1, 2.0),
      solarize_p=0.2,
      solarize_threshold=0.5,
    )
  )
  cfg.update(overrides)
  return cfg


def no_randomness(**overrides):
  """Only the crop stays random, so two configs with the same key see the same boxes."""
  base = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
  base.update(overrides)
  return small_config(**base)


def images(batch=4, size=32, channels=3, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, channels))


PROB_FIELDS = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")


@functools.partial(jax.jit, static_argnames="static_fields")
def _jitted_multicrop(key, imgs, probs, mean, std, static_fields):
  # Probabilities enter traced, so every probability setting shares one compilation per shape.
  return augment.multicrop(key, imgs, SimpleNamespace(**dict(static_fields), **probs), mean, std)


def run(cfg, imgs=None, seed=1, mean=RGB_MEAN, std=RGB_STD):
  """Jitted, as in the training step (and far quicker than op-by-op dispatch)."""
  imgs = images() if imgs is None else imgs
  fields = cfg.to_dict()
  probs = {f: jnp.asarray(fields.pop(f), jnp.float32) for f in PROB_FIELDS}
  static_fields = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in fields.items()))
  return _jitted_multicrop(
    jax.random.key(seed), imgs, probs, jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32), static_fields
  )


@pytest.fixture(scope="module")
def default_crops():
  return run(small_config())


def test_shapes_dtypes_finite_and_rgb_range(default_crops):
  global_crops, local_crops = default_crops
  assert global_crops.shape == (2, 4, 24, 24, 3) and local_crops.shape == (2, 4, 12, 12, 3)
  assert global_crops.dtype == jnp.float32 and local_crops.dtype == jnp.float32
  for crops in default_crops:
    assert np.isfinite(crops).all()
    # mean 0 / std 1 exposes the raw pipeline output: every RGB op must stay inside [0, 1].
    assert crops.min() >= 0.0 and crops.max() <= 1.0


def test_same_key_same_output_and_different_keys_differ(default_crops):
  again = run(small_config())
  np.testing.assert_array_equal(default_crops[0], again[0])
  np.testing.assert_array_equal(default_crops[1], again[1])
  other = run(small_config(), seed=2)
  assert not np.allclose(default_crops[0], other[0])
  # Per-sample keys: samples in one batch get different crops even when the images are identical.
  same_images = jnp.broadcast_to(images()[:1], (4, 32, 32, 3))
  global_crops, _ = run(small_config(), same_images)
  assert not np.allclose(global_crops[0, 0], global_crops[0, 1])


def test_normalisation_and_zero_local_crops():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
  raw_global, _ = run(no_randomness())
  global_crops, local_crops = run(no_randomness(local_crops_number=0), mean=mean, std=std)
  assert local_crops.shape == (0, 4, 12, 12, 3)
  np.testing.assert_allclose(global_crops, (raw_global - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="one mean and std per channel"):
    augment.normalize(raw_global, (0.5, 0.5), (1.0, 1.0))
  cfg = small_config().to_dict()
  del cfg["solarize_p"]
  with pytest.raises(ValueError, match="solarize_p"):
    augment.multicrop(jax.random.key(0), images(), SimpleNamespace(**cfg), RGB_MEAN, RGB_STD)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def resized_window(img, in_size, top, left, h_w, out):
  """img [in, in, C], window (top, left, h_w[0], h_w[1]) -> [out, out, C] through the crop weights."""
  rows = ops._resize_weights(in_size, out, jnp.int32(top), jnp.int32(h_w[0]))
  cols = ops._resize_weights(in_size, out, jnp.int32(left), jnp.int32(h_w[1]))
  return ops._resample(img, rows, cols)


def test_whole_image_crop_is_plain_resize():
  img = images(batch=1, size=20)[0]
  for out in (12, 31):  # down- and up-sampling
    ours = resized_window(img, 20, 0, 0, (20, 20), out)
    ref = jax.image.resize(img, (out, out, 3), "cubic", antialias=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
  np.testing.assert_allclose(
    augment.center_resize(img[None], 31)[0],
    np.clip(jax.image.resize(img, (31, 31, 3), "cubic", antialias=True), 0, 1),
    atol=1e-5,
  )


def test_sub_window_matches_pil_crop_then_resize():
  from PIL import Image

  img = np.asarray(images(batch=1, size=32)[0, :, :, 0])
  top, left, h, w, out = 5, 9, 17, 11, 14
  ours = resized_window(jnp.asarray(img)[..., None], 32, top, left, (h, w), out)[..., 0]
  # What torchvision's resized_crop does on a PIL image: crop, then bicubic resize (here in float mode).
  pil = Image.fromarray(img, mode="F").crop((left, top, left + w, top + h)).resize((out, out), Image.BICUBIC)
  np.testing.assert_allclose(ours, np.asarray(pil), atol=2e-5)
  # A window of the output's size is an exact copy: it lands where it should, shifted by nothing.
  copy = resized_window(jnp.asarray(img)[..., None], 32, top, left, (10, 10), 10)[..., 0]
  np.testing.assert_allclose(copy, img[top : top + 10, left : left + 10], atol=1e-6)


def test_flip_actually_flips():
  unflipped, _ = run(no_randomness(flip_p=0.0))
  flipped, _ = run(no_randomness(flip_p=1.0))
  np.testing.assert_allclose(flipped, unflipped[:, :, :, ::-1], atol=1e-6)
  assert not np.allclose(flipped, unflipped)


def test_blur_tiny_sigma_is_identity_and_large_sigma_smooths():
  img = images(batch=1, size=24)[0]
  np.testing.assert_allclose(ops._gaussian_blur(img, 0.1, radius=6), img, atol=1e-6)
  assert ops._gaussian_blur(img, 2.0, radius=6).var() < 0.2 * img.var()
  sharp, _ = run(no_randomness())
  blurred, _ = run(no_randomness(blur_p=(1.0, 1.0, 1.0)))
  assert blurred.var(axis=(2, 3)).mean() < sharp.var(axis=(2, 3)).mean()


def test_grayscale_makes_channels_equal():
  global_crops, local_crops = run(no_randomness(grayscale_p=1.0))
  for crops in (global_crops, local_crops):
    np.testing.assert_allclose(crops[..., 0], crops[..., 1], atol=1e-6)
    np.testing.assert_allclose(crops[..., 1], crops[..., 2], atol=1e-6)


def test_solarize_only_second_global_crop():
  plain_g, plain_l = run(no_randomness())
  sol_g, sol_l = run(no_randomness(solarize_p=1.0))
  np.testing.assert_array_equal(sol_g[0], plain_g[0])
  np.testing.assert_array_equal(sol_l, plain_l)
  np.testing.assert_allclose(sol_g[1], np.where(plain_g[1] >= 0.5, 1.0 - plain_g[1], plain_g[1]), atol=1e-6)
  assert not np.allclose(sol_g[1], plain_g[1])


def test_hue_shift_matches_colorsys():
  pixels = np.asarray(images(batch=1, size=8)[0]).reshape(-1, 3)
  shift = 0.13
  ours = np.asarray(ops._shift_hue(jnp.asarray(pixels), shift))
  ref = []
  for r, g, b in pixels:
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    ref.append(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
  np.testing.assert_allclose(ours, np.array(ref), atol=1e-5)


def test_color_jitter_zero_strength_is_identity_and_changes_otherwise():
  img = images(batch=1, size=12)[0]
  same = ops._color_jitter(jax.random.key(0), img, (0.0, 0.0, 0.0, 0.0), rgb=True)
  np.testing.assert_allclose(same, img, atol=1e-5)
  changed = ops._color_jitter(jax.random.key(0), img, (0.4, 0.4, 0.2, 0.1), rgb=True)
  assert not np.allclose(changed, img, atol=1e-3)
  assert changed.min() >= 0.0 and changed.max() <= 1.0


def test_multispectral_twelve_bands():
  imgs = 1.5 * images(channels=12)  # reflectance / 10000 can exceed 1 (clouds): must not be clipped to 1
  mean, std = np.full(12, 0.3), np.full(12, 0.2)
  global_crops, local_crops = run(small_config(jitter_p=1.0), imgs, mean=mean, std=std)
  assert global_crops.shape == (2, 4, 24, 24, 12) and local_crops.shape == (2, 4, 12, 12, 12)
  assert np.isfinite(global_crops).all() and np.isfinite(local_crops).all()
  plain, _ = run(no_randomness(), imgs, mean=mean, std=std)
  jittered, _ = run(no_randomness(jitter_p=1.0), imgs, mean=mean, std=std)
  assert not np.allclose(plain, jittered)  # brightness / contrast still act on 12 bands
  assert (plain * 0.2 + 0.3).max() > 1.0


def test_crop_scale_statistics_follow_config():
  keys = jax.random.split(jax.random.key(3), 2000)
  for scale, band in (((0.4, 1.0), (0.6, 0.8)), ((0.05, 0.4), (0.18, 0.27))):
    top, left, h, w = jax.vmap(lambda k, scale=scale: ops._crop_box(k, 120, 120, scale, (3 / 4, 4 / 3)))(keys)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 120).all() and (left + w <= 120).all()
    frac = np.asarray(h * w) / 120**2
    assert band[0] < frac.mean() < band[1], (scale, frac.mean())
    assert frac.min() >= scale[0] * 0.9 and frac.max() <= scale[1] * 1.05
    ratios = np.asarray(w / h)
    assert (ratios > 0.7).all() and (ratios < 1.4).all()
  # No attempt can fit (full area at aspect >= 1.5 overflows): centre crop narrowed to the ratio range.
  box = ops._crop_box(jax.random.key(0), 40, 40, (1.0, 1.0), (1.5, 2.0))
  assert tuple(int(v) for v in box) == (6, 0, 27, 40)


def test_jit_with_batch_sharded_over_devices():
  cfg = small_config()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  imgs = jax.device_put(images(batch=8), sharding)
  global_crops, local_crops = run(cfg, imgs, seed=5)
  eager_global, eager_local = run(cfg, images(batch=8), seed=5)
  np.testing.assert_allclose(global_crops, eager_global, atol=1e-5)
  np.testing.assert_allclose(local_crops, eager_local, atol=1e-5)


# ------------------------------------------------------------------------------ views (MoCo, any band count)

VIEW_PROBS = ("flip_p", "vflip_p", "jitter_p", "grayscale_p", "blur_p")


@functools.partial(jax.jit, static_argnames=("static_fields", "size", "num_views"))
def _jitted_views(key, imgs, probs, static_fields, size, num_views):
  return augment.views(key, imgs, SimpleNamespace(**dict(static_fields), **probs), size, num_views)


def run_views(recipe, imgs, seed=0, size=8, num_views=2, **prob_overrides):
  """views() jitted with the probabilities traced: every recipe of one family shares one compile."""
  fields = recipe.to_dict()
  probs = {f: jnp.asarray(prob_overrides.get(f, fields.pop(f)), jnp.float32) for f in VIEW_PROBS}
  static_fields = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in fields.items()))
  return np.asarray(_jitted_views(jax.random.key(seed), imgs, probs, static_fields, size, num_views))


def band_images(batch=96, size=12, channels=4, low=0.0, high=1.0, seed=7):
  """Bands with different levels, so grayscale (band mean) and contrast visibly change them. numpy, not jax:
  every new shape of an eager jax op is one more compile."""
  u = np.random.default_rng(seed).uniform(size=(batch, size, size, channels))
  return (low + (high - low) * u * np.linspace(0.3, 1.0, channels)).astype(np.float32)


def applied_rate(recipe, imgs, field):
  """Fraction of (view, sample) pairs an op touched: same keys with and without it, every other draw unchanged."""
  full = run_views(recipe, imgs)
  without = run_views(recipe, imgs, **{field: 0.0})
  changed = np.abs(full - without).reshape(full.shape[0] * full.shape[1], -1).max(axis=1) > 0
  return changed.mean(), changed.size


def assert_rate(rate, n, p, what):
  # Loose: 4.5 binomial standard deviations (+ 4 % for blurs with sigma ~0.1, which are exact identities).
  slack = 4.5 * np.sqrt(max(p * (1 - p), 0.0) / n) + (0.04 if what == "blur_p" else 0.0)
  assert abs(rate - p) <= slack + 1e-9, (what, rate, p)


@pytest.mark.parametrize(
  ("recipe", "imgs"),
  [
    pytest.param(augment.moco_v2(rgb=True), None, id="moco_v2_rgb"),
    pytest.param(augment.moco_v2(rgb=False), band_images(), id="moco_v2_multispectral"),
  ],
)
def test_moco_v2_shapes_and_probabilities(recipe, imgs):
  imgs = band_images(channels=3, seed=8) if imgs is None else imgs
  out = run_views(recipe, imgs)
  assert out.shape == (2, 96, 8, 8, imgs.shape[-1]) and out.dtype == np.float32 and np.isfinite(out).all()
  if recipe.rgb:
    assert out.min() >= 0.0 and out.max() <= 1.0
  for field in VIEW_PROBS:
    rate, n = applied_rate(recipe, imgs, field)
    assert_rate(rate, n, recipe[field], field)


def test_sensor_pair_sets_add_ops_in_order():
  imgs = band_images()
  expected = {
    1: dict(flip_p=0, vflip_p=0, jitter_p=0, grayscale_p=0, blur_p=0),
    2: dict(flip_p=0, vflip_p=0, jitter_p=0, grayscale_p=0, blur_p=0.5),
    3: dict(flip_p=0, vflip_p=0, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5),
  }
  for number, probs in expected.items():
    recipe = augment.sensor_pair_set(number)
    assert recipe.scale == (0.2, 1.0) and recipe.clip is None
    assert run_views(recipe, imgs).shape == (2, 96, 8, 8, 4)
    for field, p in probs.items():
      rate, n = applied_rate(recipe, imgs, field)
      assert_rate(rate, n, p, field)
  with pytest.raises(ValueError, match="1, 2 or 3"):
    augment.sensor_pair_set(4)


def test_multispectral_grayscale_is_band_mean():
  imgs = band_images()
  off = dict.fromkeys(VIEW_PROBS, 0.0)
  plain = run_views(augment.moco_v2(rgb=False), imgs, **off)
  gray = run_views(augment.moco_v2(rgb=False), imgs, **{**off, "grayscale_p": 1.0})
  np.testing.assert_allclose(gray, np.broadcast_to(plain.mean(axis=-1, keepdims=True), plain.shape), atol=1e-6)
  assert plain.std(axis=-1).mean() > 0.05  # the bands really differed before


def test_no_clipping_of_negative_db():
  # S1 backscatter in dB: every value negative. A floor at 0 anywhere would turn these views into zeros.
  db = band_images(low=-25.0, high=-12.0, channels=4)
  recipe = augment.moco_v2(rgb=False)
  out = run_views(recipe, db)
  assert (out < 0).all() and out.min() < -25.0  # brightness x1.4 reaches below the input range: nothing clipped
  resized = np.asarray(augment.center_resize(db[:2], 7, clip=None))
  assert (resized < 0).all()
  assert (np.asarray(augment.center_resize(db[:2], 7)) == 0).all()  # AUTO is DINO's rule: a floor at 0


@functools.partial(jax.jit, static_argnames="jitter")
def _band_jitter(keys, img, jitter):
  return jax.vmap(lambda k: ops._color_jitter(k, img, jitter, rgb=False, clip=None))(keys)


def test_multispectral_jitter_scales_brightness_and_pulls_each_band_to_its_mean():
  img = band_images(batch=1, size=6, low=-20.0, high=-5.0)[0]  # negative (dB): nothing may clip at 0
  keys = jax.random.split(jax.random.key(9), 64)
  bright = np.asarray(_band_jitter(keys, img, (0.4, 0.0, 0.0, 0.0)))
  factor = bright / img  # SSL4EO's RandomBrightness: one factor for every pixel and band
  np.testing.assert_allclose(factor, factor[:, :1, :1, :1] * np.ones_like(factor), rtol=1e-5)
  assert 0.6 <= factor.min() and factor.max() <= 1.4 and factor.std() > 0.1
  contrast = np.asarray(_band_jitter(keys, img, (0.0, 0.4, 0.0, 0.0)))
  band_mean = img.mean(axis=(0, 1))
  # SSL4EO's RandomContrast: (x - mean) * c + mean, per band, with its own mean kept.
  np.testing.assert_allclose(contrast.mean(axis=(1, 2)), np.broadcast_to(band_mean, (64, 4)), rtol=1e-5)
  c = (contrast - band_mean) / (img - band_mean)
  np.testing.assert_allclose(c, c[:, :1, :1, :1] * np.ones_like(c), rtol=1e-3)
  assert 0.6 <= c.min() and c.max() <= 1.4


def test_bilinear_crop_matches_pil():
  from PIL import Image

  img = band_images(batch=1, size=20, channels=1, seed=3)[0, :, :, 0]
  top, left, h, w, out = 3, 5, 13, 9, 7  # a downscale (antialiased) in both directions
  rows = ops._resize_weights(20, out, top, h, kernel=ops._triangle)
  cols = ops._resize_weights(20, out, left, w, kernel=ops._triangle)
  ours = np.asarray(ops._resample(jnp.asarray(img)[..., None], rows, cols))[..., 0]
  pil = Image.fromarray(img, mode="F").crop((left, top, left + w, top + h)).resize((out, out), Image.BILINEAR)
  np.testing.assert_allclose(ours, np.asarray(pil), atol=2e-5)


def test_recipe_errors_name_the_field():
  imgs = np.zeros((2, 12, 12, 4), np.float32)
  rgb_on_four = augment.moco_v2(rgb=True)
  with pytest.raises(ValueError, match=r"recipe.rgb is True but the images have 4 bands"):
    augment.views(jax.random.key(0), imgs, rgb_on_four, 8)
  hue_on_bands = augment.moco_v2(rgb=False)
  hue_on_bands.jitter = (0.4, 0.4, 0.4, 0.1)
  with pytest.raises(ValueError, match=r"recipe.jitter=.*saturation / hue"):
    augment.views(jax.random.key(0), imgs, hue_on_bands, 8)
  solarize_unbounded = augment.moco_v2(rgb=False)
  solarize_unbounded.solarize_p = 0.2
  with pytest.raises(ValueError, match=r"recipe.solarize_p needs a full value range"):
    augment.views(jax.random.key(0), imgs, solarize_unbounded, 8)
  with pytest.raises(ValueError, match=r"views got uint8 images but the recipe clips to \(0.0, 1.0\)"):
    augment.views(jax.random.key(0), np.zeros((2, 12, 12, 3), np.uint8), augment.moco_v2(rgb=True), 8)
  incomplete = augment.moco_v2(rgb=False).to_dict()
  del incomplete["vflip_p"]
  with pytest.raises(ValueError, match=r"recipe lacks field\(s\) \['vflip_p'\]"):
    augment.views(jax.random.key(0), imgs, SimpleNamespace(**incomplete), 8)


# ------------------------------------------------------------------------------ segmentation: image + mask

SEG_PROBS = ("flip_p", "vflip_p", "rot90_p", "rotate_p", "jitter_p")
IGNORE = -1
SEG_SIZE = 16  # source tiles are SEG_SIZE x SEG_SIZE


@functools.partial(jax.jit, static_argnames=("static_fields", "size"))
def _jitted_segmentation(key, imgs, masks, probs, static_fields, size):
  recipe = SimpleNamespace(**dict(static_fields), **probs)
  return augment.segmentation_views(key, imgs, masks, recipe, size, IGNORE)


def run_segmentation(recipe, imgs, masks, seed=0, size=12, **prob_overrides):
  fields = recipe.to_dict()
  probs = {f: jnp.asarray(prob_overrides.get(f, fields.pop(f)), jnp.float32) for f in SEG_PROBS}
  static_fields = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in fields.items()))
  out_images, out_masks = _jitted_segmentation(jax.random.key(seed), imgs, masks, probs, static_fields, size)
  return np.asarray(out_images), np.asarray(out_masks)


def coordinate_tiles(batch=64):
  """Image bands = the pixel's own (row, col); mask = the pixel's id row * SEG_SIZE + col."""
  rows, cols = np.meshgrid(np.arange(SEG_SIZE), np.arange(SEG_SIZE), indexing="ij")
  image = np.stack([rows, cols], axis=-1).astype(np.float32)
  mask = (rows * SEG_SIZE + cols).astype(np.int32)
  return np.repeat(image[None], batch, 0), np.repeat(mask[None], batch, 0)


def rotating_recipe():
  recipe = augment.landcoverai(rgb=False, rotate_degrees=30.0)
  recipe.update(scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic", rotate_p=0.7, jitter=(0.4, 0.4, 0, 0))
  return recipe


def test_segmentation_keeps_image_and_mask_aligned_under_crops_rotations_flips():
  imgs, masks = coordinate_tiles()
  out_img, out_mask = run_segmentation(rotating_recipe(), imgs, masks, jitter_p=0.0)
  assert out_img.shape == (64, 12, 12, 2) and out_mask.shape == (64, 12, 12) and out_mask.dtype == np.int32
  labelled = out_mask != IGNORE
  # mask == f(image): the source pixel the mask names is where the image's interpolated coordinates point.
  # Nearest (mask) vs interpolated (image) differ by < 1 source pixel; a wrong flip or turn would be off by many.
  row_error = np.abs(out_img[..., 0] - out_mask // SEG_SIZE)[labelled]
  col_error = np.abs(out_img[..., 1] - out_mask % SEG_SIZE)[labelled]
  assert row_error.max() < 1.5 and col_error.max() < 1.5, (row_error.max(), col_error.max())
  assert np.median(row_error) < 0.5 and np.median(col_error) < 0.5
  # Rotations reach past the source: ignore_index in the mask, 0 in the image, and only when rotating.
  assert 0 < (~labelled).mean() < 0.3
  assert (out_img[~labelled] == 0).all()
  _, unrotated = run_segmentation(rotating_recipe(), imgs, masks, jitter_p=0.0, rotate_p=0.0)
  assert (unrotated != IGNORE).all()
  # Every orientation shows up: the sign of d(row)/d(out row) and d(col)/d(out col), and transposes (quarter turns).
  d_rows = np.sign(np.median(np.diff(out_img[..., 0], axis=1), axis=(1, 2)))
  d_cols = np.sign(np.median(np.diff(out_img[..., 1], axis=2), axis=(1, 2)))
  assert {-1.0, 1.0} <= set(d_rows[d_rows != 0]) and {-1.0, 1.0} <= set(d_cols[d_cols != 0])
  transposed = np.abs(np.median(np.diff(out_img[..., 0], axis=2), axis=(1, 2))) > 0.5
  assert 0.2 < transposed.mean() < 0.8


def test_segmentation_mask_is_nearest_and_untouched_by_colour():
  imgs, _ = coordinate_tiles()
  classes = np.random.default_rng(4).choice(np.array([0, 1, 2, 4], np.int32), (64, SEG_SIZE, SEG_SIZE))
  plain_img, plain_mask = run_segmentation(rotating_recipe(), imgs, classes, jitter_p=0.0)
  jit_img, jit_mask = run_segmentation(rotating_recipe(), imgs, classes, jitter_p=1.0)
  np.testing.assert_array_equal(jit_mask, plain_mask)
  assert set(np.unique(plain_mask)) <= {0, 1, 2, 4, IGNORE}  # nearest: no blended class 3
  assert (np.abs(jit_img - plain_img).reshape(64, -1).max(axis=1) > 1e-3).all()
  assert (jit_img[plain_mask == IGNORE] == 0).all()  # jitter does not paint the fill either


DIHEDRAL = [lambda a, k=k, f=f: np.rot90(a[:, ::-1] if f else a, k) for k in range(4) for f in (False, True)]


def test_segmentation_flips_and_quarter_turns_are_exact_and_uniform():
  recipe = augment.landcoverai(rgb=True)
  rng = np.random.default_rng(5)
  imgs = rng.uniform(size=(64, SEG_SIZE, SEG_SIZE, 3)).astype(np.float32)
  masks = rng.integers(0, 5, (64, SEG_SIZE, SEG_SIZE), dtype=np.int32)
  out_img, out_mask = run_segmentation(recipe, imgs, masks, size=SEG_SIZE, jitter_p=0.0)
  seen = []
  for i in range(64):
    hits = [j for j, t in enumerate(DIHEDRAL) if np.array_equal(out_img[i], t(imgs[i]))]
    assert len(hits) == 1, i
    np.testing.assert_array_equal(out_mask[i], DIHEDRAL[hits[0]](masks[i]))
    seen.append(hits[0])
  assert len(set(seen)) == 8  # all orientations: quarter turns (p 0.75, uniform) x flips
  # RoboSat's recipe: the same family, horizontal flips only among the flips.
  _, robosat_masks = run_segmentation(augment.robosat(), imgs, masks, size=SEG_SIZE)
  assert robosat_masks.shape == (64, SEG_SIZE, SEG_SIZE) and (robosat_masks != IGNORE).all()


def test_segmentation_bad_inputs():
  imgs, masks = coordinate_tiles(batch=2)
  recipe = rotating_recipe()
  with pytest.raises(ValueError, match=r"masks \[B, H, W\] matching"):
    augment.segmentation_views(jax.random.key(0), imgs, masks[:, :8], recipe, 8, IGNORE)
  with pytest.raises(ValueError, match="integer class-id masks"):
    augment.segmentation_views(jax.random.key(0), imgs, masks.astype(np.float32), recipe, 8, IGNORE)
  recipe.rotate_degrees = 90.0
  with pytest.raises(ValueError, match=r"recipe.rotate_degrees must be in \[0, 45\]"):
    augment.segmentation_views(jax.random.key(0), imgs, masks, recipe, 8, IGNORE)


def test_segmentation_with_batch_sharded_over_devices():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  imgs, masks = coordinate_tiles()  # the alignment test's shapes: the local run reuses its compile
  sharded = run_segmentation(rotating_recipe(), jax.device_put(imgs, sharding), jax.device_put(masks, sharding))
  local = run_segmentation(rotating_recipe(), imgs, masks)
  np.testing.assert_allclose(sharded[0], local[0], atol=1e-5)
  np.testing.assert_array_equal(sharded[1], local[1])
