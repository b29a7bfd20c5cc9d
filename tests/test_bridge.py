"""jaxgeo.bridge against project-written PyTorch models with the reference key names (tests/torch_reference.py).

Each model family gets one session fixture (torch model, random weights, files in every supported layout) so
that XLA compiles each forward once.
"""

import argparse
import functools
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as ref  # noqa: E402

from jaxgeo import bridge  # noqa: E402
from jaxgeo.bridge import common  # noqa: E402
from jaxgeo.bridge.__main__ import main as cli  # noqa: E402
from jaxgeo.models.resnet import ResNet50, adapter_param_labels  # noqa: E402
from jaxgeo.models.vit import vit  # noqa: E402

ATOL = 1e-5


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("features",))
def forward(model, variables, images, features=False):
  if features:
    return model.apply(variables, images, return_features=True)
  return model.apply(variables, images)


def nhwc(images):
  return images.permute(0, 2, 3, 1).numpy()


def torch_out(module, images):
  with torch.no_grad():
    return module(images).numpy()


def assert_trees_equal(a, b):
  flat_a, flat_b = common.flatten(dict(a)), common.flatten(dict(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


# ---------------------------------------------------------------------------------------------------------------
# DINO ViT
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dino(tmp_path_factory):
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("dino")
  make = lambda seed, norm_last: ref.randomize(
    ref.MultiCropWrapper(ref.VisionTransformer(depth=3), ref.DINOHead(192, 100, norm_last_layer=norm_last)), seed
  )
  teacher, student = make(1, True), make(2, False)
  with torch.no_grad():  # a trained student with norm_last_layer=False has g != 1
    student.head.last_layer.weight_g.uniform_(0.5, 1.5)
  files = {
    "bare": root / "dino_vittiny16_pretrain.pth",
    "full": root / "checkpoint.pth",
    "safetensors": root / "backbone.safetensors",
  }
  torch.save(teacher.backbone.state_dict(), files["bare"])
  torch.save(
    {
      "student": {f"module.{k}": v for k, v in student.state_dict().items()},
      "teacher": teacher.state_dict(),
      "epoch": 7,
      "dino_loss": {"center": torch.randn(1, 100)},
      "optimizer": torch.optim.AdamW(student.parameters()).state_dict(),
      "args": argparse.Namespace(arch="vit_tiny", patch_size=16, lr=5e-4, norm_last_layer=False),
    },
    files["full"],
  )
  from safetensors.torch import save_file

  save_file({k: v.contiguous() for k, v in teacher.backbone.state_dict().items()}, files["safetensors"])
  images = {size: torch.randn(2, 3, size, size) for size in (224, 120)}
  return dict(teacher=teacher, student=student, files=files, images=images, root=root)


@pytest.mark.parametrize("size", [224, 120])
def test_vit_bare_backbone_matches_reference(dino, size):
  model, variables = bridge.dino_vit_from_torch(dino["files"]["bare"])
  assert (model.embed_dim, model.depth, model.num_heads, model.patch_size, model.pos_grid) == (192, 3, 3, 16, 14)
  got = forward(model, variables, nhwc(dino["images"][size]))
  np.testing.assert_allclose(got, torch_out(dino["teacher"].backbone, dino["images"][size]), atol=ATOL, rtol=0)


def test_full_checkpoint_teacher_by_default_student_on_request(dino):
  images = dino["images"][120]
  model, teacher = bridge.dino_vit_from_torch(dino["files"]["full"])
  np.testing.assert_allclose(
    forward(model, teacher, nhwc(images)), torch_out(dino["teacher"].backbone, images), atol=ATOL, rtol=0
  )
  model, student = bridge.dino_vit_from_torch(dino["files"]["full"], which="student")
  np.testing.assert_allclose(
    forward(model, student, nhwc(images)), torch_out(dino["student"].backbone, images), atol=ATOL, rtol=0
  )
  args = bridge.load_state(dino["files"]["full"])["args"]
  assert isinstance(args, argparse.Namespace) and args.arch == "vit_tiny"


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_dino_head_matches_reference(dino, which):
  model, variables = bridge.dino_vit_from_torch(dino["files"]["full"], which=which, load_head=True)
  assert model.head.norm_last_layer == (which == "teacher")  # student's g was trained, so it is kept
  assert ("last_layer_g" in variables["params"]["head"]) == (which == "student")
  images = dino["images"][224]
  np.testing.assert_allclose(forward(model, variables, nhwc(images)), torch_out(dino[which], images), atol=ATOL, rtol=0)


def test_safetensors_and_state_dict_inputs_load_the_same(dino):
  _, from_pth = bridge.dino_vit_from_torch(dino["files"]["bare"])
  _, from_safetensors = bridge.dino_vit_from_torch(dino["files"]["safetensors"])
  _, from_dict = bridge.dino_vit_from_torch(dino["teacher"].backbone.state_dict())
  assert_trees_equal(from_pth, from_safetensors)
  assert_trees_equal(from_pth, from_dict)


def test_arch_and_patch_size_inferred_from_shapes():
  def fake_state(dim, depth, patch, grid):
    shapes = {
      "cls_token": (1, 1, dim),
      "pos_embed": (1, 1 + grid * grid, dim),
      "patch_embed.proj.weight": (dim, 3, patch, patch),
      "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
      shapes.update(
        {
          f"blocks.{i}.attn.qkv.weight": (3 * dim, dim),
          f"blocks.{i}.attn.qkv.bias": (3 * dim,),
          f"blocks.{i}.mlp.fc1.weight": (4 * dim, dim),
        }
      )
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}

  info = bridge.vit.infer_vit_config(fake_state(384, 12, 8, 28))
  assert info["arch"] == "small"
  assert info["config"] == dict(
    embed_dim=384, depth=12, num_heads=6, patch_size=8, pos_grid=28, mlp_ratio=4.0, qkv_bias=True
  )
  assert bridge.vit.infer_vit_config(fake_state(768, 12, 16, 14))["config"]["num_heads"] == 12


def test_strict_loading_lists_every_problem_by_name(dino):
  state = {k: v.numpy() for k, v in dino["teacher"].backbone.state_dict().items()}
  del state["blocks.1.mlp.fc2.bias"]
  state["blocks.0.attn.extra.weight"] = np.zeros((3, 3), np.float32)
  state["norm.weight"] = np.ones(7, np.float32)
  with pytest.raises(bridge.StateDictMismatchError) as err:
    bridge.dino_vit_from_torch(state)
  message = str(err.value)
  for name in ("blocks.1.mlp.fc2.bias", "blocks.0.attn.extra.weight", "norm.weight: checkpoint (7,)"):
    assert name in message
  state["norm.weight"] = np.ones(192, np.float32)
  with pytest.raises(bridge.StateDictMismatchError, match="blocks.1.mlp.fc2.bias"):
    bridge.dino_vit_from_torch(state, allow_unexpected=["blocks.0.attn.extra.*"])
  _, variables = bridge.dino_vit_from_torch(
    state, allow_missing=["blocks.1.mlp.fc2.bias"], allow_unexpected=["blocks.0.attn.extra.*"]
  )
  assert variables["params"]["blocks_1"]["mlp"]["fc2"]["bias"].shape == (192,)
  bridge.dino_vit_from_torch(state, strict=False)
  with pytest.raises(bridge.StateDictMismatchError, match="patch_embed.proj.weight"):
    bridge.dino_vit_from_torch(state, strict=False, patch_size=8)


def test_in_chans_adaptation_keeps_tiled_rgb_outputs(dino):
  """The rule (tile RGB kernels, scale by 3/N) makes an image whose bands repeat R,G,B give the RGB output."""
  images = dino["images"][120]
  model, variables = bridge.dino_vit_from_torch(dino["files"]["bare"], in_chans=12)
  assert variables["params"]["patch_embed"]["proj"]["kernel"].shape == (16, 16, 12, 192)
  tiled = nhwc(images)[..., [0, 1, 2] * 4]
  np.testing.assert_allclose(
    forward(model, variables, tiled), torch_out(dino["teacher"].backbone, images), atol=1e-4, rtol=0
  )
  grey = common.adapt_input_kernel(np.ones((2, 2, 3, 5)), 1)
  np.testing.assert_array_equal(grey, np.full((2, 2, 1, 5), 3.0))


def test_load_vit_backbone_params_into_fresh_tree(dino):
  target_model = vit("tiny", depth=3, pos_grid=7)
  fresh = jax.eval_shape(target_model.init, jax.random.key(0), np.zeros((1, 112, 112, 12), np.float32))["params"]
  wrapped = {"backbone": fresh, "head": {"marker": np.arange(3)}}
  loaded = bridge.load_vit_backbone_params(str(dino["files"]["full"]), wrapped)
  assert jax.tree.map(np.shape, loaded["backbone"]) == jax.tree.map(lambda s: s.shape, fresh)
  np.testing.assert_array_equal(loaded["head"]["marker"], np.arange(3))
  _, teacher = bridge.dino_vit_from_torch(dino["files"]["full"])
  np.testing.assert_array_equal(
    loaded["backbone"]["blocks_2"]["attn"]["qkv"]["kernel"], teacher["params"]["blocks_2"]["attn"]["qkv"]["kernel"]
  )
  # 224 px grid (14x14) resampled to the target's 7x7 exactly as the model would at 112 px input.
  expected = bridge.vit.resample_pos_encoding(teacher["params"]["pos_embed"], 7, 7)
  np.testing.assert_allclose(loaded["backbone"]["pos_embed"], expected, atol=1e-6)


def test_vit_export_roundtrip_loads_strict_into_torch(dino, tmp_path):
  _, variables = bridge.dino_vit_from_torch(dino["files"]["full"], which="student", load_head=True)
  state = bridge.to_torch_state_dict(variables)
  wrapper = ref.MultiCropWrapper(ref.VisionTransformer(depth=3), ref.DINOHead(192, 100, norm_last_layer=False))
  wrapper.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  for key, value in dino["student"].state_dict().items():
    np.testing.assert_array_equal(wrapper.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  bridge.save_state_dict(state, tmp_path / "export.safetensors")
  bridge.save_state_dict(state, tmp_path / "export.pth")
  for path in ("export.safetensors", "export.pth"):
    _, again = bridge.dino_vit_from_torch(tmp_path / path, load_head=True)
    assert_trees_equal(again, variables)
  bare = bridge.to_torch_state_dict(variables["params"]["backbone"])
  ref.VisionTransformer(depth=3).load_state_dict({k: torch.tensor(v) for k, v in bare.items()}, strict=True)


def test_cli_roundtrip(dino, tmp_path):
  cli(["to-jax", str(dino["files"]["full"]), str(tmp_path / "teacher.safetensors"), "--head"])
  model, variables = bridge.load_jax_file(tmp_path / "teacher.safetensors")
  assert isinstance(model, bridge.VitWithHead)
  cli(["to-torch", str(tmp_path / "teacher.safetensors"), str(tmp_path / "teacher.pth")])
  back = bridge.load_state(tmp_path / "teacher.pth")
  for key, value in dino["teacher"].state_dict().items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  with pytest.raises(ValueError, match="not a jaxgeo weights file"):
    bridge.load_jax_file(dino["files"]["safetensors"])


# ---------------------------------------------------------------------------------------------------------------
# ResNet-50
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def resnet(tmp_path_factory):
  """A torchvision RGB model with fc, and an SSL4EO-style 13-band MoCo v2 model (projector fc.0/fc.2) whose
  trunk is also saved with bare timm-style keys."""
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("resnet")
  net = ref.randomize(ref.ResNet50(fc=10), 3, torch.randn(4, 3, 64, 64))
  ssl = ref.randomize(ref.ResNet50(in_chans=13, fc=(32, 16)), 4, torch.randn(4, 13, 64, 64))
  files = {
    "torchvision": root / "resnet50.pth",
    "moco": root / "B13_rn50_moco_ckpt.pth.tar",
    "timm13": root / "ssl4eo_rn50_13band.safetensors",
  }
  torch.save(net.state_dict(), files["torchvision"])
  state = {f"module.encoder_q.{k}": v for k, v in ssl.state_dict().items()}
  state.update({f"module.encoder_k.{k}": v + 1 if v.is_floating_point() else v for k, v in ssl.state_dict().items()})
  state.update({"module.queue": torch.randn(16, 8), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
  torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}}}, files["moco"])
  from safetensors.torch import save_file

  save_file({k: v for k, v in ssl.state_dict().items() if not k.startswith("fc.")}, files["timm13"])
  return dict(net=net, ssl=ssl, files=files, images=torch.randn(2, 3, 64, 64))


def test_resnet50_torchvision_features_and_logits(resnet):
  model, variables = bridge.resnet50_from_torch(resnet["files"]["torchvision"])
  assert (model.head, model.num_classes) == ("linear", 10) and set(variables) == {"params", "batch_stats"}
  logits, features = forward(model, variables, nhwc(resnet["images"]), features=True)
  with torch.no_grad():
    want_features = resnet["net"].features(resnet["images"]).numpy()
  np.testing.assert_allclose(features["pooled"], want_features, atol=ATOL, rtol=0)
  np.testing.assert_allclose(logits, torch_out(resnet["net"], resnet["images"]), atol=ATOL, rtol=0)


def test_resnet50_moco_v2_13_band_query_encoder(resnet):
  images = torch.randn(2, 13, 64, 64)
  model, variables = bridge.resnet50_from_torch(resnet["files"]["moco"])
  assert (model.head, model.mlp_hidden, model.num_classes) == ("mlp", 32, 16)
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 13, 64)
  np.testing.assert_allclose(
    forward(model, variables, nhwc(images)), torch_out(resnet["ssl"], images), atol=ATOL, rtol=0
  )
  _, key_encoder = bridge.resnet50_from_torch(resnet["files"]["moco"], which="encoder_k", load_fc=False)
  assert "fc_0" not in key_encoder["params"]
  np.testing.assert_array_equal(key_encoder["params"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"] + 1)


def test_resnet50_timm_style_13_band(resnet):
  model, variables = bridge.resnet50_from_torch(resnet["files"]["timm13"])
  assert model.head is None
  _, moco = bridge.resnet50_from_torch(resnet["files"]["moco"], load_fc=False)
  assert_trees_equal(variables, moco)  # that trunk's forward is checked in the MoCo test
  # BigEarthNet L2A has 12 bands: drop B10 (index 10) of the L1C model.
  _, picked = bridge.resnet50_from_torch(resnet["files"]["timm13"], band_indices=[*range(10), 11, 12])
  np.testing.assert_array_equal(
    picked["params"]["conv1"]["kernel"][:, :, 10], variables["params"]["conv1"]["kernel"][:, :, 11]
  )


def test_resnet50_export_loads_strict_into_torch(resnet, tmp_path):
  _, variables = bridge.resnet50_from_torch(resnet["files"]["torchvision"])
  state = bridge.to_torch_state_dict(variables)
  net = ref.ResNet50(fc=10)
  net.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  for key, value in resnet["net"].state_dict().items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(net.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  bridge.save_state_dict(state, tmp_path / "rn.safetensors")
  _, again = bridge.resnet50_from_torch(tmp_path / "rn.safetensors")
  assert_trees_equal(again, variables)


def test_band_adapter_frozen_or_trainable():
  small = dict(stages=(1, 1, 1, 1), band_adapter=True)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 12)).astype(np.float32)
  frozen = ResNet50(freeze_adapter=True, **small)
  variables = jax.jit(frozen.init)(jax.random.key(0), images)
  assert variables["params"]["adapter_conv"]["kernel"].shape == (1, 1, 12, 3)

  def loss(params):
    out, updates = frozen.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
    return out.sum(), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert not np.any(grads["adapter_conv"]["kernel"]) and np.any(grads["conv1"]["kernel"])
  stats = lambda tree: tree["batch_stats"]["adapter_bn"]["mean"]
  np.testing.assert_array_equal(stats(updates), stats(variables))  # frozen BN keeps its running stats
  _, updates = ResNet50(**small).apply(variables, images, train=True, mutable=["batch_stats"])
  assert not np.array_equal(stats(updates), stats(variables))
  labels = adapter_param_labels(variables["params"])
  assert labels["adapter_conv"]["kernel"] == "frozen" and labels["conv1"]["kernel"] == "trainable"


def test_resnet50_band_adapter_in_front_of_pretrained_rgb(resnet):
  model, variables = bridge.resnet50_from_torch(resnet["files"]["torchvision"], band_adapter=True, in_chans=12)
  assert variables["params"]["adapter_conv"]["kernel"].shape == (1, 1, 12, 3)
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert "adapter.0.weight" in bridge.to_torch_state_dict(variables)


# ---------------------------------------------------------------------------------------------------------------
# Reader safety and formats
# ---------------------------------------------------------------------------------------------------------------


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, tmp_path / "evil.pth")
  with pytest.raises(bridge.UnsafeCheckpointError, match=r"refusing global '(os|posix)\.system' in checkpoint"):
    bridge.load_state(tmp_path / "evil.pth")
  with pytest.raises(bridge.UnsafeCheckpointError, match=r"refusing global '(os|posix)\.system'"):
    bridge.dino_vit_from_torch(str(tmp_path / "evil.pth"))
  # The same payload as the whole data.pkl of a hand-made archive, and as a legacy (non-zip) pickle.
  with zipfile.ZipFile(tmp_path / "evil2.pth", "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(_RunsCode(marker), protocol=2))
  with pytest.raises(bridge.UnsafeCheckpointError, match="system"):
    bridge.load_state(tmp_path / "evil2.pth")
  (tmp_path / "evil3.pth").write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
  with pytest.raises(bridge.UnsafeCheckpointError, match="system"):
    bridge.load_state(tmp_path / "evil3.pth")
  assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_reader_dtypes_views_and_containers(tmp_path, legacy):
  base = torch.randn(6, 5)
  obj = {
    "t": base.t(),
    "slice": base[2:, 1:3],
    "param": torch.nn.Parameter(torch.randn(3)),
    "bf16": torch.randn(4).to(torch.bfloat16),
    "f16": torch.randn(2, 2).half(),
    "i64": torch.arange(5),
    "bool": torch.tensor([True, False]),
    "u8": torch.arange(4, dtype=torch.uint8),
    "scalar": torch.tensor(2.0),
    "nested": [{"x": torch.ones(2)}, (3, "s")],
    "args": argparse.Namespace(lr=0.1, bands={1, 2}),
  }
  torch.save(obj, tmp_path / "x.pth", _use_new_zipfile_serialization=not legacy)
  got = bridge.load_state(tmp_path / "x.pth")
  for key in ("t", "slice", "param", "f16", "i64", "bool", "u8", "scalar"):
    want = obj[key].detach().numpy()
    assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
    np.testing.assert_array_equal(got[key], want, err_msg=key)
  assert str(got["bf16"].dtype) == "bfloat16"
  np.testing.assert_array_equal(got["bf16"].astype(np.float32), obj["bf16"].float().numpy())
  assert got["nested"][1] == (3, "s") and got["args"].bands == {1, 2}
