"""REINFORCE, ReMax, RLOO and GRPO: advantages and losses against hand computation and plain loops;
learning a toy reward, sharding parity and resume.

The jitted iterations are compiled once per configuration, optimizer and mesh (module-level caches)
and reused across tests, since compiling is most of this file's time on a CPU.
"""

import functools
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmscale.models import sizes
from rmscale.models.transformer import init_params
from rmscale.parallel import mesh as mesh_lib
from rmscale.sampling import SamplingConfig, sample
from rmscale.train import pg
from rmscale.train.loop import train_loop
from rmscale.train.state import OptimConfig, make_optimizer

V, P, N, TARGET, EOS = 16, 4, 8, 7, 1
POLICY = sizes.model_config("100k", vocab_size=V, max_len=P + N)
ITERATIONS = 24
COMMON = dict(rollout_batch_size=32, minibatch_size=16, max_new_tokens=N, eos_id=EOS)
CFGS = {
  "reinforce": pg.PGConfig(estimator="reinforce", k=1, baseline_decay=0.5, **COMMON),
  # KL penalties in the reward: ReMax's greedy baseline pays it too; GRPO also has its KL loss.
  "remax": pg.PGConfig(estimator="remax", k=1, kl_coef=0.01, **COMMON),
  "rloo": pg.PGConfig(estimator="rloo", k=4, **COMMON),
  "grpo": pg.PGConfig(estimator="grpo", k=4, epochs=2, kl_coef=0.01, **COMMON),
}
TXS = {
  "adam": make_optimizer(OptimConfig(learning_rate=3e-3, total_steps=ITERATIONS * 4)),
  # For sharding parity: linear in the gradients, so layouts differ only by the order of fp32
  # reductions (Adam's g / sqrt(v) turns that noise into lr-sized steps on near-zero gradients).
  "sgd": optax.sgd(0.05, momentum=0.9),
}
TX = TXS["adam"]
# Unoptimised CPU code generation halves compile time, which is most of this file's time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SINGLE = (1, 1, 1)


def toy_reward(params, tokens_BxL, mask_BxL):
  """Fraction of the N response slots holding TARGET: rewards emitting it and not stopping early."""
  del params
  return jnp.sum((tokens_BxL[:, P:] == TARGET) & mask_BxL[:, P:], axis=1) / N


def prompts(iteration, n):
  rng = np.random.default_rng([0, iteration])
  ids = rng.integers(2, V, (n, P)).astype(np.int32)
  mask = np.ones((n, P), bool)
  mask[:, :2] &= rng.random((n, 1)) < 0.6  # Some rows left-padded by 2.
  return {"ids": np.where(mask, ids, 0), "mask": mask}


@functools.lru_cache(maxsize=None)
def init_policy():
  return jax.jit(lambda key: init_params(POLICY, key)[0])(jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _compiled(estimator, shape, optimizer):
  """The mesh, a host copy of the initial state, its shardings and the jitted step."""
  cfg, tx = CFGS[estimator], TXS[optimizer]
  mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), jax.devices()[: math.prod(shape)])
  state, shardings = pg.init_pg_state(cfg, POLICY, init_policy(), tx, jax.random.key(1), mesh)
  step = pg.make_pg_step(
    cfg, POLICY, toy_reward, tx, shardings, mesh, compiler_options=FAST_COMPILE
  )
  return mesh, jax.device_get(state), shardings, step


def setup(estimator, shape=SINGLE, optimizer="adam"):
  """A fresh initial state (what a new process builds) and the cached compiled step for its mesh."""
  mesh, host_state, shardings, step = _compiled(estimator, shape, optimizer)
  ref = init_policy()
  return (
    mesh,
    jax.device_put(host_state, shardings),
    shardings,
    lambda s, batch: step(s, ref, None, batch),
  )


def batch_fn(estimator, mesh):
  n = CFGS[estimator].prompts_per_iteration
  return lambda i: mesh_lib.put_batch(prompts(i, n), mesh)


# -- pure functions ----------------------------------------------------------------------------


def test_rloo_advantages_by_hand_and_loop():
  # Leave-one-out means of [1, 2, 3, 6]: 11/3, 10/3, 3, 2.
  adv = pg.rloo_advantages(jnp.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]), 4)
  np.testing.assert_allclose(adv, [-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0], rtol=1e-6)
  rewards = np.random.default_rng(0).normal(size=12)
  for k in (2, 3, 4):
    expected = [
      rewards[i] - np.mean([rewards[j] for j in range(i // k * k, i // k * k + k) if j != i])
      for i in range(12)
    ]
    np.testing.assert_allclose(pg.rloo_advantages(jnp.asarray(rewards), k), expected, atol=1e-5)


def test_grpo_advantages_by_hand_and_loop():
  # Group [1, 2, 3, 6]: mean 3, unbiased std sqrt(14/3); a group of equal rewards gets 0.
  adv = pg.grpo_advantages(jnp.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]), 4)
  std = math.sqrt(14 / 3) + pg.GRPO_EPS
  np.testing.assert_allclose(adv, [-2 / std, -1 / std, 0.0, 3 / std, 0, 0, 0, 0], rtol=1e-6)
  rewards = np.random.default_rng(1).normal(size=12)
  for k in (2, 3, 6):
    expected = []
    for i in range(12):
      group = list(rewards[i // k * k : i // k * k + k])
      expected.append(
        (rewards[i] - statistics.mean(group)) / (statistics.stdev(group) + pg.GRPO_EPS)
      )
    np.testing.assert_allclose(pg.grpo_advantages(jnp.asarray(rewards), k), expected, atol=1e-5)


def test_remax_and_reinforce_advantages_by_hand():
  np.testing.assert_allclose(
    pg.remax_advantages(jnp.array([0.5, 0.25, 1.0]), jnp.array([0.25, 0.25, 1.5])),
    [0.25, 0.0, -0.5],
  )
  # Decay 0.5, batch means 1, 3, -1. Raw averages m: 0.5, 1.75, 0.375. Baselines (m / (1 - 0.5^t)):
  # 0 before any batch, then 0.5 / 0.5 = 1 (the first mean), then 1.75 / 0.75 = (0.5*1 + 3) / 1.5.
  ema, baselines, advantages = jnp.float32(0.0), [], []
  for step, rewards in enumerate(([0.0, 2.0], [2.0, 4.0], [-2.0, 0.0])):
    adv, b, ema = pg.reinforce_advantages(jnp.array(rewards), ema, jnp.int32(step), 0.5)
    baselines.append(float(b))
    advantages.append(np.asarray(adv))
  np.testing.assert_allclose(baselines, [0.0, 1.0, 3.5 / 1.5], rtol=1e-6)
  np.testing.assert_allclose(float(ema), 0.375, rtol=1e-6)
  np.testing.assert_allclose(advantages, [[0.0, 2.0], [1.0, 3.0], [-2 - 3.5 / 1.5, -3.5 / 1.5]])


def test_losses_by_hand():
  # REINFORCE: sequence log-probs -1.5 (2 real tokens; the 3rd is padding) and -0.5, A = 2 and -1.
  logp = jnp.array([[-1.0, -0.5, -9.0], [-0.5, -9.0, -9.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
  loss = pg.reinforce_loss(logp, jnp.array([2.0, -1.0]), mask)
  np.testing.assert_allclose(loss, -(2 * -1.5 + -1 * -0.5) / 2, rtol=1e-6)
  # GRPO: row 0 (A = +1) has ratios 1.5 (clipped to 1.2) and 1.0; row 1 (A = -1) has ratio 0.5
  # (clipped to 0.8 and active: -A*0.8 > -A*0.5). Per-sequence token means: -(1.2 + 1.0)/2 and 0.8.
  old = jnp.full((2, 3), -1.0)
  new = old + jnp.log(jnp.array([[1.5, 1.0, 7.0], [0.5, 7.0, 7.0]]))
  # k3 with log(pi/pi_ref) = 0 on row 0 and log 2 on row 1's token: (1/2 - 1) + log 2.
  ref = jnp.array([[new[0, 0], new[0, 1], 0.0], [new[1, 0] - math.log(2), 0.0, 0.0]])
  loss, m = pg.grpo_loss(new, old, ref, jnp.array([1.0, -1.0]), mask, 0.2, 0.1)
  pg_term = (-(1.2 + 1.0) / 2 + 0.8) / 2
  kl_term = (0.0 + (0.5 - 1 + math.log(2))) / 2
  np.testing.assert_allclose([m["pg_loss"], m["kl_loss"]], [pg_term, kl_term], rtol=1e-5)
  np.testing.assert_allclose(loss, pg_term + 0.1 * kl_term, rtol=1e-5)
  np.testing.assert_allclose(m["clip_frac"], 2 / 3, rtol=1e-6)


def test_config_and_model_errors_name_the_field():
  cases = [
    (dict(estimator="ppo"), "pg.estimator='ppo' is not one of"),
    (dict(rollout_batch_size=16, minibatch_size=5), "pg.minibatch_size=5 does not divide"),
    (dict(estimator="rloo", k=1), r"pg.k=1: pg.estimator='rloo' compares k >= 2"),
    (dict(estimator="remax", k=4), r"pg.k=4: pg.estimator='remax' samples one"),
    (dict(estimator="grpo", k=3, rollout_batch_size=16, minibatch_size=8), "pg.k=3 does not div"),
    (dict(estimator="rloo", epochs=2), "pg.epochs=2: pg.estimator='rloo' has no importance"),
    (dict(clip_eps=0.0), "pg.clip_eps must be positive"),
    (dict(kl_beta=-1.0), "pg.kl_beta must be >= 0"),
    (dict(kl_coef=-1.0), "pg.kl_coef must be >= 0"),
    (dict(estimator="reinforce", k=1, baseline_decay=1.0), "pg.baseline_decay must be in"),
    (dict(temperature=0.0), "pg.temperature must be > 0"),
    (dict(max_new_tokens=0), "pg.max_new_tokens must be a positive integer"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      pg.PGConfig(**kwargs)
  cfg = pg.PGConfig(rollout_batch_size=32, minibatch_size=16, k=8)
  assert (cfg.prompts_per_iteration, cfg.num_minibatches, cfg.updates_per_iteration) == (4, 2, 2)
  assert cfg.rollout_config().rollout_batch_size == 32
  mesh8 = mesh_lib.make_mesh({"data": 8})
  with pytest.raises(ValueError, match="pg.prompts_per_iteration=4 is not divisible by the 8"):
    pg.make_pg_step(cfg, POLICY, toy_reward, TX, {}, mesh8)
  with pytest.raises(ValueError, match="no critic"):
    pg.make_pg_step(CFGS["rloo"], POLICY.replace(value_head=True), toy_reward, TX, {}, mesh8)
  _, state, _, step = setup("rloo")
  with pytest.raises(ValueError, match=r"8 left-padded prompts \(pg.prompts_per_iteration\)"):
    step(state, prompts(0, 32))


# -- the jitted iteration ----------------------------------------------------------------------


@pytest.mark.parametrize("estimator", pg.ESTIMATORS)
def test_learns_toy_reward(estimator):
  """'Emit token 7' goes from chance (1/16 of the slots) to > 0.5 within ITERATIONS iterations."""
  mesh, state, shardings, step = setup(estimator)
  state, history, _ = train_loop(
    state, shardings, step, batch_fn(estimator, mesh), ITERATIONS, log_every=1
  )
  scores = [h["score_mean"] for h in history]
  first, last = history[0], history[-1]
  assert first["score_mean"] < 0.15 and np.mean(scores[-3:]) > 0.5
  assert abs(first["kl_mean"]) < 1e-4 and last["kl_mean"] > 1.0  # KL(pi || pi_init) grows.
  assert 0 < last["kl_se"] < last["kl_mean"]
  # Responses differ in score until the policy converges (then every advantage is 0).
  assert all(h["response_len"] > 0 and h["advantage_std"] > 0 for h in history[:5])
  kl_coef = CFGS[estimator].kl_coef  # R = score - kl_coef * KL.
  for h in history:
    assert h["reward_mean"] == pytest.approx(h["score_mean"] - kl_coef * h["kl_mean"], abs=1e-5)
  if estimator == "grpo":
    assert last["kl_loss"] > 0 and any(h["clip_frac"] > 0 for h in history)


def test_remax_baseline_is_the_greedy_response():
  """The first iteration's greedy score is that of decoding the initial policy at temperature 0."""
  mesh, state, _, step = setup("remax")
  batch = prompts(0, CFGS["remax"].prompts_per_iteration)
  _, metrics = step(state, mesh_lib.put_batch(batch, mesh))
  scfg = SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=EOS)
  out = jax.jit(functools.partial(sample, model_cfg=POLICY, scfg=scfg))(
    init_policy(), batch["ids"], batch["mask"], jax.random.key(0)
  )
  greedy = ((np.asarray(out["tokens"]) == TARGET) & np.asarray(out["mask"])).sum(1) / N
  np.testing.assert_allclose(float(metrics["greedy_score_mean"]), greedy.mean(), rtol=1e-6)


@functools.lru_cache(maxsize=None)
def run_two(estimator, shape):
  mesh, state, _, step = setup(estimator, shape, "sgd")
  metrics = []
  for it in range(2):
    state, m = step(state, batch_fn(estimator, mesh)(it))
    metrics.append(jax.device_get(m))
  # Really sharded: FSDP x tensor distinct blocks of the LM head, laid out by the state's shardings.
  blocks = {str(s.index) for s in state["params"]["lm_head"]["kernel"].addressable_shards}
  assert len(blocks) == shape[1] * shape[2]
  return metrics, jax.device_get(state["params"])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=["data8", "d2f2t2"])
@pytest.mark.parametrize("estimator", ["rloo", "grpo", "remax"])
def test_mesh_matches_single_device(estimator, shape):
  """The same two iterations on a sharded mesh give the single-device metrics and parameters."""
  ref_metrics, ref_params = run_two(estimator, SINGLE)
  metrics, params = run_two(estimator, shape)
  for a, b in zip(ref_metrics, metrics):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5), ref_params, params)
  assert ref_metrics[1]["kl_mean"] != 0 and ref_metrics[0]["advantage_std"] > 0
  assert not np.allclose(ref_params["lm_head"]["kernel"], init_policy()["lm_head"]["kernel"])


@pytest.mark.parametrize("estimator", pg.ESTIMATORS)
def test_resume_after_kill_matches_uninterrupted(tmp_path, estimator):
  """Every estimator resumes bit for bit (REINFORCE with its moving baseline in the state)."""

  def run(num, ckpt_dir=None):
    mesh, state, shardings, step = setup(estimator)
    return train_loop(
      state,
      shardings,
      step,
      batch_fn(estimator, mesh),
      num,
      ckpt_dir=ckpt_dir,
      save_every=2,
      log_every=1,
    )

  full, history, _ = run(6)
  ckpt = str(tmp_path / "ckpt")
  run(3, ckpt)  # "Killed" after iteration 3 (checkpoints at 2 and 3).
  resumed, r_history, _ = run(6, ckpt)  # A fresh process: new state, same config.
  assert int(resumed["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full), jax.device_get(resumed))
  assert r_history == history
  if estimator != "reinforce":
    return
  # The baseline each iteration used is the bias-corrected moving average of earlier mean rewards.
  decay, ema = CFGS["reinforce"].baseline_decay, 0.0
  for t, h in enumerate(history):
    assert h["baseline"] == pytest.approx(ema / (1 - decay**t) if t else 0.0, rel=1e-5)
    ema = decay * ema + (1 - decay) * h["reward_mean"]
  assert float(full["baseline"]) == pytest.approx(ema, rel=1e-5)
