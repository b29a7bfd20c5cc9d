"""The shared evaluation machinery's decisions on scripted metric sequences: keep-best, early stop, lr plateau."""

import ml_collections
import numpy as np
import pytest
import torch

from jaxgeo.train import evaluation


def eval_cfg(**overrides):
  cfg = evaluation.eval_config()
  for key, value in overrides.items():
    if key.startswith("plateau_"):
      cfg.plateau[key[len("plateau_") :]] = value
    else:
      cfg[key] = value
  return cfg


def torch_plateau_scales(values, mode, factor, patience, threshold, cooldown, min_lr):
  """The lr of torch.optim.lr_scheduler.ReduceLROnPlateau after each value, for a base lr of 1."""
  param = torch.nn.Parameter(torch.zeros(1))
  optimizer = torch.optim.SGD([param], lr=1.0)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
    optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold, cooldown=cooldown, min_lr=min_lr
  )
  scales = []
  for value in values:
    scheduler.step(value)
    scales.append(optimizer.param_groups[0]["lr"])
  return scales


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize(("patience", "cooldown"), [(0, 0), (2, 0), (1, 2)])
def test_plateau_matches_torch_reduce_lr_on_plateau(mode, patience, cooldown):
  rng = np.random.default_rng(patience * 10 + cooldown)
  # Rising then flat with noise, tiny improvements below the relative threshold, and a late jump.
  values = list(np.r_[np.linspace(0.1, 0.5, 6), 0.5 + rng.normal(0, 1e-6, 8), 0.50002, 0.6, 0.6, 0.6, 0.6, 0.6])
  values = [float(v) if mode == "max" else float(1 - v) for v in values]
  cfg = eval_cfg(
    mode=mode, plateau_factor=0.5, plateau_patience=patience, plateau_cooldown=cooldown, plateau_min_scale=0.01
  )
  monitor = evaluation.Monitor(cfg)
  ours = [monitor.update(step, v)["lr_scale"] for step, v in enumerate(values)]
  want = torch_plateau_scales(values, mode, 0.5, patience, 1e-4, cooldown, 0.01)
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-12)
  assert min(ours) < 1.0, "the sequence is meant to trigger at least one reduction"


def test_keep_best_and_early_stop_on_a_scripted_sequence():
  monitor = evaluation.Monitor(eval_cfg(mode="max", patience=3, min_delta=0.01))
  script = [(10, 0.30), (20, 0.40), (30, 0.405), (40, 0.39), (50, 0.41), (60, 0.42)]
  decisions = [monitor.update(step, value) for step, value in script]
  assert [d["improved"] for d in decisions] == [True, True, False, False, False, True]
  assert [d["stop"] for d in decisions] == [False, False, False, False, True, False]
  assert monitor.state["best"] == 0.42 and monitor.state["best_step"] == 60


def test_monitor_state_round_trips_through_json_so_resume_decides_the_same():
  import json

  cfg = eval_cfg(mode="min", patience=2, plateau_factor=0.1, plateau_patience=1)
  values = [1.0, 0.9, 0.95, 0.97, 0.96, 0.5]
  straight = evaluation.Monitor(cfg)
  expected = [straight.update(i, v) for i, v in enumerate(values)]
  first = evaluation.Monitor(cfg)
  got = [first.update(i, v) for i, v in enumerate(values[:3])]
  resumed = evaluation.Monitor(cfg, json.loads(json.dumps(first.state)))  # what a checkpoint's "loop" item holds
  got += [resumed.update(i + 3, v) for i, v in enumerate(values[3:])]
  assert got == expected


def test_a_non_finite_metric_is_an_error_not_a_new_best():
  monitor = evaluation.Monitor(eval_cfg())
  with pytest.raises(FloatingPointError, match="nan at step 5"):
    monitor.update(5, float("nan"))


def test_config_problems_are_named():
  with pytest.raises(ValueError, match="config.eval.mode='up'"):
    evaluation.Monitor(ml_collections.ConfigDict(dict(eval_cfg(), mode="up")))
