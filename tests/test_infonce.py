"""MoCo v2 core (jaxgeo.objectives.infonce, grouped BatchNorm in models/resnet.py) against a PyTorch MoCo written
from facebookresearch/moco (tests/torch_reference_moco.py): float32 to 1e-6 piece by piece; a whole ResNet step
to 1e-5 of the same step in float64 torch (see NET)."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
import torch_reference_moco as ref  # noqa: E402

from jaxgeo import bridge, parallel  # noqa: E402
from jaxgeo.models.resnet import BatchNorm, ResNet50  # noqa: E402
from jaxgeo.objectives import infonce  # noqa: E402

ATOL = RTOL = 1e-6
# Whole-network comparisons run the torch reference in float64 (the exact answer) and allow 1e-5: through a
# ResNet in float32, 1e-6 is below rounding (torch fp32 is 1-2e-6 from torch fp64 after one forward here).
# Measured over 10 random models for the step below: cosines within 2.7e-6 of fp64, params and running stats
# within 1.1e-6. Later steps are not comparable in float32 at all: rounding flips a few ReLU / max-pool
# decisions near their kinks, small BN groups amplify it, and conv1 then drifts from fp64 by up to 1e-3 in
# torch's fp32 as in jaxgeo's. At 32 px layer4 is 1x1 and a 2-sample group normalises two nearly equal numbers
# (1e-4 noise in either framework), hence 64 px. The mistakes these tests exist for (groups, biased running
# var, order of momentum update / enqueue, weight decay) move the compared values by > 1e-3.
NET = dict(rtol=1e-5, atol=1e-5)
PX = 64
# A ResNet-50 in shape (v1.5 bottlenecks, MoCo v2 MLP head) but one block per stage and 1/16 of the width.
TINY = dict(stages=(1, 1, 1, 1), width=4, head="mlp", mlp_hidden=32, num_classes=16)


def close(actual, expected, err_msg="", rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, err_msg=err_msg)


def mesh8():
  return parallel.make_mesh(types.SimpleNamespace(data=8, fsdp=1))


def torch_encoder(variables):
  """The torch ResNet of TINY's shape holding the given jaxgeo variables (through the bridge's key map)."""
  net = ref.ResNet(width=TINY["width"], stages=TINY["stages"], mlp_hidden=TINY["mlp_hidden"], dim=TINY["num_classes"])
  state = bridge.to_torch_state_dict(variables)
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  return net


def assert_state_equal(variables, net, what, **tolerance):
  want = {k: v.detach().numpy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
  got = bridge.to_torch_state_dict(variables)
  assert set(want) <= set(got), set(want) - set(got)
  for key, value in want.items():
    close(got[key], value, err_msg=f"{what}: {key}", **tolerance)


def images(seed, shape):
  # Offset and scaled like normalised imagery with a non-zero mean, so BN statistics have work to do.
  return (0.5 + 1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Logits, loss, accuracy
# ---------------------------------------------------------------------------------------------------------------


def test_logits_loss_accuracy_and_grad_match_torch():
  rng = np.random.default_rng(0)
  batch, dim, size, temperature = 16, 8, 64, 0.2
  # Raw embeddings of mixed norms (one all-zero row exercises normalize's eps); keys correlated with queries
  # so the positive is sometimes, not always, in the top 1 / top 5.
  direction = rng.standard_normal((batch, dim))
  query = (direction * rng.uniform(0.1, 10, (batch, 1))).astype(np.float32)
  query[3] = 0.0
  key = (direction + rng.standard_normal((batch, dim))).astype(np.float32)
  queue = np.asarray(infonce.init_queue(jax.random.key(1), dim, size))

  def jax_loss(query):
    logits, keys = infonce.contrastive_logits(query, key, queue, temperature)
    return infonce.infonce_loss(logits), (logits, keys)

  (loss, (logits, keys)), grad = jax.value_and_grad(jax_loss, has_aux=True)(jnp.asarray(query))
  untied = np.arange(batch) != 3  # the zero row ties every logit: torch.topk's order is arbitrary there
  accuracy = infonce.instance_accuracy(logits[untied])

  query_t = torch.tensor(query, requires_grad=True)
  q, k = F.normalize(query_t, dim=1), F.normalize(torch.tensor(key), dim=1)
  logits_t = torch.cat([torch.einsum("nc,nc->n", q, k)[:, None], q @ torch.tensor(queue)], dim=1) / temperature
  labels = torch.zeros(batch, dtype=torch.long)
  loss_t = torch.nn.CrossEntropyLoss()(logits_t, labels)
  loss_t.backward()
  acc1, acc5 = ref.accuracy(logits_t[untied], labels[untied], topk=(1, 5))

  assert logits.shape == (batch, 1 + size)
  close(logits, logits_t.detach())
  close(keys, k)
  close(loss, loss_t.detach())
  close(grad[untied], query_t.grad[untied])
  close(grad[3], query_t.grad[3], rtol=1e-5)  # x / eps below the eps: ~1e9, compared relatively
  assert float(accuracy["acc1"]) == pytest.approx(float(acc1)) and float(accuracy["acc5"]) == pytest.approx(float(acc5))
  assert 0 < float(acc1) < float(acc5) < 100  # the data really puts the positive at several ranks


def test_instance_accuracy_by_hand():
  logits = jnp.array([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]])  # ranks 0, 2, 1 (a tie: not first)
  accuracy = infonce.instance_accuracy(logits, topk=(1, 2, 3))
  assert [float(accuracy[f"acc{k}"]) for k in (1, 2, 3)] == pytest.approx([100 / 3, 200 / 3, 100.0])
  collapsed = infonce.instance_accuracy(jnp.zeros((4, 9)))
  assert float(collapsed["acc1"]) == float(collapsed["acc5"]) == 0.0


def test_init_queue_columns_are_normalised_gaussians():
  dim, size = 16, 512
  queue = np.asarray(infonce.init_queue(jax.random.key(3), dim, size))
  raw = np.asarray(jax.random.normal(jax.random.key(3), (dim, size)))
  assert queue.shape == (dim, size) and queue.dtype == np.float32
  close(queue, F.normalize(torch.tensor(raw), dim=0))  # along dim 0, as the reference's buffer
  np.testing.assert_allclose(np.linalg.norm(queue, axis=0), 1.0, atol=1e-6)
  assert abs(queue.mean()) < 0.02 and len(np.unique(queue[0])) == size


# ---------------------------------------------------------------------------------------------------------------
# Queue and pointer
# ---------------------------------------------------------------------------------------------------------------


def test_enqueue_pointer_wrap_by_hand():
  queue, ptr = jnp.zeros((2, 6)), jnp.int32(0)
  enqueue = jax.jit(infonce.enqueue)  # the pointer is traced, as in the train state
  seen = []
  for step in range(4):
    keys = jnp.array([[10.0 * step + 1, -1], [10.0 * step + 2, -2]])  # [B=2, dim=2]
    queue, ptr = enqueue(queue, ptr, keys)
    seen.append(int(ptr))
  assert seen == [2, 4, 0, 2]
  # Step 3 wrapped onto columns 0-1 and overwrote step 0's keys; step 1 and 2 keys are where they were put.
  np.testing.assert_array_equal(queue, [[31, 32, 11, 12, 21, 22], [-1, -2, -1, -2, -1, -2]])


def test_enqueue_matches_torch_over_a_wrap():
  dim, size, batch = 4, 12, 4
  moco = ref.MoCo(lambda: torch.nn.Linear(1, 1), dim=dim, K=size)
  queue, ptr = jnp.asarray(moco.queue.numpy()), jnp.int32(0)
  enqueue = jax.jit(infonce.enqueue)
  rng = np.random.default_rng(5)
  for _ in range(5):  # pointer 4, 8, 0, 4, 8: the third step wraps
    keys = rng.standard_normal((batch, dim)).astype(np.float32)
    queue, ptr = enqueue(queue, ptr, keys)
    moco.dequeue_and_enqueue(torch.tensor(keys))
    np.testing.assert_array_equal(queue, moco.queue.numpy())
    assert int(ptr) == int(moco.queue_ptr)


def test_size_checks_name_the_config_fields():
  infonce.check_sizes(queue_size=65536, global_batch_size=256, bn_group_size=64)
  with pytest.raises(ValueError, match=r"config\.moco\.queue_size=1000 .*config\.train\.global_batch_size=256"):
    infonce.check_sizes(queue_size=1000, global_batch_size=256)
  with pytest.raises(ValueError, match=r"queue_size=128 .*multiple"):
    infonce.check_sizes(queue_size=128, global_batch_size=256)
  with pytest.raises(ValueError, match=r"config\.moco\.bn_group_size=48"):
    infonce.check_sizes(queue_size=65536, global_batch_size=256, bn_group_size=48)
  with pytest.raises(ValueError, match="not a multiple"):
    infonce.enqueue(jnp.zeros((2, 10)), 0, jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"keys must be \[batch, 2\]"):
    infonce.enqueue(jnp.zeros((2, 8)), 0, jnp.zeros((4, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Momentum update and shuffle
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_variables():
  """Random TINY variables at He scale, with non-trivial BN affine params and running stats.

  Filled from numpy rather than by flax's init, whose compile alone costs ~12 s of CPU here."""
  abstract = jax.eval_shape(ResNet50(**TINY).init, jax.random.key(0), jax.ShapeDtypeStruct((2, PX, PX, 3), jnp.float32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    value = {
      "kernel": lambda: rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1])),
      "scale": lambda: 1.0 + 0.2 * rng.standard_normal(shape),
      "bias": lambda: 0.1 * rng.standard_normal(shape),
      "mean": lambda: 0.1 * rng.standard_normal(shape),
      "var": lambda: rng.uniform(0.5, 1.5, shape),
    }[name]()
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def test_momentum_update_matches_torch_and_leaves_batch_stats(tiny_variables):
  query = tiny_variables
  key = {"params": jax.tree.map(lambda p: p + 0.1, query["params"]), "batch_stats": query["batch_stats"]}
  moco = ref.MoCo(lambda: torch_encoder(query), dim=16, K=16, m=0.9)
  moco.encoder_k.load_state_dict(torch_encoder(key).state_dict())
  moco.momentum_update_key_encoder()
  updated = infonce.momentum_update(key["params"], query["params"], 0.9)
  assert_state_equal({"params": updated, "batch_stats": key["batch_stats"]}, moco.encoder_k, "encoder_k")
  with pytest.raises(ValueError, match=r"pass variables\['params'\] only"):
    infonce.momentum_update(key, query, 0.9)


def test_shuffle_unshuffle_round_trip():
  batch = jnp.arange(32.0).reshape(16, 2)
  shuffled, index = infonce.shuffle_keys(jax.random.key(7), batch)
  assert sorted(np.asarray(shuffled[:, 0]).tolist()) == list(range(0, 32, 2))
  assert not np.array_equal(shuffled, batch)
  np.testing.assert_array_equal(infonce.unshuffle(shuffled, index), batch)


# ---------------------------------------------------------------------------------------------------------------
# Grouped BatchNorm
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 1, 3])
def test_grouped_batch_norm_matches_torch_per_gpu(group_size):
  x = images(11, (6, 5, 4, 3))  # B, H, W, C
  bn = BatchNorm(use_running_average=False, group_size=group_size)
  variables = bn.init(jax.random.key(0), x)
  variables = {
    "params": {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.1, -0.2, 0.3])},
    "batch_stats": {"mean": jnp.array([0.2, 0.0, -0.1]), "var": jnp.array([1.5, 0.8, 1.0])},
  }
  out, updates = bn.apply(variables, x, mutable=["batch_stats"])

  torch_bn = torch.nn.BatchNorm2d(3)
  with torch.no_grad():
    for name, value in (("weight", "scale"), ("bias", "bias")):
      getattr(torch_bn, name).copy_(torch.tensor(np.asarray(variables["params"][value])))
    torch_bn.running_mean.copy_(torch.tensor(np.asarray(variables["batch_stats"]["mean"])))
    torch_bn.running_var.copy_(torch.tensor(np.asarray(variables["batch_stats"]["var"])))
  gpus = 1 if group_size is None else 6 // group_size
  want, per_rank = ref.per_gpu_forward(torch_bn.train(), torch.tensor(x).permute(0, 3, 1, 2), gpus, "mean")
  close(out, want.detach().permute(0, 2, 3, 1))
  close(updates["batch_stats"]["mean"], torch_bn.running_mean)
  close(updates["batch_stats"]["var"], torch_bn.running_var)  # unbiased, as torch stores it
  if gpus > 1:  # the rule is a real choice: rank 0's copy (what the reference saves) differs from the mean
    assert np.abs(per_rank[0]["running_var"].numpy() - torch_bn.running_var.numpy()).max() > 1e-3

  # Eval mode is flax.linen.BatchNorm's arithmetic to the bit (exported and bridged models do not move).
  eval_out = BatchNorm(use_running_average=True).apply(variables, x)
  flax_out = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
  np.testing.assert_array_equal(eval_out, flax_out)


def test_grouped_batch_norm_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"bn_group_size=4 must be >= 1 and divide the batch of 6"):
    BatchNorm(use_running_average=False, group_size=4).init(jax.random.key(0), jnp.ones((6, 2, 2, 3)))
  with pytest.raises(ValueError, match="more than one value per channel"):
    BatchNorm(use_running_average=False, group_size=1).init(jax.random.key(0), jnp.ones((6, 1, 1, 3)))


@functools.partial(jax.jit, static_argnums=(0,))
def key_forward(model, variables, images, rng):
  """Shuffle -> encoder in train mode -> unshuffle, as the key path of a MoCo step."""
  shuffled, index = infonce.shuffle_keys(rng, images)
  out, updates = model.apply(variables, shuffled, train=True, mutable=["batch_stats"])
  return infonce.unshuffle(out, index), updates["batch_stats"], index


@pytest.mark.parametrize("group_size", [2, 8])  # within one device / across four devices
def test_grouped_bn_sharded_over_8_devices_equals_one_device_and_torch(tiny_variables, group_size):
  model = ResNet50(bn_group_size=group_size, **TINY)
  batch = images(12, (16, PX, PX, 3))
  rng = jax.random.key(4)
  mesh = mesh8()
  sharded = jax.device_put(batch, parallel.batch_sharding(mesh, 4))
  variables = jax.device_put(tiny_variables, parallel.replicated(mesh))
  out, stats, index = key_forward(model, variables, sharded, rng)
  assert len(out.sharding.device_set) == 8
  single_out, single_stats, single_index = key_forward(model, tiny_variables, jnp.asarray(batch), rng)
  np.testing.assert_array_equal(index, single_index)
  close(out, single_out)  # the mesh does not change the groups (measured: equal to the bit on 8 CPU devices)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(stats), jax.tree.leaves(single_stats)):
    close(got, want, err_msg=jax.tree_util.keystr(path))

  net = torch_encoder(tiny_variables).double().train()
  order = torch.from_numpy(np.argsort(np.asarray(index)))
  torch_batch = torch.from_numpy(batch).permute(0, 3, 1, 2).double()
  with torch.no_grad():
    want, _ = ref.per_gpu_forward(net, torch_batch[order], 16 // group_size, "mean")
    want = want[torch.argsort(order)]
    close(out, want, **NET)
    assert_state_equal({"params": tiny_variables["params"], "batch_stats": stats}, net, "encoder", **NET)
    # Without the shuffle each group would hold other samples: the key outputs change.
    plain, _ = ref.per_gpu_forward(net, torch_batch, 16 // group_size, "mean")
  assert np.abs(plain.numpy() - want.numpy()).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Whole MoCo steps: encoders, momentum update, shuffle BN, queue, SGD with momentum and weight decay
# ---------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def moco_step(model, tx, hyper, state, images_q, images_k, rng):
  """The reference's iteration from the pieces (a stand-in for train/moco.py)."""
  momentum, temperature = hyper
  query, key = state["query"], state["key"]
  key_params = infonce.momentum_update(key["params"], query["params"], momentum)
  shuffled, unshuffle_index = infonce.shuffle_keys(rng, images_k)
  key_out, key_updates = model.apply(
    {"params": key_params, "batch_stats": key["batch_stats"]}, shuffled, train=True, mutable=["batch_stats"]
  )
  key_out = infonce.unshuffle(key_out, unshuffle_index)

  def loss_fn(params):
    query_out, updates = model.apply(
      {"params": params, "batch_stats": query["batch_stats"]}, images_q, train=True, mutable=["batch_stats"]
    )
    logits, keys = infonce.contrastive_logits(query_out, key_out, state["queue"], temperature)
    return infonce.infonce_loss(logits), (logits, keys, updates["batch_stats"])

  (loss, (logits, keys, query_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(query["params"])
  updates, opt_state = tx.update(grads, state["opt"], query["params"])
  queue, ptr = infonce.enqueue(state["queue"], state["ptr"], keys)
  new_state = {
    "query": {"params": optax.apply_updates(query["params"], updates), "batch_stats": query_stats},
    "key": {"params": key_params, "batch_stats": key_updates["batch_stats"]},
    "opt": opt_state,
    "queue": queue,
    "ptr": ptr,
  }
  return new_state, {"loss": loss, "logits": logits, "unshuffle_index": unshuffle_index}


def test_moco_step_matches_torch(tiny_variables):
  batch, group_size = 16, 4  # 4 reference GPUs; on the 8-device mesh each group spans 2 devices
  lr, weight_decay, momentum, temperature = 0.1, 1e-2, 0.9, 0.2
  size = 2 * batch
  infonce.check_sizes(queue_size=size, global_batch_size=batch, bn_group_size=group_size)
  model = ResNet50(bn_group_size=group_size, **TINY)
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=0.9))
  mesh = mesh8()
  # Mid-training: the key encoder's params and statistics differ from the query's, and the pointer sits at the
  # last slice, so this step's enqueue wraps it to 0.
  noise = np.random.default_rng(1)
  key = jax.tree.map(lambda x: x + 0.05 * noise.standard_normal(x.shape).astype(np.float32), tiny_variables)
  state = {
    "query": tiny_variables,
    "key": key,
    "opt": tx.init(tiny_variables["params"]),
    "queue": infonce.init_queue(jax.random.key(2), TINY["num_classes"], size),
    "ptr": jnp.int32(batch),
  }
  state = jax.device_put(state, parallel.replicated(mesh))

  moco = ref.MoCo(
    lambda: torch_encoder(tiny_variables),
    dim=TINY["num_classes"],
    K=size,
    m=momentum,
    T=temperature,
    num_gpus=batch // group_size,
    buffer_rule="mean",
  )
  moco.encoder_k.load_state_dict(torch_encoder(key).state_dict())
  moco = moco.double()
  moco.queue.copy_(torch.tensor(np.asarray(state["queue"])))
  moco.queue_ptr[0] = batch
  optimizer = ref.make_optimizer(moco, lr, weight_decay)

  images_q, images_k = images(100, (batch, PX, PX, 3)), images(200, (batch, PX, PX, 3))
  sharded = [jax.device_put(x, parallel.batch_sharding(mesh, 4)) for x in (images_q, images_k)]
  new_state, out = moco_step(model, tx, (momentum, temperature), state, *sharded, jax.random.key(0))
  idx_shuffle = torch.from_numpy(np.argsort(np.asarray(out["unshuffle_index"])))
  nchw = [torch.from_numpy(x).permute(0, 3, 1, 2).double() for x in (images_q, images_k)]
  loss, logits, acc1, acc5 = ref.train_step(moco, optimizer, *nchw, idx_shuffle)

  # Logits are cosines / T: compared as cosines, where float32 rounding lives.
  close(out["logits"] * temperature, logits * temperature, err_msg="logits", **NET)
  close(out["loss"], loss, err_msg="loss", **NET)
  close(new_state["queue"], moco.queue, err_msg="queue", **NET)
  assert int(new_state["ptr"]) == int(moco.queue_ptr) == 0
  assert_state_equal(new_state["query"], moco.encoder_q, "encoder_q", **NET)
  assert_state_equal(new_state["key"], moco.encoder_k, "encoder_k", **NET)
  # The step moved everything compared: params (gradient and weight decay), the key encoder (momentum update),
  # both encoders' running statistics (their own train-mode forwards), the queue's last slice.
  moved = lambda a, b: min(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(new_state["query"]["params"], state["query"]["params"]) > 1e-5
  assert moved(new_state["key"]["params"], state["key"]["params"]) > 1e-4
  assert moved(new_state["query"]["batch_stats"], state["query"]["batch_stats"]) > 1e-4
  assert moved(new_state["key"]["batch_stats"], state["key"]["batch_stats"]) > 1e-4
  np.testing.assert_array_equal(new_state["queue"][:, :batch], state["queue"][:, :batch])
  assert moved(new_state["queue"][:, batch:], state["queue"][:, batch:]) > 1e-2


def test_sgd_recipe_matches_torch_sgd():
  """main_moco's optimizer (SGD, momentum 0.9, dampening 0, L2 weight decay added to the gradient of every
  parameter) is optax.chain(add_decayed_weights(wd), sgd(lr, momentum=0.9)), over several steps."""
  rng = np.random.default_rng(6)
  params = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
  grads = [jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params) for _ in range(3)]
  lr, weight_decay = 0.03, 1e-1
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=0.9))
  torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  optimizer = torch.optim.SGD(torch_params.values(), lr, momentum=0.9, weight_decay=weight_decay)
  opt_state = tx.init(params)
  for grad in grads:
    updates, opt_state = tx.update(grad, opt_state, params)
    params = optax.apply_updates(params, updates)
    for name, value in torch_params.items():
      value.grad = torch.tensor(grad[name])
    optimizer.step()
  for name, value in torch_params.items():
    close(params[name], value.detach())
