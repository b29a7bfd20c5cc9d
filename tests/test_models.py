"""ViT backbone and DINO head: the position-embedding resize against torch, shapes, drop path, attention."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxgeo.models.heads import DINOHead
from jaxgeo.models.vit import VIT_ARCHS, VisionTransformer, bicubic_matrix, drop_path, interpolate_pos_encoding, vit

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, pos_grid=4)


def torch_interpolate(pos_embed: np.ndarray, h: int, w: int) -> np.ndarray:
  """What the reference does, with torch itself."""
  pos = torch.from_numpy(pos_embed)
  n, dim = pos.shape[1] - 1, pos.shape[2]
  grid = int(math.sqrt(n))
  patch = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
  patch = torch.nn.functional.interpolate(
    patch, scale_factor=((h + 0.1) / math.sqrt(n), (w + 0.1) / math.sqrt(n)), mode="bicubic"
  )
  return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1).numpy()


@pytest.mark.parametrize(
  ("grid", "h", "w"),
  [(14, 7, 7), (14, 15, 15), (14, 6, 6), (14, 7, 15), (14, 28, 12), (14, 14, 15), (7, 15, 15), (4, 3, 5)],
)
def test_interpolate_pos_encoding_matches_torch(grid, h, w):
  rng = np.random.default_rng(grid * 100 + h * 10 + w)
  # Reference-scale embeddings (trunc_normal std .02): agreement to 1e-6 absolute.
  pos = (0.02 * rng.standard_normal((1, 1 + grid * grid, 16))).astype(np.float32)
  out = np.asarray(interpolate_pos_encoding(jnp.asarray(pos), h, w))
  expected = torch_interpolate(pos, h, w)
  assert out.shape == expected.shape == (1, 1 + h * w, 16)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
  # Unit-scale values: what is left is float32 rounding of the cubic weights (torch's compiled polynomial
  # sits a few ulps from the exact one), far below any convention mistake (those are ~1e-2, see below).
  pos = rng.standard_normal((1, 1 + grid * grid, 16)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(interpolate_pos_encoding(jnp.asarray(pos), h, w)), torch_interpolate(pos, h, w), rtol=0, atol=6e-6
  )


def test_interpolation_conventions_would_be_caught():
  """The test above can fail: an A=-0.5 cubic with out/in scale (jax.image.resize) or an out/in scale alone is
  far off."""
  rng = np.random.default_rng(0)
  pos = rng.standard_normal((1, 1 + 14 * 14, 4)).astype(np.float32)
  expected = torch_interpolate(pos, 7, 7)
  patch = jnp.asarray(pos[0, 1:].reshape(14, 14, 4))
  jax_resized = np.asarray(jax.image.resize(patch, (7, 7, 4), "bicubic", antialias=False)).reshape(-1, 4)
  assert np.abs(jax_resized - expected[0, 1:]).max() > 1e-2
  # out/in scale instead of the given (7.1/14) factor moves the sample points:
  assert np.abs(bicubic_matrix(14, 7.1 / 14) - bicubic_matrix(14, 7 / 14)).max() > 1e-2


def test_interpolate_identity_when_grid_unchanged():
  pos = jnp.arange(17 * 3, dtype=jnp.float32).reshape(1, 17, 3)
  assert interpolate_pos_encoding(pos, 4, 4) is pos
  with pytest.raises(ValueError, match="pos_embed"):
    interpolate_pos_encoding(pos[:, :-1], 4, 4)


@pytest.fixture(scope="module")
def tiny():
  """One tiny model initialised once (jitted: eager init compiles every random op separately)."""
  model = VisionTransformer(**TINY)
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


def test_param_tree_names_and_init(tiny):
  abstract = jax.eval_shape(VisionTransformer(**TINY).init, jax.random.key(0), jnp.zeros((1, 32, 32, 5)))
  shapes = jax.tree.map(lambda leaf: leaf.shape, abstract["params"])
  assert set(shapes) == {"cls_token", "pos_embed", "patch_embed", "blocks_0", "blocks_1", "norm"}
  assert set(shapes["blocks_0"]) == {"norm1", "attn", "norm2", "mlp"}
  assert set(shapes["blocks_0"]["attn"]) == {"qkv", "proj"}
  assert set(shapes["blocks_0"]["mlp"]) == {"fc1", "fc2"}
  assert set(shapes["norm"]) == {"scale", "bias"}
  assert shapes["patch_embed"]["proj"]["kernel"] == (8, 8, 5, 32)  # HWIO, C taken from the input
  assert shapes["pos_embed"] == (1, 17, 32) and shapes["cls_token"] == (1, 1, 32)
  assert shapes["blocks_0"]["attn"]["qkv"]["bias"] == (96,)
  _, params = tiny
  assert not np.any(params["blocks_1"]["mlp"]["fc1"]["bias"])
  assert abs(float(jnp.std(params["blocks_0"]["mlp"]["fc1"]["kernel"])) - 0.02) < 0.004
  assert abs(float(jnp.std(params["pos_embed"])) - 0.02) < 0.005
  np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize(("height", "width"), [(32, 32), (56, 56), (60, 36)])
def test_vit_output_shapes(tiny, height, width):
  """224-style (grid = pos_grid), 120-style (7x7 from a 4x4 pos grid) and non-square with flooring."""
  model, params = tiny
  images = jax.random.normal(jax.random.key(1), (2, height, width, 3))
  features, layers = jax.jit(
    lambda p, x: (
      model.apply({"params": p}, x),
      model.apply({"params": p}, x, n=2, method=model.get_intermediate_layers),
    )
  )(params, images)
  assert features.shape == (2, 32) and features.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(features)))
  tokens = 1 + (height // 8) * (width // 8)
  assert len(layers) == 2 and all(layer.shape == (2, tokens, 32) for layer in layers)
  # Each intermediate layer went through the final norm, and the last one is what __call__ reads.
  np.testing.assert_allclose(layers[-1][:, 0], features, atol=1e-5)
  np.testing.assert_allclose(layers[0].mean(-1), 0.0, atol=1e-4)


def test_vit_non_square_pixels_resample_like_reference(tiny):
  """A 32x36 image floors to the stored 4x4 grid, yet the reference resamples (sf 4.1/4): so do we."""
  model, params = tiny
  images = jax.random.normal(jax.random.key(2), (1, 32, 36, 3))
  tokens = model.apply({"params": params}, images, method=model.prepare_tokens)
  square = model.apply({"params": params}, images[:, :, :32], method=model.prepare_tokens)
  assert tokens.shape == square.shape and not np.allclose(tokens, square)


def test_drop_path_identity_in_eval_random_in_train(tiny):
  plain, params = tiny
  model = VisionTransformer(**TINY, drop_path_rate=0.5)
  images = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))

  @jax.jit
  def forward(key):
    return (
      plain.apply({"params": params}, images),
      model.apply({"params": params}, images),
      model.apply({"params": params}, images, train=True, rngs={"drop_path": key}),
    )

  reference, evaluated, first = forward(jax.random.key(4))
  np.testing.assert_array_equal(evaluated, reference)
  _, _, again = forward(jax.random.key(4))
  _, _, other = forward(jax.random.key(5))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  with pytest.raises(Exception, match="drop_path"):
    model.apply({"params": params}, images, train=True)


class Dropper(nn.Module):
  rate: float

  def __call__(self, x, train):
    return drop_path(self, x, self.rate, train)


def test_drop_path_is_per_sample_and_rescaled():
  ones = jnp.ones((256, 3, 4))
  out = np.asarray(Dropper(0.25).apply({}, ones, True, rngs={"drop_path": jax.random.key(0)}))
  per_sample = out.reshape(256, -1)
  assert np.all(per_sample == per_sample[:, :1])  # a whole sample is dropped or kept
  assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}  # kept ones scaled by 1/keep_prob
  assert abs(float((per_sample[:, 0] == 0).mean()) - 0.25) < 0.08
  np.testing.assert_array_equal(Dropper(0.25).apply({}, ones, False), ones)


def test_last_selfattention_rows_sum_to_one(tiny):
  model, params = tiny
  images = jax.random.normal(jax.random.key(6), (2, 40, 48, 3))
  attn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.get_last_selfattention))(params, images)
  assert attn.shape == (2, 2, 31, 31) and attn.dtype == jnp.float32
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  assert float(attn.min()) >= 0.0


def test_fused_attention_and_bf16_paths_match_xla_float32(tiny):
  """ "cudnn" (jax.nn.dot_product_attention; XLA on CPU) equals the einsum path; bf16 compute keeps float32
  params and outputs and stays close."""
  model, params = tiny
  fused = VisionTransformer(**TINY, attention="cudnn")
  fused_half = VisionTransformer(**TINY, attention="cudnn", dtype=jnp.bfloat16)
  images = jax.random.normal(jax.random.key(7), (2, 40, 40, 3))
  expected, got, half = jax.jit(lambda p, x: tuple(m.apply({"params": p}, x) for m in (model, fused, fused_half)))(
    params, images
  )
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, expected, atol=0.1)
  assert not np.array_equal(half, expected)  # bf16 really was used
  with pytest.raises(ValueError, match="attention"):
    VisionTransformer(**TINY, attention="flash").apply({"params": params}, images)


def test_vit_factory():
  model = vit("small", patch_size=8)
  assert (model.embed_dim, model.depth, model.num_heads, model.patch_size) == (384, 12, 6, 8)
  assert vit("vit_tiny").embed_dim == VIT_ARCHS["tiny"]["embed_dim"]
  with pytest.raises(ValueError, match="huge"):
    vit("huge")


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head(norm_last_layer):
  head = DINOHead(out_dim=64, hidden_dim=24, bottleneck_dim=8, norm_last_layer=norm_last_layer)
  features = 10.0 * jax.random.normal(jax.random.key(9), (5, 32))
  params = jax.jit(head.init)(jax.random.key(0), features)["params"]
  assert set(params) == {"mlp_0", "mlp_1", "mlp_2", "last_layer_v"} | (set() if norm_last_layer else {"last_layer_g"})
  assert params["mlp_0"]["kernel"].shape == (32, 24) and params["mlp_2"]["kernel"].shape == (24, 8)
  assert params["last_layer_v"].shape == (8, 64)
  scaled_g = {**params, "last_layer_g": 3.0 * params.get("last_layer_g", 1.0)}
  scaled_v = {**params, "last_layer_v": 7.0 * params["last_layer_v"]}
  if norm_last_layer:
    del scaled_g["last_layer_g"]
  apply = jax.jit(lambda p: head.apply({"params": p}, features))
  logits = apply(params)
  assert logits.shape == (5, 64) and logits.dtype == jnp.float32
  # Unit-norm bottleneck times unit-norm weight columns: |logit| <= g = 1.
  assert float(jnp.abs(logits).max()) <= 1.0 + 1e-5
  # The weight is normalised: scaling v changes nothing; g (when it exists) scales the logits.
  np.testing.assert_allclose(apply(scaled_v), logits, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(apply(scaled_g), logits * (1.0 if norm_last_layer else 3.0), rtol=1e-5, atol=1e-6)
