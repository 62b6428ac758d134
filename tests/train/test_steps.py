"""Sharded SFT and RM steps: same numbers on 1 device and on several meshes; really sharded state."""

import functools

import jax
import numpy as np
import optax
import pytest

from rmscale.models import sizes
from rmscale.parallel import mesh as mesh_lib
from rmscale.train import rm, sft
from rmscale.train.state import OptimConfig, compile_train_step, init_state, make_optimizer

V, B, L = 48, 16, 12
CFG = sizes.model_config("100k", vocab_size=V, reward_head="linear", d_ff=128)
MESHES = [
  dict(data=1, fsdp=1, tensor=1),
  dict(data=8),
  dict(data=2, fsdp=4),
  dict(data=2, fsdp=2, tensor=2),
]


def _batch():
  rng = np.random.default_rng(0)
  tok = rng.integers(1, V, (B, L)).astype(np.int32)
  mask = np.ones((B, L), bool)
  mask[::3, :4] = False  # Some left padding.
  return {
    "tokens": tok,
    "mask": mask,
    "loss_mask": mask & (np.arange(L) >= 6),
    "chosen": tok,
    "chosen_mask": mask,
    "rejected": tok[::-1].copy(),
    "rejected_mask": mask[::-1].copy(),
  }


def _run(axes, loss_name, steps=3):
  devices = jax.devices()[: int(np.prod([v for v in axes.values()]))]
  mesh = mesh_lib.make_mesh(axes, devices)
  # SGD with momentum: linear in the gradients, so layouts agree to fp32 reduction noise (Adam would
  # amplify that noise on near-zero gradients).
  tx = optax.sgd(0.05, momentum=0.9)
  state, shardings = init_state(CFG, tx, jax.random.key(0), mesh)
  loss_fn = sft.make_sft_loss(CFG) if loss_name == "sft" else rm.make_rm_loss(CFG)
  step = compile_train_step(loss_fn, tx, shardings, mesh)
  batch = mesh_lib.put_batch(_batch(), mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


@functools.lru_cache(maxsize=None)
def _reference(loss_name):
  return _run(MESHES[0], loss_name)


@pytest.mark.parametrize(
  "loss_name,axes",
  [("sft", m) for m in MESHES[1:]] + [("rm", MESHES[-1])],
  ids=lambda a: "x".join(str(v) for v in a.values()) if isinstance(a, dict) else a,
)
def test_sharded_step_matches_single_device(loss_name, axes):
  ref_state, ref_losses = _reference(loss_name)
  state, losses = _run(axes, loss_name)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)  # fp32 reduction order differs.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
    ref_state["params"],
    state["params"],
  )
  assert losses[-1] < losses[0]
  kernel = state["params"]["layers_0"]["mlp"]["up"]["kernel"]  # logical ('embed', 'mlp')
  spec = kernel.sharding.spec
  assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  n_shards = len({tuple((i.start, i.stop) for i in s.index) for s in kernel.addressable_shards})
  assert n_shards == axes.get("fsdp", 1) * axes.get("tensor", 1)
  mu = state["opt_state"][0].trace["layers_0"]["mlp"]["up"]["kernel"]
  assert mu.sharding.spec == spec  # Optimizer state is sharded like its parameter.


def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match="needs 16 devices"):
    mesh_lib.make_mesh(dict(data=4, fsdp=4))
  with pytest.raises(ValueError, match="only one mesh axis may be -1"):
    mesh_lib.make_mesh(dict(data=-1, fsdp=-1))
  with pytest.raises(ValueError, match="unknown axes"):
    mesh_lib.make_mesh(dict(pipeline=2))
  mesh = mesh_lib.make_mesh(dict(data=8))
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8"):
    mesh_lib.check_batch_divisible(12, mesh, "batch_size")


def test_indivisible_parameter_is_named():
  cfg = sizes.model_config("100k", vocab_size=45)  # vocab 45 cannot split over tensor=2.
  mesh = mesh_lib.make_mesh(dict(data=4, tensor=2))
  tx = make_optimizer(OptimConfig())
  with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\].*45 is not divisible"):
    init_state(cfg, tx, jax.random.key(0), mesh)
