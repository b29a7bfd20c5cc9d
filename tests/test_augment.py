"""Tests for the on-device DINO multi-crop (jaxgeo/data/augment.py), on tiny images."""

import colorsys
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxgeo.data import augment

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
  rows = augment._resize_weights(in_size, out, jnp.int32(top), jnp.int32(h_w[0]))
  cols = augment._resize_weights(in_size, out, jnp.int32(left), jnp.int32(h_w[1]))
  return augment._resample(img, rows, cols)


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
  np.testing.assert_allclose(augment._gaussian_blur(img, 0.1, radius=6), img, atol=1e-6)
  assert augment._gaussian_blur(img, 2.0, radius=6).var() < 0.2 * img.var()
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
  ours = np.asarray(augment._shift_hue(jnp.asarray(pixels), shift))
  ref = []
  for r, g, b in pixels:
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    ref.append(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
  np.testing.assert_allclose(ours, np.array(ref), atol=1e-5)


def test_color_jitter_zero_strength_is_identity_and_changes_otherwise():
  img = images(batch=1, size=12)[0]
  same = augment._color_jitter(jax.random.key(0), img, (0.0, 0.0, 0.0, 0.0), rgb=True)
  np.testing.assert_allclose(same, img, atol=1e-5)
  changed = augment._color_jitter(jax.random.key(0), img, (0.4, 0.4, 0.2, 0.1), rgb=True)
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
    top, left, h, w = jax.vmap(lambda k, scale=scale: augment._crop_box(k, 120, 120, scale, (3 / 4, 4 / 3)))(keys)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 120).all() and (left + w <= 120).all()
    frac = np.asarray(h * w) / 120**2
    assert band[0] < frac.mean() < band[1], (scale, frac.mean())
    assert frac.min() >= scale[0] * 0.9 and frac.max() <= scale[1] * 1.05
    ratios = np.asarray(w / h)
    assert (ratios > 0.7).all() and (ratios < 1.4).all()
  # No attempt can fit (full area at aspect >= 1.5 overflows): centre crop narrowed to the ratio range.
  box = augment._crop_box(jax.random.key(0), 40, 40, (1.0, 1.0), (1.5, 2.0))
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
