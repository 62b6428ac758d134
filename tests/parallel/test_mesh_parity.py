"""Every jitted step on 8 fake CPU devices: same numbers on each mesh as on one device, really sharded.

For the meshes (data, fsdp, tensor) = (8,1,1), (2,4,1), (2,2,2) against (1,1,1): the SFT step, the RM
step, a PPO iteration (rollout -> GAE -> minibatch updates), the sampler (a fixed key: identical
tokens) and best-of-n scoring with the reward model's scorer. Besides the numbers, each test checks
the layout: parameter and optimizer-state shardings and the shape of each device's shard, batch rows
per device, and that the donated input state is gone after a step.

One tiny model with every head (LM, reward, value) serves all steps, so one parameter tree is made
once and placed on each mesh. It has the offline world's 291-word vocabulary, which tensor=2 can
split only once padded to 296 rows (``model.vocab_multiple=8``). Programs are compiled lazily once per (program, mesh) at a low CPU
optimisation level (compiling is most of this file's time) and shared by the tests.

Tolerances: the steps use SGD with momentum (linear in the gradients), so layouts differ only by the
order of fp32 reductions: losses to rtol 2e-5, parameters to atol 1e-6 + rtol 1e-4, log-probs and
scores to atol 1e-5, PPO metrics to rtol 1e-4 + atol 1e-5. Sampled tokens and best-of-n choices must
be identical (a flip would need a draw within ~1e-6 of a category boundary; the run is
deterministic, so this cannot be flaky).
"""

import functools
import importlib.util
import os

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rmscale.models import sizes
from rmscale.parallel import mesh as mesh_lib
from rmscale.sampling import SamplingConfig, make_sharded_sampler
from rmscale.train import policy, ppo, rm, sft
from rmscale.train.state import OptimConfig, compile_train_step, init_state, make_optimizer

# The 2-process worker's helpers (a script, not a package module).
_spec = importlib.util.spec_from_file_location(
  "_dist_worker", os.path.join(os.path.dirname(__file__), "_dist_worker.py")
)
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)

V, P_LEN, N_NEW, EOS = 291, 4, 4, 1  # The offline world's vocabulary: 291 words.
B, L = 16, P_LEN + N_NEW
# d_model 32 splits over fsdp=4, 4 heads and d_ff 64 over tensor=2, the vocabulary once padded to 296.
CFG = sizes.model_config(
  "25k",
  vocab_size=V,
  vocab_multiple=8,
  n_layers=1,
  d_ff=64,
  max_len=L,
  reward_head="linear",
  value_head=True,
)
E, F = CFG.d_model, CFG.d_ff
REF_CFG = policy.reference_config(CFG)  # Also the reward model: the same trunk's reward head.
REFERENCE = (1, 1, 1)
INIT_KEY = jax.random.key(0)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
TX = optax.sgd(0.05, momentum=0.9)
PPO = ppo.PPOConfig(
  rollout_batch_size=B, minibatch_size=8, epochs=2, kl_coef=0.1, max_new_tokens=N_NEW, eos_id=EOS
)
SCFG = SamplingConfig(max_new_tokens=N_NEW, temperature=0.7, eos_id=EOS)


# Compile time is most of this file's time (tiny programs, each compiled twice).
FAST_COMPILE = _worker.fast_compile_options()
ids = lambda shape: "x".join(map(str, shape))  # noqa: E731


def _rows(n_rows: int, seed: int):
  rng = np.random.default_rng(seed)
  tok = rng.integers(2, V, (n_rows, L)).astype(np.int32)
  mask = np.ones((n_rows, L), bool)
  mask[::3, :2] = False  # Some left padding.
  return np.where(mask, tok, 0), mask


def sft_rm_batch():
  tok, mask = _rows(B, 0)
  rej, rej_mask = _rows(B, 1)
  return {
    "tokens": tok,
    "mask": mask,
    "loss_mask": mask & (np.arange(L) >= P_LEN),
    "chosen": tok,
    "chosen_mask": mask,
    "rejected": rej,
    "rejected_mask": rej_mask,
  }


def prompts(seed: int, n: int = B):
  tok, mask = _rows(n, seed)
  return {"ids": tok[:, :P_LEN], "mask": mask[:, :P_LEN]}


def make_mesh(shape):
  return mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), jax.devices()[: np.prod(shape)])


@functools.lru_cache(maxsize=None)
def setup(shape):
  """The mesh and, on it, the initial train state (host copy) and its shardings.

  The single-device state is initialised at random; every other mesh starts from its parameters.
  """
  mesh = make_mesh(shape)
  params = None if shape == REFERENCE else host_params()
  state, shardings = init_state(
    CFG, TX, INIT_KEY, mesh, params=params, compiler_options=FAST_COMPILE
  )
  return mesh, jax.device_get(state), shardings


def host_params():
  return setup(REFERENCE)[1]["params"]


def check_param_layout(params, opt_trace, shape):
  """FSDP splits the model dimension, tensor parallelism the MLP and the vocabulary; every device
  holds exactly its block, and the optimizer state is laid out like its parameter."""
  _, fsdp, tensor = shape
  blocks = {
    ("layers_0", "mlp", "up", "kernel"): (P("fsdp", "tensor"), (E // fsdp, F // tensor)),
    ("embed", "embedding"): (P("tensor", "fsdp"), (CFG.padded_vocab // tensor, E // fsdp)),
    ("lm_head", "kernel"): (P("fsdp", "tensor"), (E // fsdp, CFG.padded_vocab // tensor)),
  }
  for path, (spec, block) in blocks.items():
    leaf = functools.reduce(lambda t, k: t[k], path, params)
    assert leaf.sharding.spec == spec, path
    assert {s.data.shape for s in leaf.addressable_shards} == {block}, path
    n_distinct = len({tuple((i.start, i.stop) for i in s.index) for s in leaf.addressable_shards})
    assert n_distinct == fsdp * tensor, path
    if opt_trace is not None:
      assert functools.reduce(lambda t, k: t[k], path, opt_trace).sharding.spec == spec, path


def check_rows_per_device(array, shape):
  data, fsdp, _ = shape
  assert {s.data.shape[0] for s in array.addressable_shards} == {array.shape[0] // (data * fsdp)}


# -- runs, one per (program, mesh) -------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def run_train_step(kind, shape, steps=2):
  mesh, host_state, shardings = setup(shape)
  loss_fn = sft.make_sft_loss(CFG) if kind == "sft" else rm.make_rm_loss(CFG)
  step = compile_train_step(loss_fn, TX, shardings, mesh, compiler_options=FAST_COMPILE)
  keys = ("tokens", "mask", "loss_mask") if kind == "sft" else rm.BATCH_KEYS
  batch = mesh_lib.put_batch({k: v for k, v in sft_rm_batch().items() if k in keys}, mesh)
  check_rows_per_device(batch[keys[0]], shape)
  state = jax.device_put(host_state, shardings)
  losses = []
  for _ in range(steps):
    old = state
    state, metrics = step(state, batch)
    assert old["params"]["layers_0"]["mlp"]["up"]["kernel"].is_deleted()  # Donated.
    losses.append(float(metrics["loss"]))
  check_param_layout(state["params"], state["opt_state"][0].trace, shape)
  return np.asarray(losses), jax.device_get(state["params"])


@functools.lru_cache(maxsize=None)
def run_ppo(shape, iterations=2):
  mesh, _, _ = setup(shape)
  state, shardings = ppo.init_ppo_state(
    PPO, CFG, host_params(), TX, jax.random.key(2), mesh, compiler_options=FAST_COMPILE
  )
  ref_shardings = policy.model_param_shardings(REF_CFG, mesh)
  step = ppo.make_ppo_step(
    PPO,
    CFG,
    policy.rm_reward_fn(REF_CFG),
    TX,
    shardings,
    mesh,
    reward_shardings=ref_shardings,
    compiler_options=FAST_COMPILE,
  )
  ref = jax.device_put({k: v for k, v in host_params().items() if k != "value_head"}, ref_shardings)
  metrics = []
  for it in range(iterations):
    old = state
    state, m = step(state, ref, ref, mesh_lib.put_batch(prompts(10 + it), mesh))
    assert old["params"]["lm_head"]["kernel"].is_deleted()  # Donated.
    metrics.append(jax.device_get(m))
  check_param_layout(state["params"], state["opt_state"][0].trace, shape)
  return metrics, jax.device_get(state["params"])


@functools.lru_cache(maxsize=None)
def run_sample_and_score(shape, k=4):
  """Best-of-k for 4 prompts: k samples each (one fixed key), scored by the reward head."""
  mesh, host_state, shardings = setup(shape)
  params = jax.device_put(host_state["params"], shardings["params"])
  sampler = make_sharded_sampler(
    CFG, SCFG, mesh, shardings["params"], compiler_options=FAST_COMPILE
  )
  p = prompts(20, B // k)
  p = {key: np.repeat(v, k, axis=0) for key, v in p.items()}  # Rows i*k ... i*k+k-1: prompt i.
  placed = mesh_lib.put_batch(p, mesh)
  out = sampler(params, placed["ids"], placed["mask"], jax.random.key(3))
  for v in out.values():
    check_rows_per_device(v, shape)
  out = jax.device_get(out)
  scorer = rm.make_scorer(CFG, mesh, shardings["params"], compiler_options=FAST_COMPILE)
  seq = mesh_lib.put_batch(
    {
      "tokens": np.concatenate([p["ids"], out["tokens"]], 1),
      "mask": np.concatenate([p["mask"], out["mask"]], 1),
    },
    mesh,
  )
  scores = scorer(params, seq["tokens"], seq["mask"])
  assert scores.sharding.is_fully_replicated
  scores = np.asarray(jax.device_get(scores))
  return out, scores, scores.reshape(-1, k).argmax(1)


# -- tests -------------------------------------------------------------------------------------


def _close_trees(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, **tol), a, b)


@pytest.mark.parametrize("shape", MESHES, ids=ids)
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_train_step_matches_single_device(kind, shape):
  ref_losses, ref_params = run_train_step(kind, REFERENCE)
  losses, params = run_train_step(kind, shape)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  _close_trees(ref_params, params, atol=1e-6, rtol=1e-4)
  assert losses[-1] < losses[0]
  # The step trained the heads its loss reads, and only those (zero gradients leave the rest).
  lm = lambda p: p["lm_head"]["kernel"]  # noqa: E731
  reward = lambda p: p["reward_head"]["score"]["kernel"]  # noqa: E731
  moved, still = (lm, reward) if kind == "sft" else (reward, lm)
  assert not np.allclose(moved(params), moved(host_params()))
  np.testing.assert_array_equal(still(params), still(host_params()))


@pytest.mark.parametrize("shape", MESHES, ids=ids)
def test_ppo_iteration_matches_single_device(shape):
  ref_metrics, ref_params = run_ppo(REFERENCE)
  metrics, params = run_ppo(shape)
  for a, b in zip(ref_metrics, metrics):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
  _close_trees(ref_params, params, atol=1e-5, rtol=1e-4)
  # The iterations did something: responses were scored, the KL penalty was live, the policy moved.
  assert ref_metrics[1]["kl_mean"] != 0 and ref_metrics[0]["response_len"] > 0
  assert not np.allclose(params["lm_head"]["kernel"], host_params()["lm_head"]["kernel"])


@pytest.mark.parametrize("shape", MESHES, ids=ids)
def test_sampler_and_best_of_n_match_single_device(shape):
  ref_out, ref_scores, ref_best = run_sample_and_score(REFERENCE)
  out, scores, best = run_sample_and_score(shape)
  np.testing.assert_array_equal(out["tokens"], ref_out["tokens"])
  assert out["tokens"].max() < V  # Never a padded vocabulary entry.
  np.testing.assert_array_equal(out["mask"], ref_out["mask"])
  np.testing.assert_allclose(out["logprobs"], ref_out["logprobs"], atol=1e-5)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
  np.testing.assert_array_equal(best, ref_best)
  # Not degenerate: samples of one prompt differ, and so do their k scores.
  tokens = ref_out["tokens"].reshape(-1, 4, N_NEW)
  assert any(len({tuple(r) for r in rows}) > 1 for rows in tokens)
  assert np.ptp(ref_scores.reshape(-1, 4), axis=1).min() > 0


def test_random_init_is_made_sharded_and_matches_single_device():
  """Parameters created on the (2,2,2) mesh (eval_shape -> shardings -> jitted init) hold the same
  values as on one device: the random bits do not depend on the layout. (The padded vocabulary's
  tables draw 291 rows split unevenly over devices, which turns bits into floats through another
  code path: equal to a few ulps.)"""
  shape = (2, 2, 2)
  state, _ = init_state(CFG, TX, INIT_KEY, make_mesh(shape), compiler_options=FAST_COMPILE)
  check_param_layout(state["params"], state["opt_state"][0].trace, shape)
  _close_trees(host_params(), jax.device_get(state["params"]), rtol=1e-6, atol=0)
  padded = jax.device_get(state["params"]["embed"]["embedding"])[V:]
  assert padded.shape == (CFG.padded_vocab - V, E) and not padded.any()


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
  with pytest.raises(
    ValueError, match=r"\['embed'\]\['embedding'\].*45 is not divisible.*model.vocab_multiple"
  ):
    init_state(cfg, tx, jax.random.key(0), mesh)
