"""Windows in, probabilities out: fixed-size batches over every device, and a progress line on stderr."""

from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np


class Progress:
  """Done, rate and ETA on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

  def __init__(self, total: int, label: str, enabled: bool = True, unit: str = "windows"):
    self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
    self.done, self.start, self.shown = 0, time.perf_counter(), 0.0
    self.tty = sys.stderr.isatty()

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if self.enabled and (now - self.shown > (0.5 if self.tty else 10.0) or self.done == self.total):
      self.shown = now
      eta = time.strftime("%H:%M:%S", time.gmtime((self.total - self.done) / max(self.rate, 1e-9)))
      line = f"{self.label}: {self.done}/{self.total} {self.unit}, {self.rate:.1f} {self.unit}/s, ETA {eta}"
      sys.stderr.write(("\r" + line + " " * 4) if self.tty else line + "\n")
      if self.tty and self.done == self.total:
        sys.stderr.write("\n")
      sys.stderr.flush()

  @property
  def rate(self) -> float:
    return self.done / max(time.perf_counter() - self.start, 1e-9)


class Batcher:
  """Fills batches of `batch_size` windows [size, size, channels] (the last one padded with zeros, whose outputs
  are dropped), keeps one batch on the devices while the host consumes the previous one (jax dispatch is
  asynchronous), and hands each window's probabilities to its `consume` in the order the windows came."""

  def __init__(self, forward, batch_size: int, size: int, channels: int, dtype, progress: Progress):
    self.forward, self.progress = forward, progress
    self.pixels = np.zeros((batch_size, size, size, channels), dtype)
    self.pending: list[Callable[[np.ndarray], None]] = []
    self.in_flight = None

  def add(self, pixels: np.ndarray, consume: Callable[[np.ndarray], None]) -> None:
    self.pixels[len(self.pending)] = pixels
    self.pending.append(consume)
    if len(self.pending) == len(self.pixels):
      self.flush()

  def flush(self) -> None:
    submitted = None
    if self.pending:
      self.pixels[len(self.pending) :] = 0
      submitted = (self.forward(self.pixels.copy()), self.pending)
      self.pending = []
    self._consume()
    self.in_flight = submitted

  def close(self) -> None:
    self.flush()
    self._consume()

  def _consume(self) -> None:
    if self.in_flight is None:
      return
    outputs, consumers = self.in_flight
    self.in_flight = None
    probabilities = np.asarray(outputs)
    for index, consume in enumerate(consumers):
      consume(probabilities[index])
    self.progress.update(len(consumers))
