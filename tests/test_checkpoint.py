"""Checkpointer: bit-exact round trips, retention, resume-after-SIGKILL, damage handling, resharding."""

import importlib.util
import logging
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rmscale.checkpoint import Checkpointer, CorruptCheckpointError, abstract_like

WORKER = os.path.join(os.path.dirname(__file__), "_ckpt_worker.py")
# Loaded by path: the worker is a script, and tests/ is not a package.
_spec = importlib.util.spec_from_file_location("_ckpt_worker", WORKER)
_ckpt_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ckpt_worker)


def _leaves_equal(a, b):
  """Same tree structure and bit-identical leaves (typed keys compared by their data)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(x) == jax.random.key_impl(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _mlp_train_state(seed=0):
  """A small MLP after two adamw steps, so that the optimizer moments are non-trivial."""
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(1)])
  rng, init_rng, data_rng = jax.random.split(jax.random.key(seed), 3)
  x_BxD = jax.random.normal(data_rng, (8, 5))
  params = model.init(init_rng, x_BxD)
  opt = optax.adamw(1e-2, weight_decay=0.1)
  opt_state = opt.init(params)

  @jax.jit  # one compile instead of dozens of eager op dispatches
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean(model.apply(p, x_BxD) ** 2))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(2):
    params, opt_state = step(params, opt_state)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(2), "rng": rng}


def test_round_trip_is_bit_exact(tmp_path):
  state = _mlp_train_state()
  meta = {"data_position": 123, "config_hash": "abc123", "lr": [1e-3, 0.5]}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(2, state, meta)
    restored, restored_meta = ckpt.restore(target=abstract_like(state))
    raw, _ = ckpt.restore(step=2)  # no target: arrays as saved, the key as its uint32 data
  _leaves_equal(restored, state)
  assert restored_meta == meta
  assert type(restored["opt_state"][0]) is type(state["opt_state"][0])  # optax namedtuples survive
  # The restored typed key draws the same numbers as the original.
  np.testing.assert_array_equal(
    jax.random.normal(restored["rng"], (3,)), jax.random.normal(state["rng"], (3,))
  )
  np.testing.assert_array_equal(raw["rng"], jax.random.key_data(state["rng"]))
  # Legacy uint32 keys are plain arrays and round-trip as such.
  with Checkpointer(tmp_path / "legacy") as ckpt:
    ckpt.save(0, {"rng": jax.random.PRNGKey(7)})
    legacy, _ = ckpt.restore(target=abstract_like({"rng": jax.random.PRNGKey(7)}))
  np.testing.assert_array_equal(legacy["rng"], jax.random.PRNGKey(7))


def test_save_interval_and_keep_last_k(tmp_path):
  state = {"x": jnp.zeros(3)}
  with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
    saved = [s for s in range(10) if ckpt.save(s, {"x": jnp.full(3, float(s))}, {"s": s})]
    assert saved == [0, 2, 4, 6, 8]
    assert ckpt.save(9, state, {"s": 9}, force=True)
    assert not ckpt.save(9, state, {"s": -1}, force=True)  # never overwrites a committed step
    ckpt.wait()
    assert ckpt.all_steps() == [8, 9] and ckpt.latest_step() == 9
  assert sorted(os.listdir(tmp_path)) == ["8", "9"]  # older steps deleted on disk
  with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:  # a restarted process
    assert ckpt.latest_step() == 9
    x8, meta8 = ckpt.restore(step=8, target=abstract_like(state))
    _, meta9 = ckpt.restore(target=abstract_like(state))
  np.testing.assert_array_equal(x8["x"], np.full(3, 8.0, np.float32))
  assert meta8 == {"s": 8} and meta9 == {"s": 9}


def _run_worker(ckpt_dir, out, *extra):
  return subprocess.run(
    [sys.executable, WORKER, str(ckpt_dir), str(out), "--steps", "12", "--save-every", "3", *extra],
    capture_output=True,
    text=True,
    env=dict(os.environ),
    timeout=120,
  )


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  ckpt_dir, out = tmp_path / "ckpt", tmp_path / "params.npz"

  # Killed right after step 6's save was issued, i.e. while it is still being written.
  first = _run_worker(ckpt_dir, out, "--kill-at", "6")
  assert first.returncode == -9, first.stderr
  # Step 6 is usually torn: then at most a temporary directory for it is left, never a step.
  leftovers = [name for name in os.listdir(ckpt_dir) if not name.isdigit()]
  assert all(name.startswith("6.") for name in leftovers), leftovers
  with Checkpointer(ckpt_dir) as ckpt:
    committed = ckpt.all_steps()
    assert committed[-1] in (3, 6) and set(committed) <= {1, 3, 6}, committed
    for s in committed:  # whatever is committed is complete
      ckpt.restore(step=s)
  assert sorted(os.listdir(ckpt_dir)) == sorted(map(str, committed))  # leftovers cleaned up

  # Killed again between saves, then run to the end.
  second = _run_worker(ckpt_dir, out, "--kill-at", "8")
  assert second.returncode == -9, second.stderr
  assert f"resumed_from {committed[-1]}" in second.stdout
  third = _run_worker(ckpt_dir, out)
  assert third.returncode == 0, third.stderr
  assert "resumed_from" in third.stdout

  resumed = dict(np.load(out))
  reference = _ckpt_worker.train(12)  # same steps, never checkpointed
  assert resumed.keys() == reference.keys()
  for name in reference:
    np.testing.assert_array_equal(resumed[name], reference[name])
  # Not vacuous: one step more or less, or no training at all, would be told apart.
  for other in (_ckpt_worker.train(11), _ckpt_worker.train(0)):
    assert not np.array_equal(other["w"], reference["w"])


def _truncate_item_files(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["truncate_state_files", "delete_meta_item"])
def test_damaged_latest_step_falls_back_and_explicit_step_raises(tmp_path, damage, caplog):
  state = {"w": jnp.arange(300.0)}
  with Checkpointer(tmp_path) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, {"w": state["w"] + s}, {"s": s})
  step_dir = os.path.join(tmp_path, "3")
  if damage == "truncate_state_files":
    _truncate_item_files(step_dir)
  else:
    shutil.rmtree(os.path.join(step_dir, "meta"))

  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3  # committed, but unreadable
    with caplog.at_level(logging.WARNING, logger="rmscale.checkpoint"):
      restored, meta = ckpt.restore(target=abstract_like(state))
    assert meta == {"s": 2}
    np.testing.assert_array_equal(restored["w"], np.arange(300.0, dtype=np.float32) + 2)
    assert any(step_dir in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    with pytest.raises(CorruptCheckpointError, match=f"step 3 at {step_dir}"):
      ckpt.restore(step=3, target=abstract_like(state))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
      ckpt.restore(step=7)


def test_every_step_unreadable_raises_naming_directory(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"w": jnp.ones(4)})
    ckpt.save(2, {"w": jnp.ones(4)})
  wrong_target = {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}  # a shape the checkpoint lacks
  with Checkpointer(tmp_path) as ckpt, pytest.raises(CorruptCheckpointError, match=str(tmp_path)):
    ckpt.restore(target=wrong_target)


def test_restore_reshards_onto_other_meshes(tmp_path):
  devices = np.array(jax.devices())
  assert devices.size == 8
  mesh_8 = Mesh(devices, ("data",))
  rows = NamedSharding(mesh_8, P("data"))
  state = {
    "w": jax.device_put(jnp.arange(16 * 6, dtype=jnp.float32).reshape(16, 6), rows),
    "b": jax.device_put(jnp.arange(8, dtype=jnp.bfloat16), rows),
    "rng": jax.device_put(jax.random.split(jax.random.key(3), 8), rows),
    "step": jnp.int32(5),
  }
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, state)

    replicated = NamedSharding(mesh_8, P())
    full, _ = ckpt.restore(target=abstract_like(state, shardings=replicated))
    _leaves_equal(full, state)
    for x in jax.tree.leaves(full):  # key arrays spell P() as P(None): compare equivalence
      assert x.sharding.is_fully_replicated and x.sharding.is_equivalent_to(replicated, x.ndim)

    mesh_2x4 = Mesh(devices.reshape(2, 4), ("data", "model"))
    on_2x4 = lambda *spec: NamedSharding(mesh_2x4, P(*spec))  # noqa: E731
    shardings = {
      "w": on_2x4("model", "data"),
      "b": on_2x4("model"),
      "rng": on_2x4(("data", "model")),
      "step": on_2x4(),
    }
    moved, _ = ckpt.restore(target=abstract_like(state, shardings=shardings))
  _leaves_equal(moved, state)
  for name, sharding in shardings.items():
    assert moved[name].sharding.is_equivalent_to(sharding, moved[name].ndim), name
  assert moved["w"].sharding == shardings["w"]
  assert moved["w"].addressable_shards[0].data.shape == (4, 3)  # really split 4 x 2 ways


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match="save_interval_steps"):
    Checkpointer(tmp_path, save_interval_steps=0)
  with pytest.raises(ValueError, match="max_to_keep"):
    Checkpointer(tmp_path, max_to_keep=0)
  with pytest.raises(ValueError, match="str"):
    abstract_like({"name": "not an array"})
  with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="JSON"):
    ckpt.save(0, {"x": jnp.zeros(1)}, {"bad": object()})
