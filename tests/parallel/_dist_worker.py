"""One process of a multi-process RM training run on localhost CPU, for tests/parallel/test_distributed.py.

Started twice (process ids 0 and 1), each with 2 local CPU devices, joined through
``rmscale.parallel.distributed.initialize`` from the ``RMSCALE_*`` environment variables, collectives
over gloo. Trains a tiny reward model with rmscale's own ``init_state`` / ``compile_train_step`` /
``make_batch_fn`` (each host reads only its rows) / ``put_batch`` on a mesh whose sharded axes span
both processes, saves the final state with the orbax ``Checkpointer`` (each host writes its shards),
scores the dataset with the jitted scorer from inputs every host holds in full (as the pipeline's
scoring and sampling do), and writes losses, scores and the gathered parameters to ``OUT_DIR/p<id>.npz``.

    RMSCALE_COORDINATOR=localhost:PORT RMSCALE_NUM_PROCESSES=2 RMSCALE_PROCESS_ID=0 \
        python tests/parallel/_dist_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import numpy as np

V, B, L, STEPS = 48, 16, 12, 3
# A mesh over 4 devices (2 per process) whose fsdp axis spans the two hosts: the batch and the
# parameters are split across hosts (gradients reduce-scattered over gloo), tensor-parallel inside each.
MESH = dict(data=1, fsdp=2, tensor=2)


def dataset() -> dict[str, np.ndarray]:
  """64 comparisons; batches of 16 drawn by ``make_batch_fn`` (a different permutation per epoch)."""
  rng = np.random.default_rng(0)
  n = 64
  chosen = rng.integers(1, V, (n, L)).astype(np.int32)
  rejected = rng.integers(1, V, (n, L)).astype(np.int32)
  chosen[:, -1], rejected[:, -1] = 7, 8  # A learnable preference: the reward reads the last token.
  mask = np.ones((n, L), bool)
  mask[::3, :4] = False  # Some left padding.
  return {
    "chosen": chosen,
    "chosen_mask": mask,
    "rejected": rejected,
    "rejected_mask": mask[::-1].copy(),
  }


def score(params, axes: dict, devices) -> np.ndarray:
  """Rewards of every chosen, then every rejected sequence, by rmscale's jitted scorer; every host
  passes all rows (as the pipeline's scoring does) and gets all scores back."""
  from rmscale.models import sizes
  from rmscale.models.transformer import abstract_params
  from rmscale.parallel import distributed
  from rmscale.parallel import mesh as mesh_lib
  from rmscale.train import rm

  cfg = sizes.model_config("100k", vocab_size=V, reward_head="linear", d_ff=128)
  mesh = mesh_lib.make_mesh(axes, devices)
  shapes, specs = abstract_params(cfg)
  scorer = rm.make_scorer(cfg, mesh, mesh_lib.logical_shardings(shapes, specs, mesh))
  data = mesh_lib.batch_sharding(mesh)

  def global_scorer(p, tokens, mask):
    return scorer(p, distributed.global_array(tokens, data), distributed.global_array(mask, data))

  d = dataset()
  return rm.score_in_batches(
    global_scorer,
    params,
    np.concatenate([d["chosen"], d["rejected"]]),
    np.concatenate([d["chosen_mask"], d["rejected_mask"]]),
    16,
  )


def train(axes: dict, devices, ckpt_dir: str | None = None):
  """Trains STEPS steps on a mesh over ``devices``; returns (losses, final state)."""
  import jax
  import optax

  from rmscale.checkpoint import Checkpointer
  from rmscale.data.batching import make_batch_fn
  from rmscale.models import sizes
  from rmscale.parallel import mesh as mesh_lib
  from rmscale.train import rm
  from rmscale.train.state import compile_train_step, init_state

  cfg = sizes.model_config("100k", vocab_size=V, reward_head="linear", d_ff=128)
  mesh = mesh_lib.make_mesh(axes, devices)
  # SGD with momentum: linear in the gradients, so layouts agree to fp32 reduction noise.
  tx = optax.sgd(0.05, momentum=0.9)
  state, shardings = init_state(cfg, tx, jax.random.key(0), mesh)
  step_fn = compile_train_step(rm.make_rm_loss(cfg), tx, shardings, mesh)
  batch_fn = make_batch_fn(dataset(), B, seed=3)
  losses = []
  for s in range(STEPS):
    state, metrics = step_fn(state, mesh_lib.put_batch(batch_fn(s), mesh))
    losses.append(float(metrics["loss"]))
  if ckpt_dir is not None:
    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
      ckpt.save(STEPS, state, {"data_position": STEPS}, force=True)
  return np.asarray(losses), state


def flatten(tree) -> dict[str, np.ndarray]:
  import jax

  return {
    jax.tree_util.keystr(path): np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def main(out_dir: str) -> None:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")  # As tests/conftest.py.

  from jax.experimental import multihost_utils

  from rmscale.parallel import distributed

  plan = distributed.initialize()
  assert plan.kind == "explicit", plan
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  pid = jax.process_index()
  losses, state = train(MESH, jax.devices(), ckpt_dir=os.path.join(out_dir, "ckpt"))
  kernel = state["params"]["layers_0"]["mlp"]["up"]["kernel"]  # logical ('embed', 'mlp')
  # Which rows of the kernel this host holds: half of them if the parameters are really split.
  addressable_rows = sorted({s.index[0].start or 0 for s in kernel.addressable_shards})
  params = multihost_utils.process_allgather(state["params"], tiled=True)
  scores = score(state["params"], MESH, jax.devices())
  # A batch-sharded array that spans both hosts comes back whole on each.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("rows",))
  rows = distributed.to_host(
    distributed.global_array(
      np.arange(8.0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    )
  )
  np.savez(
    os.path.join(out_dir, f"p{pid}.npz"),
    losses=losses,
    scores=scores,
    rows=rows,
    agree=np.asarray(distributed.agree(pid == 0)),
    fully_addressable=np.asarray(kernel.is_fully_addressable),
    addressable_rows=np.asarray(addressable_rows),
    **flatten(params),
  )
  distributed.barrier("worker done")


if __name__ == "__main__":
  main(sys.argv[1])
