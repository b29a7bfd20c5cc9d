"""Figures of the evaluation commands, drawn with matplotlib's Agg backend (no display needed).

per_class_chart       one bar per class for any metric (per_class_ap_chart: its AP form)
confusion_chart       confusion matrix, colours normalised per true class, counts written in the cells
results_chart         grouped bars of a results table (models x settings such as S1 / S2 / S1+S2), seed spread
segmentation_grid     image | truth | prediction | errors for a few tiles, in the dataset's class colours

Every function writes a PNG to `path` (creating its folder) and returns `path`.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402  (the backend must be chosen before pyplot loads)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402


def _save(fig, path, dpi=120):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return path


def _wrap(name, width=48):
  return name if len(name) <= width else name[: width - 1] + "…"


def _compact(count):
  """1234 -> "1234", 56789 -> "56.8k", 1.2e9 -> "1.2G": pixel counts must fit in a matrix cell."""
  for threshold, unit, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
    if count >= threshold:
      return f"{count / unit:.3g}{suffix}"
  return str(int(count))


# ---------------------------------------------------------------- per-class bars


def per_class_chart(class_names, values, path, metric="average precision", mean=None, mean_label=None, title=None):
  """Horizontal bars, one per class with its name and value; `mean` (e.g. the macro value) as a dashed line.

  Horizontal because class names (BigEarthNet's are long sentences) read better on the left; NaN values
  (undefined for that class: no positives, absent from the split) show "n/a" and no bar. The x axis is [0, 1.1]
  for metrics in [0, 1] and stretches for larger values.
  """
  values = np.asarray(values, dtype=np.float64)
  if len(values) != len(class_names):
    raise ValueError(f"per_class_chart: {len(values)} values for {len(class_names)} class names")
  finite = values[np.isfinite(values)]
  top = max(1.0, float(finite.max()) if finite.size else 1.0)
  fig, ax = plt.subplots(figsize=(9, 0.32 * len(values) + 1.6))
  rows = np.arange(len(values))
  ax.barh(rows, np.nan_to_num(values), color="tab:blue")
  for row, value in zip(rows, values):
    label = "n/a" if np.isnan(value) else (f"{value:.3f}" if top <= 1 else f"{value:.4g}")
    ax.text(min(np.nan_to_num(value), top) + 0.01 * top, row, label, va="center", fontsize=8)
  if mean is not None and np.isfinite(mean):
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"{mean_label or 'mean ' + metric} {mean:.3f}")
    ax.legend(loc="lower right", fontsize=8)
  ax.set_yticks(rows, [_wrap(str(name)) for name in class_names], fontsize=8)
  ax.invert_yaxis()  # first class on top, as in the label list
  ax.set_xlim(0, 1.1 * top)
  ax.set_xlabel(metric)
  ax.set_title(title or f"Per-class {metric}", fontsize=10)
  return _save(fig, path)


def per_class_ap_chart(class_names, ap_per_class, ap_macro, path, title="Per-class average precision"):
  """per_class_chart of average precision with the macro AP line (the linear probe's figure)."""
  return per_class_chart(class_names, ap_per_class, path, "average precision", ap_macro, "macro AP", title)


# ---------------------------------------------------------------- confusion matrix


def confusion_chart(confusion, class_names, path, title="Confusion matrix", headline=None, max_annotated=20):
  """The [C, C] matrix (rows = truth) as a heat map; cell colour = fraction of the row (per-class recall).

  Cells hold the count and the row percentage while C <= max_annotated. Rows with no sample are grey.
  `headline` {name: value} goes under the title (e.g. {"mIoU": 0.71, "pixel acc.": 0.93}); by default the
  matrix's own overall accuracy and average accuracy (mean recall over present classes).
  """
  confusion = np.asarray(confusion, np.float64)
  num_classes = len(class_names)
  if confusion.shape != (num_classes, num_classes):
    raise ValueError(f"confusion_chart: confusion {confusion.shape}; expected [{num_classes}, {num_classes}]")
  support = confusion.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    fraction = confusion / support[:, None]  # NaN rows: no sample of that class
  if headline is None:
    total = confusion.sum()
    headline = {"OA": np.trace(confusion) / total if total else np.nan}
    headline["AA"] = np.nanmean(np.diag(fraction)) if np.isfinite(np.diag(fraction)).any() else np.nan
  side = max(4.5, 0.6 * num_classes + 2.5)
  fig, ax = plt.subplots(figsize=(side + 1.2, side))
  cmap = plt.get_cmap("Blues").with_extremes(bad="0.85")
  image = ax.imshow(np.ma.masked_invalid(fraction), cmap=cmap, vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class (row)")
  if num_classes <= max_annotated:
    fontsize = 8 if num_classes <= 10 else 6
    for row in range(num_classes):
      for col in range(num_classes):
        share = fraction[row, col]
        text = "–" if np.isnan(share) else f"{_compact(confusion[row, col])}\n{100 * share:.0f}%"
        colour = "white" if np.isfinite(share) and share > 0.55 else "black"
        ax.text(col, row, text, ha="center", va="center", fontsize=fontsize, color=colour)
  names = [_wrap(str(name), 28) for name in class_names]
  ticks = np.arange(num_classes)
  ax.set_xticks(ticks, names, rotation=40, ha="right", fontsize=8)
  ax.set_yticks(ticks, [f"{name} ({_compact(n)})" for name, n in zip(names, support)], fontsize=8)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class (count)")
  summary = "   ".join(f"{name} {value:.3f}" for name, value in headline.items() if value is not None)
  ax.set_title(f"{title}\n{summary}" if summary else title, fontsize=10)
  return _save(fig, path)


# ---------------------------------------------------------------- results table


def results_chart(results, path, title="", metric="accuracy", columns=None):
  """Grouped bars of a results table: one group per column (e.g. "S1", "S2", "S1+S2"), one bar per model.

  results: {model: {column: value}} where a value is a number, a list of one number per seed (the bar is
  their mean, the error bar their standard deviation (ddof=1), each seed a dot) or None / NaN (no result:
  "–"). Columns come in the order given, else in the order they first appear.
  """
  models = list(results)
  if columns is None:
    columns = list(dict.fromkeys(column for row in results.values() for column in row))
  if not models or not columns:
    raise ValueError("results_chart: need at least one model and one column of results")
  width = 0.8 / len(models)
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(columns) * (len(models) * 0.5 + 0.6)), 4.5))
  top = 0.0
  for index, model in enumerate(models):
    offsets = np.arange(len(columns)) - 0.4 + width * (index + 0.5)
    colour = plt.get_cmap("tab10")(index % 10)
    for offset, column in zip(offsets, columns):
      seeds = np.atleast_1d(np.asarray(results[model].get(column, np.nan), np.float64)).ravel()
      seeds = seeds[np.isfinite(seeds)]
      if seeds.size == 0:
        ax.text(offset, 0, "n/a", ha="center", va="bottom", fontsize=7, color="0.4")
        continue
      mean = seeds.mean()
      spread = seeds.std(ddof=1) if seeds.size > 1 else 0.0
      ax.bar(offset, mean, width * 0.92, color=colour, yerr=spread or None, capsize=3, ecolor="0.25")
      if seeds.size > 1:
        ax.scatter(np.full(seeds.size, offset), seeds, s=8, color="black", zorder=3)
      label = f"{mean:.3f}" + (f"\n±{spread:.3f}" if seeds.size > 1 else "")
      peak = max(mean + spread, seeds.max())
      ax.text(offset, peak, label, ha="center", va="bottom", fontsize=7)
      top = max(top, peak)
  ax.set_xticks(np.arange(len(columns)), columns)
  ax.set_ylabel(metric)
  ax.set_ylim(0, (top or 1.0) * 1.18)
  ax.spines[["top", "right"]].set_visible(False)
  handles = [Patch(color=plt.get_cmap("tab10")(i % 10), label=model) for i, model in enumerate(models)]
  ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(models), 4), fontsize=8)
  ax.set_title(title, fontsize=10)
  return _save(fig, path)


# ---------------------------------------------------------------- segmentation tiles


def class_palette(colors, num_classes):
  """[C, 3] float RGB in [0, 1] from matplotlib colours or RGB(A) tuples (0-255 when any value > 1).

  None: tab10 (tab20 beyond 10 classes). Alpha is dropped: LandCover.ai's transparent background is black.
  """
  if colors is None:
    base = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    return np.asarray([base(i % base.N)[:3] for i in range(num_classes)])
  if len(colors) != num_classes:
    raise ValueError(f"segmentation colours: {len(colors)} colours for {num_classes} class names")
  palette = []
  for colour in colors:
    if isinstance(colour, str):
      palette.append(mcolors.to_rgb(colour))
      continue
    rgb = np.asarray(colour, np.float64)[:3]
    palette.append(rgb / 255.0 if np.any(rgb > 1) else rgb)
  return np.asarray(palette)


def _picture(image, index):
  """[H, W, 3] float in [0, 1] from uint8 or float [0, 1] images, RGB or one band."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"segmentation_grid: image {index} has shape {image.shape}; expected [H, W, 3] or [H, W]")
  if image.dtype == np.uint8:
    return image / 255.0
  if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
    raise ValueError(
      f"segmentation_grid: image {index} is {image.dtype} with values in [{np.nanmin(image):.4g}, "
      f"{np.nanmax(image):.4g}]; expected uint8 or float in [0, 1] (scale or clip a display stretch first)"
    )
  return image.astype(np.float64)


def _coloured(mask, palette, ignore_index, index, what):
  mask = np.asarray(mask)
  ignored = np.zeros(mask.shape, bool) if ignore_index is None else mask == ignore_index
  bad = ~ignored & ((mask < 0) | (mask >= len(palette)))
  if bad.any():
    raise ValueError(
      f"segmentation_grid: {what} {index} holds values {np.unique(mask[bad])[:5].tolist()} outside the "
      f"{len(palette)} class ids (ignore_index={ignore_index})"
    )
  rgb = palette[np.where(ignored, 0, mask)]
  # A light checkerboard: unlabelled reads as "no data" and cannot be taken for a class colour or the page.
  rows, cols = np.indices(mask.shape[:2])
  cell = max(2, mask.shape[0] // 16)  # about 16 squares across, whatever the tile size
  rgb[ignored] = np.where((rows // cell + cols // cell) % 2 == 0, 0.78, 0.95)[ignored][:, None]
  return rgb, ignored


def segmentation_grid(
  images, truths, predictions, class_names, path, colors=None, titles=None, ignore_index=None, show_errors=True
):
  """One row per tile: image | truth | prediction (| errors), class colours, a legend of every class.

  images: N pictures [H, W, 3] (or one band [H, W]) as uint8 or float in [0, 1]; truths, predictions: N class
  id masks [H, W]; colors: one per class (see class_palette); titles: one per tile (e.g. its file name).
  ignore_index pixels of the truth are a grey checkerboard and not scored. The errors panel greys the image and paints
  wrong pixels red; each prediction panel names its pixel accuracy.
  """
  if not len(images) == len(truths) == len(predictions):
    raise ValueError(
      f"segmentation_grid: {len(images)} images, {len(truths)} truths, {len(predictions)} predictions; expected equal"
    )
  palette = class_palette(colors, len(class_names))
  cols = 4 if show_errors else 3
  fig, axes = plt.subplots(
    len(images), cols, figsize=(3 * cols, 3 * len(images) + 0.6), squeeze=False, layout="constrained"
  )
  for index, (image, truth, predicted) in enumerate(zip(images, truths, predictions)):
    picture = _picture(image, index)
    truth_rgb, ignored = _coloured(truth, palette, ignore_index, index, "truth")
    predicted_rgb, _ = _coloured(predicted, palette, None, index, "prediction")
    if not picture.shape[:2] == truth_rgb.shape[:2] == predicted_rgb.shape[:2]:
      raise ValueError(
        f"segmentation_grid: tile {index} sizes differ: image {picture.shape[:2]}, truth {truth_rgb.shape[:2]}, "
        f"prediction {predicted_rgb.shape[:2]}"
      )
    wrong = (np.asarray(truth) != np.asarray(predicted)) & ~ignored
    scored = max(int((~ignored).sum()), 1)
    panels = [(picture, titles[index] if titles else f"tile {index}"), (truth_rgb, "truth")]
    panels.append((predicted_rgb, f"prediction ({100 * (1 - wrong.sum() / scored):.1f}% right)"))
    if show_errors:
      errors = np.repeat(0.35 + 0.5 * picture.mean(-1, keepdims=True), 3, axis=-1)
      errors[wrong] = (0.9, 0.1, 0.1)
      panels.append((errors, f"errors ({100 * wrong.sum() / scored:.1f}% of pixels)"))
    for ax, (rgb, name) in zip(axes[index], panels):
      ax.imshow(rgb, interpolation="nearest")
      ax.set_title(_wrap(str(name), 36), fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
  handles = [Patch(facecolor=c, edgecolor="0.3", label=str(n)) for n, c in zip(class_names, palette)]
  if ignore_index is not None:
    handles.append(Patch(facecolor="0.95", edgecolor="0.3", hatch="++", label="unlabelled (ignored)"))
  if show_errors:
    handles.append(Patch(facecolor=(0.9, 0.1, 0.1), label="wrong pixel"))
  fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
  return _save(fig, path)
