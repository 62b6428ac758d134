"""One process of a multi-process RM training and PPO run on localhost CPU, for test_distributed.py.

Started twice (process ids 0 and 1), each with 2 local CPU devices, joined through
``rmscale.parallel.distributed.initialize`` from the ``RMSCALE_*`` environment variables, collectives
over gloo. Trains a tiny reward model with rmscale's own ``init_state`` / ``compile_train_step`` /
``make_batch_fn`` (each host reads only its rows) / ``put_batch`` on a mesh whose sharded axes span
both processes, saves the final state with the orbax ``Checkpointer`` (each host writes its shards),
scores the dataset with the jitted scorer from inputs every host holds in full (as the pipeline's
scoring and sampling do), and writes losses, scores and the gathered parameters to ``OUT_DIR/p<id>.npz``.
Then two PPO iterations against a reward model, as the rl stage runs them: prompts and evaluation
prompts are host arrays every process draws in full from a shared seed, the policy, reference and
reward parameters are sharded across both hosts; the metrics, the evaluation's samples and the final
policy go to ``OUT_DIR/ppo<id>.npz``.

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
  scorer = rm.make_scorer(
    cfg,
    mesh,
    mesh_lib.logical_shardings(shapes, specs, mesh),
    compiler_options=fast_compile_options(),
  )
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
  fast = fast_compile_options()
  state, shardings = init_state(cfg, tx, jax.random.key(0), mesh, compiler_options=fast)
  step_fn = compile_train_step(rm.make_rm_loss(cfg), tx, shardings, mesh, compiler_options=fast)
  batch_fn = make_batch_fn(dataset(), B, seed=3)
  losses = []
  for s in range(STEPS):
    state, metrics = step_fn(state, mesh_lib.put_batch(batch_fn(s), mesh))
    losses.append(float(metrics["loss"]))
  if ckpt_dir is not None:
    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
      ckpt.save(STEPS, state, {"data_position": STEPS}, force=True)
  return np.asarray(losses), state


# PPO: a one-layer policy with the RM's vocabulary; 8 prompts of 4 tokens, 4 new tokens each.
PPO_P, PPO_N, PPO_ITERATIONS, EVAL_PROMPTS = 4, 4, 2, 12


def fast_compile_options() -> dict:
  """XLA options that quarter CPU compile time, which is most of a tiny run's: no LLVM optimisation,
  and the older loop emitters where this XLA still has them (test_mesh_parity.py uses it too)."""
  import jax

  options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  except Exception:  # An XLA without the flag rejects it; the first one alone is always known.
    return {"xla_backend_optimization_level": 0}
  return options


def ppo_prompts(seed: int, n: int) -> dict[str, np.ndarray]:
  """Left-padded prompts drawn from a seed: every process builds the same whole batch."""
  rng = np.random.default_rng([7, seed])
  ids = rng.integers(2, V, (n, PPO_P)).astype(np.int32)
  mask = np.ones((n, PPO_P), bool)
  mask[::3, :2] = False
  return {"ids": np.where(mask, ids, 0), "mask": mask}


def ppo_run(axes: dict, devices) -> dict[str, np.ndarray]:
  """PPO_ITERATIONS iterations and one evaluation on a mesh over ``devices``: host-array prompts,
  sharded parameters. Returns host arrays (metrics, evaluation samples, final policy) on every
  process."""
  import jax
  import optax

  from rmscale.models import sizes
  from rmscale.models.transformer import init_params
  from rmscale.parallel import distributed
  from rmscale.parallel import mesh as mesh_lib
  from rmscale.train import policy, ppo

  policy_model = sizes.model_config("25k", vocab_size=V, n_layers=1, d_ff=64, max_len=PPO_P + PPO_N)
  rm_cfg = policy_model.replace(lm_head=False, reward_head="linear")
  cfg = ppo.PPOConfig(
    rollout_batch_size=8, minibatch_size=4, epochs=2, kl_coef=0.1, max_new_tokens=PPO_N, eos_id=1
  )
  mesh = mesh_lib.make_mesh(axes, devices)
  tx = optax.sgd(0.05, momentum=0.9)  # Linear in the gradients: layouts agree to reduction noise.
  fast = fast_compile_options()

  def sharded(model_cfg, seed):
    """Seeded parameters (the same on every process) laid out on the mesh, as load_params does."""
    init_fn = jax.jit(lambda k: init_params(model_cfg, k)[0], compiler_options=fast)
    host = jax.device_get(init_fn(jax.random.key(seed)))
    shardings = policy.model_param_shardings(model_cfg, mesh)
    return jax.tree.map(distributed.global_array, host, shardings), shardings

  init, _ = sharded(policy_model, 0)
  rm_params, rm_shardings = sharded(rm_cfg, 1)
  policy_cfg = policy_model.replace(value_head=True)
  state, shardings = ppo.init_ppo_state(
    cfg, policy_cfg, init, tx, jax.random.key(2), mesh, compiler_options=fast
  )
  reward_fn = policy.rm_reward_fn(rm_cfg)
  step = ppo.make_ppo_step(
    cfg,
    policy_cfg,
    reward_fn,
    tx,
    shardings,
    mesh,
    reward_shardings=rm_shardings,
    compiler_options=fast,
  )
  evaluator = policy.make_evaluator(
    cfg.rollout_config(),
    policy_cfg,
    shardings["params"],
    mesh,
    reward_fn=reward_fn,
    reward_shardings=rm_shardings,
    compiler_options=fast,
  )
  metrics = []
  for it in range(PPO_ITERATIONS):
    state, m = step(state, init, rm_params, ppo_prompts(it, cfg.rollout_batch_size))
    metrics.append(jax.device_get(m))  # Replicated: every process reads it whole.
  # 12 prompts in batches of 8: the last batch is padded, as the rl stage's evaluations can be.
  p = ppo_prompts(100, EVAL_PROMPTS)
  res = policy.evaluate(
    evaluator,
    state["params"],
    init,
    p["ids"],
    p["mask"],
    jax.random.key(3),
    reward_params=rm_params,
  )
  out = {f"metric_{k}": np.asarray([m[k] for m in metrics]) for k in metrics[0]}
  out.update({f"eval_{k}": np.asarray(res[k]) for k in ("tokens", "mask", "kl", "score")})
  params = flatten(distributed.to_host(state["params"]))
  out.update({f"param_{k}": v for k, v in params.items()})
  return out


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
  # The PPO iteration's sharded parameters span both hosts (fsdp=2 across processes).
  np.savez(os.path.join(out_dir, f"ppo{pid}.npz"), **ppo_run(MESH, jax.devices()))
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
