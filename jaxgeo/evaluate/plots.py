"""Figures of the evaluation commands, drawn with matplotlib's Agg backend (no display needed)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402


def per_class_ap_chart(class_names, ap_per_class, ap_macro, path, title="Per-class average precision"):
  """Horizontal bars, one per class with its name and value, and the macro AP as a dashed line.

  Horizontal because BigEarthNet class names are long sentences; NaN classes (no positives) show "n/a".
  """
  values = np.asarray(ap_per_class, dtype=np.float64)
  fig, ax = plt.subplots(figsize=(9, 0.32 * len(values) + 1.6))
  rows = np.arange(len(values))
  ax.barh(rows, np.nan_to_num(values), color="tab:blue")
  for row, value in zip(rows, values):
    ax.text(
      min(np.nan_to_num(value), 1.0) + 0.01, row, "n/a" if np.isnan(value) else f"{value:.3f}", va="center", fontsize=8
    )
  if ap_macro is not None and np.isfinite(ap_macro):
    ax.axvline(ap_macro, color="tab:red", linestyle="--", label=f"macro AP {ap_macro:.3f}")
    ax.legend(loc="lower right", fontsize=8)
  ax.set_yticks(rows, [_wrap(name) for name in class_names], fontsize=8)
  ax.invert_yaxis()  # first class on top, as in the label list
  ax.set_xlim(0, 1.1)
  ax.set_xlabel("average precision")
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _wrap(name, width=48):
  return name if len(name) <= width else name[: width - 1] + "…"
