"""PPO: RL losses against hand computation and a plain loop; learning, sharding parity and resume.

The jitted iterations are compiled once per configuration and mesh (module-level caches) and
reused across tests, since compiling is most of this file's time on a CPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmscale import rl_losses
from rmscale.models import sizes
from rmscale.models.transformer import init_params
from rmscale.parallel import mesh as mesh_lib
from rmscale.train import policy, ppo
from rmscale.train.loop import train_loop
from rmscale.train.state import OptimConfig, make_optimizer

V, P, N, TARGET, EOS = 16, 4, 8, 7, 1
POLICY = sizes.model_config("100k", vocab_size=V, max_len=P + N)
# A: the default shared critic, no KL penalty (Gao et al.'s setting).
CFG_A = ppo.PPOConfig(
  rollout_batch_size=32, minibatch_size=8, epochs=2, max_new_tokens=N, eos_id=EOS
)
# B: separate critic, adaptive KL penalty with the k3 estimator, entropy bonus, no value clipping.
CFG_B = ppo.PPOConfig(
  rollout_batch_size=32,
  minibatch_size=8,
  epochs=2,
  max_new_tokens=N,
  eos_id=EOS,
  critic="separate",
  kl_mode="adaptive",
  kl_coef=0.05,
  kl_target=1.0,
  kl_horizon=64,
  kl_estimator="k3",
  entropy_coef=0.01,
  value_clip=0.0,
)
TX = make_optimizer(OptimConfig(learning_rate=3e-3, total_steps=20 * CFG_A.updates_per_iteration))
# Unoptimised CPU code generation halves compile time, which is most of this file's time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def toy_reward(params, tokens_BxL, mask_BxL):
  """Fraction of the N response slots holding TARGET: rewards emitting it and not stopping early."""
  del params
  return jnp.sum((tokens_BxL[:, P:] == TARGET) & mask_BxL[:, P:], axis=1) / N


def prompts(iteration, n=32):
  rng = np.random.default_rng([0, iteration])
  ids = rng.integers(2, V, (n, P)).astype(np.int32)
  mask = np.ones((n, P), bool)
  mask[:, :2] &= rng.random((n, 1)) < 0.6  # Some rows left-padded by 2.
  return {"ids": np.where(mask, ids, 0), "mask": mask}


@functools.lru_cache(maxsize=None)
def init_policy():
  return jax.jit(lambda key: init_params(POLICY, key)[0])(jax.random.key(0))


def _models(cfg):
  if cfg.critic == "shared":
    return POLICY.replace(value_head=True), None
  return POLICY, ppo.critic_config(POLICY)


@functools.lru_cache(maxsize=None)
def _compiled(cfg, n_devices):
  """The mesh, a host copy of the initial state, its shardings and the jitted step."""
  mesh = mesh_lib.make_mesh({"data": n_devices}, jax.devices()[:n_devices])
  policy_cfg, critic_cfg = _models(cfg)
  state, shardings = ppo.init_ppo_state(
    cfg,
    policy_cfg,
    init_policy(),
    TX,
    jax.random.key(1),
    mesh,
    critic_cfg=critic_cfg,
    critic_params=init_policy(),
  )
  step = ppo.make_ppo_step(
    cfg,
    policy_cfg,
    toy_reward,
    TX,
    shardings,
    mesh,
    critic_cfg=critic_cfg,
    compiler_options=FAST_COMPILE,
  )
  return mesh, jax.device_get(state), shardings, step


def setup(cfg, n_devices=1):
  """A fresh initial state (what a new process builds) and the cached compiled step for its mesh."""
  mesh, host_state, shardings, step = _compiled(cfg, n_devices)
  ref = init_policy()
  return (
    mesh,
    jax.device_put(host_state, shardings),
    shardings,
    lambda s, batch: step(s, ref, None, batch),
  )


def put(batch, mesh):
  return mesh_lib.put_batch(batch, mesh)


# -- pure functions ----------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam):
  """Textbook GAE per row over the row's real tokens only (masked positions removed)."""
  adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    next_value, next_adv = 0.0, 0.0
    for t in idx[::-1]:
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_adv = delta + gamma * lam * next_adv
      next_value = values[b, t]
      adv[b, t], ret[b, t] = next_adv, next_adv + values[b, t]
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_python_loop(gamma, lam):
  rng = np.random.default_rng(0)
  B, T = 6, 9
  rewards = rng.normal(size=(B, T)).astype(np.float32)
  values = rng.normal(size=(B, T)).astype(np.float32)
  lengths = np.array([9, 5, 1, 3, 0, 7])  # EOS-style prefixes, one full, one empty.
  mask = np.arange(T)[None] < lengths[:, None]
  mask[5] = rng.random(T) < 0.6  # And one row with holes.
  adv, ret = rl_losses.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  ref_adv, ref_ret = gae_loop(
    rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam
  )
  np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, atol=1e-5)
  # Whatever sits in masked slots is ignored.
  noisy = np.where(mask, rewards, 1e3), np.where(mask, values, -1e3)
  adv2, _ = rl_losses.gae(
    jnp.asarray(noisy[0]), jnp.asarray(noisy[1]), jnp.asarray(mask), gamma, lam
  )
  np.testing.assert_allclose(adv2, adv, atol=1e-5)


def test_gae_by_hand():
  # Two tokens then EOS-padding; gamma=1, lam=0.5: delta_1 = 1 - 0.5, delta_0 = 0 + 0.5 - 0.25.
  adv, ret = rl_losses.gae(
    jnp.array([[0.0, 1.0, 9.0]]),
    jnp.array([[0.25, 0.5, 9.0]]),
    jnp.array([[True, True, False]]),
    1.0,
    0.5,
  )
  np.testing.assert_allclose(adv, [[0.25 + 0.5 * 0.5, 0.5, 0.0]])
  np.testing.assert_allclose(ret, [[0.75, 1.0, 0.0]])


def test_whiten_masked():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  w = np.asarray(rl_losses.whiten(x, mask))
  vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  np.testing.assert_allclose(w[np.asarray(mask)], (vals - 3.0) / np.sqrt(2.0), rtol=1e-6)
  assert np.all(w[~np.asarray(mask)] == 0)
  kept = np.asarray(rl_losses.whiten(x, mask, shift_mean=False))[np.asarray(mask)]
  np.testing.assert_allclose(kept, (vals - 3.0) / np.sqrt(2.0) + 3.0, rtol=1e-6)


def test_policy_loss_by_hand():
  # Ratios 1.5, 0.5, 1.1, 0.7 with advantages +1, +1, -1, -1 and eps 0.2: the per-token objective
  # max(-A r, -A clip(r)) is -1.2 (clipped), -0.5, 1.1, 0.8 (clipped); the 5th token is masked.
  ratio = np.array([[1.5, 0.5, 1.1, 0.7, 9.0]])
  old = np.full_like(ratio, -1.3)
  logp = old + np.log(ratio)
  adv = np.array([[1.0, 1.0, -1.0, -1.0, 50.0]])
  mask = np.array([[1, 1, 1, 1, 0]], bool)
  loss, m = rl_losses.policy_loss(*map(jnp.asarray, (logp, old, adv, mask)), 0.2)
  np.testing.assert_allclose(loss, (-1.2 - 0.5 + 1.1 + 0.8) / 4, rtol=1e-5)
  np.testing.assert_allclose(m["clip_frac"], 0.5)
  # (r - 1) - log r for each real token: 0.0945349, 0.1931472, 0.0046898, 0.0566749.
  np.testing.assert_allclose(
    m["approx_kl"], (0.0945349 + 0.1931472 + 0.0046898 + 0.0566749) / 4, rtol=1e-5
  )


def test_value_loss_by_hand():
  # Old values 0, 0, 1; new 0.5, -0.1, 1.3; returns 1, 0, 0; clip 0.2 -> clipped values 0.2, -0.1, 1.2.
  # Squared errors (unclipped, clipped): (0.25, 0.64), (0.01, 0.01), (1.69, 1.44); 4th token masked.
  new = jnp.array([[0.5, -0.1, 1.3, 7.0]])
  old = jnp.array([[0.0, 0.0, 1.0, 0.0]])
  ret = jnp.array([[1.0, 0.0, 0.0, -7.0]])
  mask = jnp.array([[1, 1, 1, 0]], bool)
  loss, m = rl_losses.value_loss(new, old, ret, mask, 0.2)
  np.testing.assert_allclose(loss, 0.5 * (0.64 + 0.01 + 1.69) / 3, rtol=1e-5)
  np.testing.assert_allclose(m["vf_clip_frac"], 1 / 3, rtol=1e-6)
  loss, _ = rl_losses.value_loss(new, old, ret, mask, 0.0)
  np.testing.assert_allclose(loss, 0.5 * (0.25 + 0.01 + 1.69) / 3, rtol=1e-5)


def test_kl_estimators_zero_on_equal_policies_and_match_exact_kl():
  rng = np.random.default_rng(0)
  logits_p, logits_q = rng.normal(size=5), rng.normal(size=5)
  logp, logq = jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q)
  exact = float(jnp.sum(jnp.exp(logp) * (logp - logq)))  # KL(p || q) by enumeration.
  tokens = jax.random.categorical(jax.random.key(0), logits_p, shape=(200_000,))
  lp, lq = logp[tokens], logq[tokens]
  for kind in rl_losses.KL_ESTIMATORS:
    np.testing.assert_array_equal(rl_losses.kl_per_token(lp, lp, kind), 0.0)
    est = rl_losses.kl_per_token(lp, lq, kind)
    assert float(est.mean()) > 0.0
    if kind != "k1":
      assert float(est.min()) >= 0.0
  assert (
    float(rl_losses.kl_per_token(lp, lq, "k1").min()) < 0
  )  # Unbiased k1 is positive only on average.
  for kind in ("k1", "k3"):  # The unbiased estimators, within ~5 standard errors.
    np.testing.assert_allclose(float(rl_losses.kl_per_token(lp, lq, kind).mean()), exact, atol=0.01)
  seq = rl_losses.sequence_kl(lp.reshape(-1, 4), lq.reshape(-1, 4), jnp.ones((50_000, 4), bool))
  np.testing.assert_allclose(float(seq.mean()), 4 * exact, atol=0.04)
  mean, se = rl_losses.mean_and_se(jnp.array([1.0, 2.0, 3.0, 6.0]))
  np.testing.assert_allclose([mean, se], [3.0, math.sqrt(14 / 3) / 2], rtol=1e-6)


def test_config_and_model_errors_name_the_problem():
  with pytest.raises(ValueError, match="minibatch_size=5 does not divide"):
    ppo.PPOConfig(rollout_batch_size=16, minibatch_size=5)
  with pytest.raises(ValueError, match="kl_mode='adaptive' needs ppo.kl_coef > 0"):
    ppo.PPOConfig(kl_mode="adaptive")
  with pytest.raises(ValueError, match="kl_estimator='k4'"):
    ppo.PPOConfig(kl_estimator="k4")
  with pytest.raises(ValueError, match="temperature must be > 0"):
    ppo.PPOConfig(temperature=0.0)
  with pytest.raises(ValueError, match="gae_lambda must be in"):
    ppo.PPOConfig(gae_lambda=1.5)
  with pytest.raises(ValueError, match="needs a model config with a reward head"):
    policy.rm_reward_fn(POLICY)
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match="critic='shared' puts the value head"):
    ppo.init_ppo_state(CFG_A, POLICY, init_policy(), TX, jax.random.key(0), mesh)
  with pytest.raises(ValueError, match="critic='separate' needs a critic_cfg"):
    ppo.init_ppo_state(CFG_B, POLICY, init_policy(), TX, jax.random.key(0), mesh)
  mesh8 = mesh_lib.make_mesh({"data": 8})
  with pytest.raises(ValueError, match="minibatch_size=4 is not divisible by the 8"):
    ppo.make_ppo_step(
      ppo.PPOConfig(rollout_batch_size=32, minibatch_size=4),
      POLICY.replace(value_head=True),
      toy_reward,
      TX,
      {},
      mesh8,
    )


# -- the jitted iteration ----------------------------------------------------------------------


def test_ppo_learns_toy_reward_and_kl_grows():
  """Shared critic, no KL penalty: 'emit token 7' goes from chance (1/16) to > 0.5 in 20 iterations."""
  mesh, state, shardings, step = setup(CFG_A)
  policy_cfg, _ = _models(CFG_A)
  evaluator = policy.make_evaluator(
    CFG_A.rollout_config(),
    policy_cfg,
    shardings["params"],
    mesh,
    reward_fn=toy_reward,
    compiler_options=FAST_COMPILE,
  )
  eval_prompts = prompts(10_000)

  def eval_fn(s, it):
    return policy.evaluate(
      evaluator,
      s["params"],
      init_policy(),
      eval_prompts["ids"],
      eval_prompts["mask"],
      jax.random.fold_in(jax.random.key(2), it),
    )

  def on_eval(it, samples):  # A caller's "gold" scorer, on host arrays.
    gold = ((samples["tokens"][:, P:] == TARGET) & samples["mask"][:, P:]).sum(1) / N
    np.testing.assert_allclose(samples["score"], gold, rtol=1e-6)  # The proxy, scored in the jit.
    assert samples["tokens"].shape == (32, P + N) and samples["kl"].shape == (32,)
    return {"kl": samples["kl_mean"], "kl_se": samples["kl_se"], "gold": float(gold.mean())}

  state, history, evals = train_loop(
    state,
    shardings,
    step,
    lambda i: put(prompts(i), mesh),
    20,
    log_every=1,
    eval_every=10,
    evaluate=lambda s, it: on_eval(it, eval_fn(s, it)),
  )
  assert [e["step"] for e in evals] == [0, 10, 20]
  assert len(history) == 20 and int(state["step"]) == 20
  first, last = history[0], history[-1]
  # Chance is 1/16 per response slot; other seeds reach 0.8-1.0 here, so 0.5 leaves a wide margin.
  assert first["score_mean"] < 0.15 and last["score_mean"] > 0.5
  assert abs(first["kl_mean"]) < 1e-4  # The first rollout is from pi_init itself.
  assert abs(evals[0]["kl"]) < 1e-4 and evals[0]["gold"] < 0.15
  assert evals[-1]["gold"] > 0.5
  assert evals[1]["kl"] > evals[0]["kl"] + 1.0 and evals[-1]["kl"] > 5.0  # KL(pi || pi_init) grows.
  assert 0 < evals[-1]["kl_se"] < evals[-1]["kl"] / 5
  assert all(h["kl_coef"] == 0.0 and h["kl_penalty"] == 0.0 for h in history)


def test_data_parallel_iteration_matches_single_device():
  """The same two iterations on 8 fake devices (data=8) give the single-device metrics to 1e-4."""
  runs = []
  for n_devices in (1, 8):
    mesh, state, _, step = setup(CFG_A, n_devices)
    metrics = []
    for it in range(2):
      state, m = step(state, put(prompts(it), mesh))
      metrics.append(jax.device_get(m))
    if n_devices == 8:  # Really sharded: every device holds 4 of the 32 rollout rows' prompts.
      batch = put(prompts(0), mesh)
      assert {s.data.shape for s in batch["ids"].addressable_shards} == {(4, P)}
    runs.append((metrics, jax.device_get(state["params"])))
  (m1, p1), (m8, p8) = runs
  for a, b in zip(m1, m8):
    assert a.keys() == b.keys()
    for k in a:
      # fp32 reductions differ in order across layouts; Adam turns that into ~1e-6 parameter noise.
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
  # 32 Adam steps of lr 3e-3 could move a parameter by 0.1; layouts agree to ~3e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-4), p1, p8)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
  """Separate critic + adaptive KL: every piece of state (critic, KL controller) survives a resume."""

  def run(num, ckpt_dir=None):
    mesh, state, shardings, step = setup(CFG_B)
    return train_loop(
      state,
      shardings,
      step,
      lambda i: put(prompts(i), mesh),
      num,
      ckpt_dir=ckpt_dir,
      save_every=2,
      log_every=1,
      eval_every=2,
      evaluate=lambda s, it: {"kl_coef": float(jax.device_get(s["kl_coef"]))},
    )

  full, history, evals = run(6)
  ckpt = str(tmp_path / "ckpt")
  run(3, ckpt)  # "Killed" after iteration 3 (checkpoints at 2 and 3).
  resumed, r_history, r_evals = run(6, ckpt)  # A fresh process: new state, same config.
  assert int(resumed["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full), jax.device_get(resumed))
  assert [h["step"] for h in r_history] == list(range(1, 7))
  assert [h["kl_mean"] for h in r_history] == [h["kl_mean"] for h in history]
  assert [e["step"] for e in r_evals] == [
    0,
    2,
    3,
    4,
    6,
  ]  # 3: the killed run's final evaluation.
  assert [e for e in r_evals if e["step"] != 3] == evals

  # The controller followed Ziegler et al.'s rule from the measured KL, and the critic trained.
  coef = CFG_B.kl_coef
  for h in history:
    assert h["kl_coef"] == pytest.approx(coef, rel=1e-6)
    coef *= 1 + np.clip(h["kl_mean"] / CFG_B.kl_target - 1, -0.2, 0.2) * 32 / CFG_B.kl_horizon
  assert float(full["kl_coef"]) == pytest.approx(coef, rel=1e-5)
  assert history[0]["kl_penalty"] == pytest.approx(0.0, abs=1e-5)
  assert history[-1]["kl_penalty"] > 0 and history[-1]["kl_mean"] > 0
  head = lambda s: np.asarray(s["critic_params"]["value_head"]["kernel"])  # noqa: E731
  _, fresh, _, _ = setup(CFG_B)
  assert not np.allclose(head(full), head(fresh))
  trunk = lambda p: np.asarray(p["layers_0"]["mlp"]["up"]["kernel"])  # noqa: E731
  np.testing.assert_array_equal(
    trunk(fresh["critic_params"]), trunk(init_policy())
  )  # The policy's trunk.
  assert "lm_head" not in full["critic_params"] and "value_head" not in full["params"]
  assert history[-1]["score_mean"] > history[0]["score_mean"] + 0.1
