"""The window grid over a scene, the blending weights, and the band of rows where blended scores accumulate.

Windows of `size` pixels step by `size - overlap` and the last one along each axis is pulled back inside the scene
(never past its edge: no padding, no half-empty window), so every pixel is seen by at least one full window and a
scene smaller than a window is one window, padded by reflection.

Each window's class probabilities are blended with a separable weight: sin^2 ramps over `overlap` pixels at every
edge of the window that lies INSIDE the scene (where a neighbour takes over: complementary ramps of two neighbours
sum to one, so there are no seams), and a flat 1 at edges on the scene border (no taper there, so no dark frame
and no pixel with zero weight; geoai's tapers zero the scene border). Blended = sum(w * p) / sum(w): a weighted
mean of softmax probabilities (never of logits, whose scales differ from window to window).

Memory: windows go row of windows by row of windows, and scores accumulate only in a band as tall as a window
(`RowBand`); rows no later window can reach are handed back finished. A scene too wide for the memory budget is
cut into strips of columns, each with its own band; the windows that straddle a strip edge are computed for both
strips, so the result is the same as with one strip.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def window_starts(length: int, size: int, overlap: int) -> list[int]:
  """Start offsets of the windows along an axis of `length` pixels (one window at 0 when length <= size)."""
  if not 0 <= overlap < size:
    raise ValueError(f"--overlap={overlap}: expected 0 <= overlap < the window size {size}")
  if length <= size:
    return [0]
  starts = list(range(0, length - size, size - overlap))
  return starts + [length - size]


def edge_ramp(size: int, taper: int, lead: bool, trail: bool) -> np.ndarray:
  """1-D weights [size] float32: sin^2 rising over `taper` pixels at the leading / trailing edge when that edge
  is inside the scene, 1 elsewhere. A ramp and its mirror image sum to 1 pixel by pixel over the overlap."""
  weights = np.ones(size, np.float32)
  taper = min(taper, size // 2)
  if taper > 0:
    ramp = np.sin(0.5 * np.pi * (np.arange(taper) + 0.5) / taper) ** 2
    if lead:
      weights[:taper] = ramp
    if trail:
      weights[size - taper :] = np.minimum(weights[size - taper :], ramp[::-1])
  return weights


@dataclasses.dataclass(frozen=True)
class Grid:
  """Windows over a height x width scene: `rows` / `cols` start offsets, `size`, `overlap`."""

  height: int
  width: int
  size: int
  overlap: int

  @property
  def rows(self) -> list[int]:
    return window_starts(self.height, self.size, self.overlap)

  @property
  def cols(self) -> list[int]:
    return window_starts(self.width, self.size, self.overlap)

  def __len__(self) -> int:
    return len(self.rows) * len(self.cols)

  def weights(self, row: int, col: int) -> np.ndarray:
    """[h, w] float32 blending weights of the window at (row, col), cropped to the scene (h, w <= size)."""
    h, w = min(self.size, self.height - row), min(self.size, self.width - col)
    along_rows = edge_ramp(self.size, self.overlap, row > 0, row + self.size < self.height)[:h]
    along_cols = edge_ramp(self.size, self.overlap, col > 0, col + self.size < self.width)[:w]
    return along_rows[:, None] * along_cols[None, :]

  def strip_cols(self, left: int, right: int) -> list[int]:
    """Start columns of the windows reaching into scene columns [left, right)."""
    return [c for c in self.cols if c < right and c + self.size > left]


def strips(width: int, strip_width: int, align: int) -> list[tuple[int, int]]:
  """[left, right) column ranges covering the scene, each `strip_width` wide (a multiple of `align`, so strips
  write whole blocks of a tiled file) but the last."""
  strip_width = max(align, strip_width // align * align)
  return [(left, min(left + strip_width, width)) for left in range(0, width, strip_width)]


def pad_window(pixels: np.ndarray, size: int) -> np.ndarray:
  """[h, w, C] -> [size, size, C], reflected past the scene edge (only scenes smaller than a window need it)."""
  h, w = pixels.shape[:2]
  if (h, w) == (size, size):
    return pixels
  # numpy's reflect repeats the reflection when the pad is wider than the image; a 1-px axis can only be edged.
  mode = "reflect" if min(h, w) > 1 else "edge"
  return np.pad(pixels, ((0, size - h), (0, size - w), (0, 0)), mode=mode)


class RowBand:
  """Blended scores of scene rows [top, top + height) over columns [left, right): sum(w * p) and sum(w).

  add() a window's probabilities; advance(new_top) hands back the finished rows [top, new_top) as blended
  probabilities [n, width, C] float32 and rolls the band down. Memory: height x width x (C + 1) float32.
  """

  def __init__(self, height: int, left: int, right: int, num_classes: int):
    self.top, self.left, self.right = 0, left, right
    self.scores = np.zeros((height, right - left, num_classes), np.float32)
    self.weights = np.zeros((height, right - left), np.float32)

  @property
  def nbytes(self) -> int:
    return self.scores.nbytes + self.weights.nbytes

  def add(self, row: int, col: int, probabilities: np.ndarray, weights: np.ndarray) -> None:
    """probabilities [h, w, C] and weights [h, w] of the window at scene (row, col), cropped to the scene."""
    h, w = weights.shape
    r0 = row - self.top
    if r0 < 0 or r0 + h > self.scores.shape[0]:
      raise AssertionError(
        f"window rows [{row}, {row + h}) outside the band [{self.top}, {self.top + len(self.weights)})"
      )
    c0, c1 = max(col, self.left), min(col + w, self.right)
    if c0 >= c1:
      return
    part = (slice(r0, r0 + h), slice(c0 - self.left, c1 - self.left))
    weights = weights[:, c0 - col : c1 - col]
    self.scores[part] += weights[..., None] * probabilities[:h, c0 - col : c1 - col]
    self.weights[part] += weights

  def advance(self, new_top: int) -> np.ndarray:
    """Blended probabilities of rows [top, new_top); the band then starts at new_top."""
    n = new_top - self.top
    if not 0 < n <= len(self.weights):
      raise AssertionError(f"cannot advance the band from row {self.top} to {new_top}")
    if np.any(self.weights[:n] <= 0):
      raise AssertionError("a finished pixel has no window weight: the grid does not cover the scene")
    finished = self.scores[:n] / self.weights[:n, :, None]
    self.scores[:-n], self.weights[:-n] = self.scores[n:], self.weights[n:]
    self.scores[-n:], self.weights[-n:] = 0, 0
    self.top = new_top
    return finished


def strip_bytes(
  width: int, *, size: int, height: int, num_classes: int, pixel_bytes: int, out_bytes: int, block: int
) -> int:
  """Buffer bytes of a strip `width` columns wide: the score band (a window's rows x (C + 1) float32 per column), the
  input rows of one row of windows (pixel_bytes per pixel, over the strip and one window's overhang) and the finished
  output rows waiting for a whole row of blocks (out_bytes per pixel)."""
  rows = min(size, height)
  return (
    width * (rows * (num_classes + 1) * 4 + size * pixel_bytes + (block + size) * out_bytes) + size * size * pixel_bytes
  )


def strip_width_for_budget(budget_bytes: int, **layout) -> int:
  """The widest strip whose buffers (strip_bytes) fit `budget_bytes`; 0 when not even one column does."""
  fixed = strip_bytes(0, **layout)
  per_column = strip_bytes(1, **layout) - fixed
  return max(0, math.floor((budget_bytes - fixed) / per_column))
