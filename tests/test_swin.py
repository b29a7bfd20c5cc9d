"""SwinV2 + FPN + segmentation head against the PyTorch reference (benchmarks/torch_swin.py, torchvision's
swin_v2 / FeaturePyramidNetwork rewritten with their key names), and the weights bridge for torchvision and
Satlas layouts.

Time goes into XLA compiles (a few seconds per Swin block on this CPU), so: the 8-block model is compiled
once per image size, the classifier / torchvision-layout tests use a 2-block model, small modules run
eagerly, and params always come from the torch models through the bridge, never from a jitted init.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import torch_swin as ts  # noqa: E402

from jaxgeo import bridge  # noqa: E402
from jaxgeo.bridge import common  # noqa: E402
from jaxgeo.bridge import swin as bswin  # noqa: E402
from jaxgeo.models import fpn, swin  # noqa: E402

ATOL = 1e-4
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
MINI = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2))  # torchvision layout, 2 stages, for cheap compiles


# Every graph here runs once: LLVM's optimisations cost more than they save (an 8-block model compiles in about
# 8 s instead of 19 s on this CPU; results agree to float32 rounding).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run(fn, *args):
  """jax.jit(fn)(*args), compiled with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def forward(model, variables, images, **kwargs):
  return run(lambda v, x: model.apply(v, x, **kwargs), variables, images)


def randomize(module, seed):
  """Weights far from their init, so that every rule shows: logit scales on both sides of the log(100) clamp,
  a nonzero stored k-bias (which must be ignored), LayerNorm affines away from 1/0, a varied position MLP."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      if name.endswith("logit_scale"):
        param.copy_(torch.rand(param.shape, generator=generator) * 5.0 + 0.5)
      elif param.ndim == 1 and "norm" in name or name.startswith(("features.0.2", "backbone.features.0.2")):
        param.copy_(param + 0.2 * torch.randn(param.shape, generator=generator))
      elif param.ndim == 1:
        param.copy_(0.1 * torch.randn(param.shape, generator=generator))
      elif "cpb_mlp" in name:
        param.copy_(0.3 * torch.randn(param.shape, generator=generator))
  return module.eval()


def numpy_state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def nhwc(tensor):
  return tensor.permute(0, 2, 3, 1).numpy()


def assert_close(torch_value, jax_value, what, atol=ATOL):
  np.testing.assert_allclose(np.asarray(jax_value), torch_value, rtol=0, atol=atol, err_msg=what)


def assert_trees_equal(a, b):
  flat_a, flat_b = common.flatten(dict(a)), common.flatten(dict(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


@pytest.fixture(scope="module")
def seg():
  """A 4-band torch SegmentationModel with random weights and its jaxgeo twin loaded through the bridge."""
  torch_model = randomize(ts.SegmentationModel(5, in_chans=4, fpn_channels=16, head_channels=16, **SMALL), 0)
  state = numpy_state(torch_model)
  model, variables, info = bridge.segmentation_from_torch(state)
  return torch_model, state, model, variables, info


def satlas_state(state, multi_image=False, old_fpn_keys=False):
  """A Satlas checkpoint layout around the fixture's weights: the Swin under backbone.backbone.[backbone.],
  its unused torchvision norm/head, the FPN under intermediates.0.fpn., a task head under heads.0."""
  prefix = "backbone.backbone.backbone." if multi_image else "backbone.backbone."
  out = {prefix + k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
  out[prefix + "norm.weight"], out[prefix + "norm.bias"] = np.ones(256, np.float32), np.zeros(256, np.float32)
  out[prefix + "head.weight"], out[prefix + "head.bias"] = np.zeros((1000, 256), np.float32), np.zeros(1000, np.float32)
  for key, value in state.items():
    if key.startswith("fpn."):
      name = key[len("fpn.") :].replace(".0.", ".") if old_fpn_keys else key[len("fpn.") :]
      out["intermediates.0.fpn." + name] = value
  out["heads.0.layers.0.0.weight"] = np.zeros((16, 16, 3, 3), np.float32)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(256, 256), (100, 132)], ids=["256px", "100x132-padded"])
def test_stages_pyramid_and_logits_match_torch(seg, size):
  """256 px: every stage map a multiple of the window, stage 4 (8x8) unshifted. 100x132: stage maps 25x33,
  13x17, 7x9, 4x5: odd sizes for PatchMergingV2, padding with shift, and a map smaller than the window."""
  torch_model, _, model, variables, _ = seg
  images = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    logits, parts = torch_model(images, return_intermediates=True)
  jax_logits, jax_parts = forward(model, variables, nhwc(images), return_intermediates=True)
  expected_sizes = {
    (256, 256): [(64, 64), (32, 32), (16, 16), (8, 8)],
    (100, 132): [(25, 33), (13, 17), (7, 9), (4, 5)],
  }
  expected_sizes = expected_sizes[size]
  for stage, (want, got) in enumerate(zip(parts["stages"], jax_parts["stages"])):
    assert got.shape[1:3] == expected_sizes[stage] and got.dtype == jnp.float32
    assert_close(want.numpy(), got, f"stage {stage}")
  for level, (want, got) in enumerate(zip(parts["pyramid"], jax_parts["pyramid"])):
    assert_close(nhwc(want), got, f"FPN level {level}")
  assert jax_logits.shape == (2, *size, 5) and jax_logits.dtype == jnp.float32
  assert_close(nhwc(logits), jax_logits, "logits")


def _attention_params(torch_attention):
  state = {f"features.1.0.attn.{k}": v for k, v in numpy_state(torch_attention).items()}
  flat, unmapped = bswin.swin_to_flax(state, window_size=torch_attention.window)
  assert not unmapped
  return {"params": common.unflatten({k[1:]: v for k, v in flat.items()})["features_1_0"]["attn"]}


@pytest.mark.parametrize(("height", "width", "shifted"), [(7, 7, False), (12, 12, True)], ids=["covered", "padded"])
def test_window_attention_shift_rule_matches_torch(height, width, shifted):
  """7x7 pads to one 8x8 window: the shift is switched off, so a shifted block is bit-identical to an
  unshifted one. 12x12 pads to 16x16 and shifts. (The model parity at 100x132 covers the other cases.)"""
  torch_attention = randomize(ts.ShiftedWindowAttentionV2(16, 8, 4, 2), 2)
  variables = _attention_params(torch_attention)
  x = torch.randn(2, height, width, 16, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    want = torch_attention(x).numpy()
  got = run(swin.WindowAttentionV2(2, 8, 4).apply, variables, x.numpy())
  assert_close(want, got, f"attention on {height}x{width}")
  unshifted = run(swin.WindowAttentionV2(2, 8, 0).apply, variables, x.numpy())
  assert np.array_equal(np.asarray(unshifted), np.asarray(got)) != shifted


def test_window_layout_and_mask():
  assert swin.window_layout(7, 7, 8, 4) == (8, 8, 0, 0)
  assert swin.window_layout(3, 5, 8, 4) == (8, 8, 0, 0)  # smaller than the window: padded, never clamped
  assert swin.window_layout(8, 8, 8, 4) == (8, 8, 0, 0)
  assert swin.window_layout(12, 7, 8, 4) == (16, 8, 4, 0)
  assert swin.window_layout(64, 33, 8, 4) == (64, 40, 4, 4)
  mask = swin.shifted_window_mask(16, 16, 8, 4, 4)
  assert mask.shape == (4, 64, 64) and set(np.unique(mask)) == {0.0, -100.0}
  allowed = (mask == 0).sum(axis=-1)  # tokens each query may see, per window
  assert (allowed[0] == 64).all()  # top-left window: no wrapped-around tokens
  assert (allowed[1] == 32).all() and (allowed[2] == 32).all()  # right / bottom edge: two regions
  assert (allowed[3] == 16).all()  # the corner: four regions of 4x4
  np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))
  rows_only = swin.shifted_window_mask(16, 8, 8, 4, 0)
  assert rows_only.shape == (2, 64, 64) and ((rows_only[1] == 0).sum(-1) == 32).all()


def test_fpn_and_head_variants_match_torch():
  """levels (1, 2, 3) with concat fusion, on odd map sizes where torch's nearest rule is not a 2x repeat."""
  generator = torch.Generator().manual_seed(4)
  torch_fpn = ts.FeaturePyramidNetwork([64, 128, 256], 16)
  torch_head = ts.SegmentationHead(16, 3, 8, "concat", 3)
  for module in (torch_fpn, torch_head):
    with torch.no_grad():
      for param in module.parameters():
        param.copy_(0.2 * torch.randn(param.shape, generator=generator))
  sizes, image_size = [(13, 17), (7, 9), (4, 5)], (100, 132)
  features = [torch.randn(2, c, *s, generator=generator) for c, s in zip((64, 128, 256), sizes)]
  with torch.no_grad():
    pyramid = torch_fpn(features)
    logits = torch_head(pyramid, image_size)
  fpn_params = common.unflatten(bswin._part_to_flax(numpy_state(torch_fpn), bswin.FPN, "fpn")[0])["params"]["fpn"]
  head_params = common.unflatten(bswin._part_to_flax(numpy_state(torch_head), bswin.HEAD, "head")[0])["params"]
  jax_pyramid = run(fpn.FeaturePyramidNetwork(16).apply, {"params": fpn_params}, [nhwc(f) for f in features])
  for level, (want, got) in enumerate(zip(pyramid, jax_pyramid)):
    assert_close(nhwc(want), got, f"FPN level {level}")
  head = fpn.SegmentationHead(3, 8, "concat")
  jax_logits = run(
    lambda v, p: head.apply(v, p, image_size), {"params": head_params["head"]}, [nhwc(p) for p in pyramid]
  )
  assert_close(nhwc(logits), jax_logits, "head logits")


@pytest.mark.parametrize(("src", "dst"), [(4, 7), (13, 25), (5, 3)])
def test_resize_rules_match_torch(src, dst):
  x = torch.randn(1, 2, src, src + 1, generator=torch.Generator().manual_seed(src))
  size = (dst, dst + 2)
  near = F.interpolate(x, size=size, mode="nearest")
  linear = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
  got_near, got_linear = run(lambda v: (fpn.resize_nearest(v, size), fpn.resize_bilinear(v, size)), nhwc(x))
  np.testing.assert_array_equal(np.asarray(got_near), nhwc(near))
  assert_close(nhwc(linear), got_linear, "bilinear", atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Real configurations (shapes only)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("arch", "count", "tensors"), [("tiny", 28_351_570, 209), ("small", 49_737_442, 401), ("base", 87_930_848, 401)]
)
def test_real_arch_param_counts(arch, count, tensors):
  """torchvision's swin_v2_t/s/b parameter counts with the 1000-class head; eval_shape, nothing computed."""
  model = swin.swin_v2(f"swin_v2_{arch[0]}", num_classes=1000)
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  assert swin.param_count(shapes) == count and len(jax.tree.leaves(shapes)) == tensors
  if arch == "tiny":  # stage shapes, and every name maps onto a torchvision key of the same shape
    stages = jax.eval_shape(lambda v, x: model.apply(v, x, features_only=True), shapes, images)
    assert [s.shape for s in stages] == [(1, 64, 64, 96), (1, 32, 32, 192), (1, 16, 16, 384), (1, 8, 8, 768)]
    exported = bridge.swin_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes["params"]))
    assert len(exported) == 233  # torchvision's 209 parameters + 2 buffers in each of the 12 blocks
    published = {  # torchvision's swin_v2_t parameter table
      "features.0.0.weight": (96, 3, 4, 4),
      "features.1.0.attn.qkv.weight": (288, 96),
      "features.1.0.attn.logit_scale": (3, 1, 1),
      "features.1.0.attn.cpb_mlp.0.weight": (512, 2),
      "features.5.5.attn.cpb_mlp.2.weight": (12, 512),
      "features.5.5.mlp.3.weight": (384, 1536),
      "features.6.reduction.weight": (768, 1536),
      "features.7.1.attn.relative_position_index": (4096,),
      "features.7.1.attn.relative_coords_table": (1, 15, 15, 2),
      "head.weight": (1000, 768),
    }
    assert {k: exported[k].shape for k in published} == published


def test_drop_path_rates_follow_torchvision():
  reference = ts.SwinTransformerV2(8, (2, 2, 18, 2), (1, 1, 1, 1), None, stochastic_depth_prob=0.3)
  torch_rates = [block.stochastic_depth.p for stage in reference.features[1::2] for block in stage]
  ours = [rate for stage in swin.drop_path_rates((2, 2, 18, 2), 0.3) for rate in stage]
  np.testing.assert_allclose(ours, torch_rates, rtol=0, atol=1e-12)
  assert ours[0] == 0.0 and ours[-1] == pytest.approx(0.3)


def test_stochastic_depth_is_per_sample(seg):
  _, _, _, variables, _ = seg
  block_params = {"params": variables["params"]["backbone"]["features_1_1"]}
  x = np.random.default_rng(5).standard_normal((32, 4, 4, 32)).astype(np.float32)
  block = swin.SwinBlockV2(2, 8, 4, drop_path_rate=0.5)
  out = np.asarray(run(lambda v, x: block.apply(v, x, True, rngs={"drop_path": jax.random.key(0)}), block_params, x))
  untouched = [np.array_equal(out[i], x[i]) for i in range(32)]  # both branches dropped for that sample
  assert 2 <= sum(untouched) <= 16  # 8 expected (both of two p=0.5 draws)


def test_imagenet_backbone_to_segmentation_and_bfloat16(mini):
  """An ImageNet classifier file (torchvision layout) as a segmentation backbone: FPN and head initialised,
  the classifier ignored; bf16 compute keeps float32 logits close to the float32 ones."""
  _, state = mini
  model, variables, info = bridge.segmentation_from_torch(state, num_classes=3)
  assert (model.levels, model.fpn_channels, model.in_chans) == ((0, 1), 128, 3)
  assert info["loaded"] == ["backbone"] and info["initialised"] == ["fpn", "head"]
  assert {"norm.weight", "head.weight"} <= set(info["ignored"]) and info["input_scaling"]["kind"] == "imagenet"
  reference = ts.SegmentationModel(3, levels=(0, 1), **MINI)  # the initialised FPN and head export too
  reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in bridge.to_torch_state_dict(variables).items()})
  images = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(6))
  with torch.no_grad():
    want = nhwc(reference.eval()(images))
  low = forward(model.clone(dtype=jnp.bfloat16), variables, nhwc(images))
  assert low.shape == (1, 32, 48, 3) and low.dtype == jnp.float32
  assert np.abs(np.asarray(low) - want).max() < 0.05 * np.abs(want).max()


def test_from_config_and_bad_inputs(seg):
  config = fpn.model_config("swin_v2_t", num_classes=5, in_chans=4)
  model = fpn.from_config(config)
  assert (model.depths, model.embed_dim, model.drop_path_rate, model.fpn_channels) == ((2, 2, 6, 2), 96, 0.2, 128)
  config.depths, config.embed_dim, config.num_heads, config.drop_path_rate = (2, 2, 2, 2), 32, (2, 4, 8, 16), 0.0
  assert fpn.from_config(config).depths == (2, 2, 2, 2)
  config.fusion = "mean"
  with pytest.raises(ValueError, match="config.model.fusion"):
    fpn.from_config(config)
  _, _, seg_model, variables, _ = seg
  with pytest.raises(ValueError, match="not a multiple of the patch size"):
    seg_model.apply(variables, np.zeros((1, 30, 32, 4), np.float32))
  with pytest.raises(ValueError, match="takes 4 bands"):
    seg_model.apply(variables, np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="levels"):
    seg_model.clone(levels=(2, 1)).apply(variables, np.zeros((1, 32, 32, 4), np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Bridge
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini():
  torch_model = randomize(ts.SwinTransformerV2(num_classes=10, **MINI), 7)
  return torch_model, numpy_state(torch_model)


def test_torchvision_checkpoint_round_trip(mini, tmp_path):
  torch_model, original = mini
  path = tmp_path / "swin_v2_mini.pth"
  torch.save(torch_model.state_dict(), path)
  model, variables, info = bridge.swin_v2_from_torch(str(path))  # through the safe .pth reader
  assert (model.num_classes, model.depths, model.num_heads, model.embed_dim) == (10, (1, 1), (1, 2), 16)
  assert info["layout"] == "torchvision" and info["input_scaling"]["kind"] == "imagenet"
  assert info["input_scaling"]["guessed"]  # an RGB torchvision file may also be a TorchGeo Satlas re-host
  assert bridge.swin_v2_from_torch(original, input_scaling="unit")[2]["input_scaling"]["kind"] == "unit"
  assert info["input_scaling"]["mean"] == pytest.approx(bswin.IMAGENET_MEAN)
  images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(8))
  with torch.no_grad():
    logits = torch_model(images).numpy()
  assert_close(logits, run(model.apply, variables, nhwc(images)), "classifier logits")
  exported = bridge.to_torch_state_dict(variables)  # buffers included: strict load into torchvision works
  assert exported.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
  fresh = ts.SwinTransformerV2(num_classes=10, **MINI)
  fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in exported.items()})


def test_segmentation_export_round_trip(seg, tmp_path):
  _, state, model, variables, info = seg
  assert info["loaded"] == ["backbone", "fpn", "head"] and info["initialised"] == []
  exported = bridge.to_torch_state_dict(variables)
  assert exported.keys() == state.keys()
  for key in state:
    np.testing.assert_array_equal(exported[key], state[key], err_msg=key)
  fresh = ts.SegmentationModel(5, in_chans=4, fpn_channels=16, head_channels=16, **SMALL)
  fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in exported.items()})  # strict
  again_model, again, _ = bridge.segmentation_from_torch(exported)
  assert again_model == model
  assert_trees_equal(again, variables)
  path = tmp_path / "seg.safetensors"  # the jaxgeo file format
  bridge.save_jax_file(model, variables, path)
  loaded_model, loaded = bridge.load_jax_file(path)
  assert loaded_model == model
  assert_trees_equal(loaded, variables)
  from_file_model, from_file, file_info = bridge.segmentation_from_torch(str(path))
  assert from_file_model == model and file_info["layout"] == "jaxgeo"
  assert_trees_equal(from_file, variables)
  # Fine-tuning for another class count: everything but the head's classifier comes from the file.
  target = dict(variables["params"], head={"conv": {}, "classifier": {}})
  target["head"] = jax.tree.map(lambda v: np.full(v.shape[:-1] + (3,), 0.5, np.float32), variables["params"]["head"])
  target["head"]["conv"] = variables["params"]["head"]["conv"]
  params, load_info = bridge.load_segmentation_params(exported, target)
  assert load_info["initialised"] == ["head"] and "head.classifier.weight" in load_info["ignored"]
  assert_trees_equal(params["head"], target["head"])
  assert_trees_equal(params["fpn"], variables["params"]["fpn"])


@pytest.mark.parametrize(
  ("multi_image", "old_fpn_keys"), [(False, True), (True, False)], ids=["single-old-fpn-keys", "multi-new-fpn-keys"]
)
def test_satlas_checkpoint(seg, tmp_path, multi_image, old_fpn_keys):
  _, state, _, variables, _ = seg
  path = tmp_path / "satlas.pth"
  torch.save({k: torch.from_numpy(v) for k, v in satlas_state(state, multi_image, old_fpn_keys).items()}, path)
  # The trainer's path: a fresh model's params (here another head: 3 classes) filled from the checkpoint.
  target = dict(variables["params"])
  target["head"] = {
    "conv": variables["params"]["head"]["conv"],
    "classifier": {"kernel": np.ones((1, 1, 16, 3), np.float32), "bias": np.zeros(3, np.float32)},
  }
  params, info = bridge.load_segmentation_params(str(path), target)
  assert info["layout"] == "satlas" and info["input_scaling"]["kind"] == "unit"
  assert not info["input_scaling"]["guessed"]
  assert info["input_scaling"]["mean"] == (0.0,) * 4 and info["checkpoint_bands"] == 4
  assert info["loaded"] == ["backbone", "fpn"] and info["initialised"] == ["head"]
  assert "heads.0.layers.0.0.weight" in info["ignored"]
  assert any(k.endswith("backbone.norm.weight") for k in info["ignored"])
  assert_trees_equal(
    {"backbone": params["backbone"], "fpn": params["fpn"]},
    {
      "backbone": variables["params"]["backbone"],
      "fpn": variables["params"]["fpn"],
    },
  )
  assert_trees_equal(params["head"], target["head"])


def test_band_adaptation_and_selection(seg):
  rgb = numpy_state(randomize(ts.SwinTransformerV2(num_classes=None, **MINI), 10))
  kernel = rgb["features.0.0.weight"].transpose(2, 3, 1, 0)
  model, variables, info = bridge.swin_v2_from_torch(rgb, in_chans=4)
  assert info["features_only"] and model.num_classes is None
  adapted = variables["params"]["features_0_0"]["kernel"]
  np.testing.assert_array_equal(adapted, common.adapt_input_kernel(kernel, 4))
  assert info["in_chans"] == 4 and info["input_scaling"]["mean"] == pytest.approx((0.485, 0.456, 0.406, 0.485))
  _, state, _, _, _ = seg  # Satlas-style N-band weights: pick bands 3 and 1 of the 4
  _, picked, picked_info = bridge.swin_v2_from_torch(satlas_state(state), band_indices=(3, 1))
  four = state["backbone.features.0.0.weight"].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(picked["params"]["features_0_0"]["kernel"], four[:, :, [3, 1]])
  assert picked_info["in_chans"] == 2 and picked_info["input_scaling"]["std"] == (1.0, 1.0)


def test_mismatches_are_listed_with_file_names(seg):
  _, state, _, _, _ = seg
  broken = satlas_state(state)
  del broken["backbone.backbone.features.3.1.norm2.weight"]
  broken["backbone.backbone.features.1.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  broken["intermediates.0.fpn.layer_blocks.0.0.weight"] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(common.StateDictMismatchError) as error:
    bridge.segmentation_from_torch(broken, num_classes=5)
  message = str(error.value)
  assert "Missing key(s) (1): backbone.backbone.features.3.1.norm2.weight" in message
  assert "backbone.backbone.features.1.0.attn.extra.weight" in message
  assert "intermediates.0.fpn.layer_blocks.0.0.weight: checkpoint (1, 1, 16, 16), model (3, 3, 16, 16)" in message
  both_forms = dict(state, **{"fpn.inner_blocks.1.weight": state["fpn.inner_blocks.1.0.weight"]})
  with pytest.raises(common.StateDictMismatchError, match="fpn.inner_blocks.1.0.weight, fpn.inner_blocks.1.weight"):
    bridge.segmentation_from_torch(both_forms)
  bad_buffer = dict(state)
  bad_buffer["backbone.features.1.0.attn.relative_coords_table"] = np.zeros((1, 15, 15, 2), np.float32)
  with pytest.raises(common.StateDictMismatchError, match="relative_coords_table: differs"):
    bridge.segmentation_from_torch(bad_buffer)
  with pytest.raises(common.StateDictMismatchError, match="features.0.0.weight"):
    bridge.segmentation_from_torch({"conv1.weight": np.zeros((4, 3, 7, 7), np.float32)}, num_classes=2)


def test_gradient_is_finite_and_matches_torch_with_padded_windows(mini):
  """A 40 px input gives a 10x10 stage map in windows of 8: padded tokens have zero keys, and normalising a zero
  vector must have torch's finite gradient (a sqrt-based norm gives NaN for every parameter)."""
  torch_model, state = mini
  model, variables, _ = bridge.swin_v2_from_torch(state)
  images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
  weights = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
  torch_model.zero_grad()
  (torch_model(images) * weights).sum().backward()
  torch_norm = sum(float((p.grad.double() ** 2).sum()) for p in torch_model.parameters() if p.grad is not None)

  def loss(v):
    return jnp.sum(model.apply(v, jnp.asarray(nhwc(images))) * jnp.asarray(weights.numpy()))

  grads = run(jax.grad(loss), variables)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  jax_norm = sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in leaves)
  np.testing.assert_allclose(jax_norm, torch_norm, rtol=1e-4)
