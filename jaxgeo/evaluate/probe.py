"""Linear probe on fixed features: a learning-rate sweep of linear heads trained together, selected on validation.

Optimiser: SGD with momentum 0.9, no weight decay by default, cosine decay to 0 over all steps, linear head
initialised N(0, 0.01) with zero bias: the reference linear evaluation (facebookresearch/dino eval_linear.py).
SGD rather than AdamW because it is the reference's choice (so numbers compare with the seed's table) and
because its update is linear in the learning rate: one momentum trace serves every head, and multiplying the
update by each head's lr gives exactly what separate runs would give. So the whole sweep is one vmapped step.

Multi-label heads use sigmoid binary cross-entropy (mean over classes and samples) and are selected on
validation macro AP; single-label heads use softmax cross-entropy and are selected on accuracy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgeo.evaluate import metrics


def init_heads(rng, num_heads, dim, num_classes):
  """{"kernel": [L, D, C] ~ N(0, 0.01), "bias": [L, C] zeros}, one head per learning rate."""
  kernel = 0.01 * jax.random.normal(rng, (num_heads, dim, num_classes), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((num_heads, num_classes), jnp.float32)}


def head_logits(head, features):
  return features @ head["kernel"] + head["bias"]


def probe_loss(head, features, labels, multilabel):
  logits = head_logits(head, features)
  if multilabel:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def head_scores(head, features, multilabel):
  """Probabilities: sigmoid per class (multi-label) or softmax over classes."""
  logits = head_logits(head, features)
  return jax.nn.sigmoid(logits) if multilabel else jax.nn.softmax(logits, axis=-1)


def make_tx(total_steps, momentum=0.9):
  # Unit learning rate: each head multiplies its update by its own lr (exact for SGD, see module doc).
  return optax.sgd(optax.cosine_decay_schedule(1.0, max(int(total_steps), 1)), momentum=momentum)


def make_step(tx, lrs, multilabel, weight_decay=0.0):
  """Jitted (heads, opt_state, all_features, all_labels, rows) -> (heads, opt_state, losses [L]).

  The minibatch is gathered inside the step so the cached features stay on the device untouched.
  """
  lrs = jnp.asarray(lrs, jnp.float32)

  def one(head, opt_state, lr, features, labels):
    loss, grads = jax.value_and_grad(probe_loss)(head, features, labels, multilabel)
    grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, head)
    updates, opt_state = tx.update(grads, opt_state, head)
    head = jax.tree.map(lambda p, u: p + lr * u, head, updates)
    return head, opt_state, loss

  def step(heads, opt_state, all_features, all_labels, rows):
    return jax.vmap(one, in_axes=(0, 0, 0, None, None))(heads, opt_state, lrs, all_features[rows], all_labels[rows])

  return jax.jit(step, donate_argnums=(0, 1))


def prepare_labels(labels, multilabel):
  return np.asarray(labels, np.float32) if multilabel else metrics.class_ids(labels).astype(np.int32)


def score_metrics(labels, scores, multilabel):
  """Multi-label: ap_macro/ap_micro/ap_per_class; single-label: accuracy. "selection" is the one we select on."""
  if multilabel:
    result = metrics.average_precision(labels, scores)
    return dict(result, selection=result["ap_macro"])
  acc = metrics.accuracy(labels, scores)
  return {"accuracy": acc, "selection": acc}


_all_head_scores = jax.jit(jax.vmap(head_scores, in_axes=(0, None, None)), static_argnums=2)


def predict(heads, features, multilabel, batch_size=8192):
  """Scores [L, N, C] (numpy) of every head, in batches to bound device memory."""
  chunks = [
    _all_head_scores(heads, jnp.asarray(features[i : i + batch_size]), multilabel)
    for i in range(0, len(features), batch_size)
  ]
  return np.concatenate([np.asarray(c) for c in chunks], axis=1)


def select(heads, val_features, val_labels, multilabel, best, epoch, lrs):
  """Scores every head on validation; keeps (a host copy of) the best head seen so far in `best`."""
  scores = predict(heads, val_features, multilabel)
  values = [score_metrics(val_labels, s, multilabel)["selection"] for s in scores]
  history = {"epoch": epoch, "val": {f"{lr:g}": v for lr, v in zip(lrs, values)}}
  finite = [v if np.isfinite(v) else -np.inf for v in values]
  index = int(np.argmax(finite))
  if best.get("value") is None or finite[index] > best["value"]:
    best.update(
      value=finite[index], lr=float(lrs[index]), epoch=epoch, head=jax.tree.map(lambda x: np.asarray(x[index]), heads)
    )
  return history


def train_probe(
  train_features,
  train_labels,
  val_features,
  val_labels,
  *,
  multilabel=True,
  lrs=(1e-3, 1e-2, 1e-1, 1.0),
  epochs=100,
  batch_size=1024,
  eval_every=5,
  seed=0,
  weight_decay=0.0,
):
  """Trains one head per lr on cached features; returns the best (lr, epoch) on validation.

  Returns {"head": {"kernel" [D, C], "bias" [C]} (numpy), "lr", "epoch", "value" (validation selection
  metric), "history" (per evaluated epoch, the value of every lr)}.
  """
  train_features = jnp.asarray(train_features, jnp.float32)
  train_labels = jnp.asarray(prepare_labels(train_labels, multilabel))
  num_train, dim = train_features.shape
  num_classes = (
    train_labels.shape[1] if multilabel else int(max(train_labels.max(), metrics.class_ids(val_labels).max())) + 1
  )
  batch_size = min(int(batch_size), num_train)
  steps_per_epoch = max(num_train // batch_size, 1)
  tx = make_tx(epochs * steps_per_epoch)
  init_rng, shuffle_rng = jax.random.split(jax.random.key(seed))
  heads = init_heads(init_rng, len(lrs), dim, num_classes)
  opt_state = jax.vmap(tx.init)(heads)
  step = make_step(tx, lrs, multilabel, weight_decay)

  best, history = {}, []
  for epoch in range(1, epochs + 1):
    order = jax.random.permutation(jax.random.fold_in(shuffle_rng, epoch), num_train)
    for i in range(steps_per_epoch):
      rows = order[i * batch_size : (i + 1) * batch_size]
      heads, opt_state, _ = step(heads, opt_state, train_features, train_labels, rows)
    if epoch % eval_every == 0 or epoch == epochs:
      history.append(select(heads, val_features, val_labels, multilabel, best, epoch, lrs))
  best["history"] = history
  return best
