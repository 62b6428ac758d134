"""Deterministic minibatches: the batch at step s is a pure function of (seed, s).

Each epoch is a fresh seeded permutation, so the data position *is* the step and a resumed run
sees exactly the batches an uninterrupted one would. Each host takes its own slice of every global
batch (multi-host data loading without coordination).
"""

from __future__ import annotations

import jax
import numpy as np


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """Global example indices of ``step``'s batch; batches run across epoch boundaries."""
  if num_examples <= 0:
    raise ValueError("cannot draw batches from an empty dataset")
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    sel = epochs == epoch
    out[sel] = perm[offsets[sel]]
  return out


def host_slice(global_batch_size: int) -> slice:
  """This process's rows of a global batch."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {n} processes")
  per = global_batch_size // n
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def make_batch_fn(arrays: dict[str, np.ndarray], batch_size: int, seed: int):
  """``batch_fn(step) -> dict`` of this host's rows of the step's batch."""
  sizes = {len(v) for v in arrays.values()}
  if len(sizes) != 1:
    raise ValueError(
      f"dataset arrays have different lengths: { {k: len(v) for k, v in arrays.items()} }"
    )
  n = sizes.pop()
  rows = host_slice(batch_size)

  def batch_fn(step: int) -> dict[str, np.ndarray]:
    idx = batch_indices(step, n, batch_size, seed)[rows]
    return {k: v[idx] for k, v in arrays.items()}

  return batch_fn
