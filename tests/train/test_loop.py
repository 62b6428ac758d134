"""train_loop: a run stopped after any step resumes from its checkpoint to the same parameters."""

import jax
import numpy as np
import pytest

from rmscale.data.batching import batch_indices, make_batch_fn
from rmscale.models import sizes
from rmscale.parallel import mesh as mesh_lib
from rmscale.train import sft
from rmscale.train.loop import train_loop
from rmscale.train.state import OptimConfig, compile_train_step, init_state, make_optimizer

CFG = sizes.model_config("100k", vocab_size=32, max_len=16)


def _setup():
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  tx = make_optimizer(OptimConfig(learning_rate=3e-3, total_steps=12))
  state, shardings = init_state(CFG, tx, jax.random.key(0), mesh)
  step = compile_train_step(sft.make_sft_loss(CFG), tx, shardings, mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 32, (40, 16)).astype(np.int32)
  data = {
    "tokens": tokens,
    "mask": np.ones_like(tokens, bool),
    "loss_mask": np.ones_like(tokens, bool),
  }
  batch_fn = make_batch_fn(data, 8, seed=1)
  return state, shardings, step, lambda s: mesh_lib.put_batch(batch_fn(s), mesh)


def test_resume_matches_uninterrupted(tmp_path):
  state, shardings, step, batches = _setup()
  full, history, _ = train_loop(state, shardings, step, batches, 12, log_every=4)
  assert [h["step"] for h in history] == [4, 8, 12]

  state, shardings, step, batches = _setup()
  ckpt = str(tmp_path / "ckpt")
  train_loop(
    state, shardings, step, batches, 7, ckpt_dir=ckpt, save_every=3, log_every=4
  )  # "killed" at 7
  state, shardings, step, batches = _setup()  # A fresh process: new random state, same config.
  resumed, history, _ = train_loop(
    state, shardings, step, batches, 12, ckpt_dir=ckpt, save_every=3, log_every=4
  )
  assert int(resumed["step"]) == 12
  assert [h["step"] for h in history] == [
    4,
    7,
    8,
    12,
  ]  # History continues from the checkpoint's meta.
  jax.tree.map(np.testing.assert_array_equal, full["params"], resumed["params"])


def test_nan_stops_the_run_naming_the_metric():
  state, shardings, _, batches = _setup()

  def nan_step(state, batch):
    return state, {"loss": np.float32("nan")}

  with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
    train_loop(state, shardings, nan_step, batches, 3, log_every=1)


def test_batches_cover_each_epoch_once_and_are_deterministic():
  idx = np.concatenate([batch_indices(s, 10, 4, seed=3) for s in range(5)])  # 2 epochs of 10
  assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
  np.testing.assert_array_equal(batch_indices(3, 10, 4, seed=3), batch_indices(3, 10, 4, seed=3))
  assert not np.array_equal(batch_indices(0, 10, 4, seed=3), batch_indices(0, 10, 4, seed=4))
