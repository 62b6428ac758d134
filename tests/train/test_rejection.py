"""Rejection-sampling finetuning: selection against numpy, config errors, learning a toy reward,
restart semantics, mesh parity and resume.

The toy proxy is test_ppo's "emit token 7": the fraction of the N response slots holding it (chance
is 1/16 per slot, and stopping early at EOS forfeits the rest). Jitted rounds are compiled once per
configuration and mesh (module-level caches) at a low CPU optimisation level and shared by tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rmscale.models import sizes
from rmscale.models.transformer import init_params
from rmscale.parallel import mesh as mesh_lib
from rmscale.train import rejection
from rmscale.train.loop import train_loop
from rmscale.train.state import OptimConfig, make_optimizer

V, P, N, TARGET, EOS = 16, 4, 8, 7, 1
POLICY = sizes.model_config("100k", vocab_size=V, max_len=P + N)
# Llama 2: the best of 4 samples for each of 16 prompts, finetuning the current policy (continued).
BEST = rejection.RejectionConfig(
  rollout_batch_size=64, minibatch_size=8, k=4, sft_epochs=2, max_new_tokens=N, eos_id=EOS
)
# RAFT: the top 24 of 64 samples over the whole rollout; every round restarts from the initial policy.
TOP = rejection.RejectionConfig(
  rollout_batch_size=64,
  minibatch_size=8,
  k=4,
  keep="top_fraction",
  keep_fraction=0.375,
  sft_epochs=2,
  restart=True,
  max_new_tokens=N,
  eos_id=EOS,
)
ROUNDS = 15
TX = make_optimizer(
  OptimConfig(learning_rate=3e-3, total_steps=ROUNDS * BEST.updates_per_iteration)
)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
REFERENCE = (1, 1, 1)


def toy_reward(params, tokens_BxL, mask_BxL):
  del params
  return jnp.sum((tokens_BxL[:, P:] == TARGET) & mask_BxL[:, P:], axis=1) / N


def prompts(iteration, n=BEST.prompts_per_iteration):
  rng = np.random.default_rng([0, iteration])
  ids = rng.integers(2, V, (n, P)).astype(np.int32)
  mask = np.ones((n, P), bool)
  mask[:, :2] &= rng.random((n, 1)) < 0.6  # Some rows left-padded by 2.
  return {"ids": np.where(mask, ids, 0), "mask": mask}


@functools.lru_cache(maxsize=None)
def init_policy():
  return jax.device_get(jax.jit(lambda key: init_params(POLICY, key)[0])(jax.random.key(0)))


def make_mesh(shape):
  return mesh_lib.make_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), jax.devices()[: np.prod(shape)])


def prompt_reward(params, tokens_BxL, mask_BxL):
  """The prompt's last token (never padding): all k samples of a prompt tie, whatever they say."""
  del params, mask_BxL
  return tokens_BxL[:, P - 1] / V


@functools.lru_cache(maxsize=None)
def _compiled(cfg, shape, reward_fn):
  """The mesh, a host copy of the initial state, its shardings, the reference on the mesh and the
  jitted step."""
  mesh = make_mesh(shape)
  state, shardings = rejection.init_rejection_state(
    cfg, POLICY, init_policy(), TX, jax.random.key(1), mesh, compiler_options=FAST_COMPILE
  )
  step = rejection.make_rejection_step(
    cfg, POLICY, reward_fn, TX, shardings, mesh, compiler_options=FAST_COMPILE
  )
  ref = jax.device_put(init_policy(), shardings["params"])
  return mesh, jax.device_get(state), shardings, ref, step


def setup(cfg, shape=REFERENCE, reward_fn=toy_reward):
  """A fresh initial state (what a new process builds) and ``step(state, batch)`` on its mesh."""
  mesh, host_state, shardings, ref, step = _compiled(cfg, shape, reward_fn)
  return (
    mesh,
    jax.device_put(host_state, shardings),
    shardings,
    lambda s, batch: step(s, ref, None, batch),
  )


def put(batch, mesh):
  return mesh_lib.put_batch(batch, mesh)


def max_abs_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


# -- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "B,fraction,kept", [(32, 0.25, 8), (30, 0.1, 3), (10, 0.3, 3), (7, 0.5, 4), (64, 1.0, 64)]
)
def test_num_kept_is_the_ceiling_of_the_fraction(B, fraction, kept):
  # 0.1 * 30 is 3.0000000000000004 in floating point: a naive ceiling would keep 4.
  assert rejection.num_kept_rows(B, 1, "top_fraction", fraction) == kept
  assert rejection.num_kept_rows(B, B, "best", fraction) == 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_select_keeps_the_argmax_per_prompt_and_the_top_fraction(seed, ties):
  rng = np.random.default_rng(seed)
  B, k, fraction = 48, 4, 0.3  # Top fraction: ceil(14.4) = 15 rows.
  # With ties, 12 rows of each of 4 values: the top 15 are the 12 best and 3 of the 12 next.
  scores = rng.permutation(np.repeat([1.0, 0.75, 0.5, 0.25], 12)) if ties else rng.normal(size=B)
  scores = scores.astype(np.float32)
  select = jax.jit(rejection.select, static_argnums=(1, 2, 3))

  idx, weight = map(np.asarray, select(jnp.asarray(scores), k, "best", fraction))
  groups = scores.reshape(B // k, k)
  np.testing.assert_array_equal(idx, np.arange(0, B, k) + np.argmax(groups, 1))  # First maximum.
  np.testing.assert_array_equal(weight, np.isin(np.arange(B), idx))
  np.testing.assert_array_equal(scores[idx], groups.max(1))
  if ties:  # Some group's maximum is tied, so the first occurrence matters.
    assert np.any((groups == groups.max(1, keepdims=True)).sum(1) > 1)

  idx, weight = map(np.asarray, select(jnp.asarray(scores), k, "top_fraction", fraction))
  expected = np.argsort(-scores, kind="stable")[:15]  # Decreasing score, lower index first.
  np.testing.assert_array_equal(idx, expected)
  np.testing.assert_array_equal(weight, np.isin(np.arange(B), expected))
  assert scores[idx].min() >= np.delete(scores, idx).max()
  if ties:  # The threshold value's rows straddle the cut: the three lowest indices are kept.
    at = np.flatnonzero(scores == 0.75)
    np.testing.assert_array_equal(np.sort(idx[scores[idx] == 0.75]), at[:3])


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(rollout_batch_size=0), "rejection.rollout_batch_size must be a positive integer"),
    (dict(minibatch_size=2.0), "rejection.minibatch_size must be a positive integer"),
    (dict(k=-1), "rejection.k must be a positive integer"),
    (dict(sft_epochs=0), "rejection.sft_epochs must be a positive integer"),
    (dict(max_new_tokens=0), "rejection.max_new_tokens must be a positive integer"),
    (dict(k=3), "rejection.k=3 does not divide rejection.rollout_batch_size=64"),
    (dict(keep="worst"), "rejection.keep='worst' is not one of"),
    (dict(keep_fraction=0.0), r"rejection.keep_fraction must be in \(0, 1\]"),
    (dict(keep_fraction=1.5), r"rejection.keep_fraction must be in \(0, 1\]"),
    (dict(minibatch_size=24), "rejection.minibatch_size=24 does not divide rejection.rollout"),
    # Kept rows: 64 / 4 = 16 of the best, ceil(0.3 * 64) = 20 of the top fraction.
    (dict(minibatch_size=32), "rejection.minibatch_size=32 does not divide the 16 sequences kept"),
    (
      dict(keep="top_fraction", keep_fraction=0.3, minibatch_size=8),
      "rejection.minibatch_size=8 does not divide the 20 sequences kept",
    ),
    (dict(restart="yes"), "rejection.restart must be True or False"),
    (dict(temperature=0.0), "rejection.temperature must be > 0"),
    (dict(eos_id=-1), "rejection.eos_id must be a token id"),
    (dict(pad_id=-2), "rejection.pad_id must be a token id"),
  ],
)
def test_config_errors_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rejection.RejectionConfig(**kwargs)


def test_config_sizes_and_model_errors():
  assert (BEST.prompts_per_iteration, BEST.num_kept, BEST.updates_per_iteration) == (16, 16, 4)
  assert (TOP.prompts_per_iteration, TOP.num_kept, TOP.updates_per_iteration) == (16, 24, 6)
  assert BEST.rollout_config().rollout_batch_size == 64
  mesh = make_mesh(REFERENCE)
  with pytest.raises(ValueError, match="trains no critic"):
    rejection.init_rejection_state(
      BEST, POLICY.replace(value_head=True), None, TX, jax.random.key(0), mesh
    )
  with pytest.raises(
    ValueError, match="rejection.prompts_per_iteration=4 is not divisible by the 8"
  ):
    rejection.make_rejection_step(
      rejection.RejectionConfig(
        rollout_batch_size=32, minibatch_size=8, k=8, keep="top_fraction", keep_fraction=0.5
      ),
      POLICY,
      toy_reward,
      TX,
      {},
      make_mesh((8, 1, 1)),
    )
  _, state, _, step = setup(BEST)
  with pytest.raises(ValueError, match=r"16 left-padded prompts \(rejection.rollout_batch_size"):
    step(state, prompts(0, 64))


# -- the jitted round --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def learned():
  """BEST (Llama 2, continued) for ROUNDS rounds from the initial policy: (host state, history)."""
  mesh, state, shardings, step = setup(BEST)
  state, history, _ = train_loop(
    state, shardings, step, lambda i: put(prompts(i), mesh), ROUNDS, log_every=1
  )
  return jax.device_get(state), history


def test_best_of_k_learns_toy_reward():
  """Chance (1/16 per slot) to > 0.5 of the slots in 15 rounds (this seed: ~0.4 after 5 rounds,
  ~1.0 after 10); the kept samples always beat the rollout's mean."""
  state, history = learned()
  assert int(state["step"]) == ROUNDS and len(history) == ROUNDS
  first, last = history[0], history[-1]
  assert first["score_mean"] < 0.1 and last["score_mean"] > 0.5
  # Round 0 samples pi_init itself; best of 4 at chance is well above the mean.
  assert abs(first["kl_mean"]) < 1e-4 and first["kept_score_mean"] > 2 * first["score_mean"]
  assert last["kl_mean"] > 5.0 and 0 < last["kl_se"] < last["kl_mean"] / 5
  assert all(h["kept_fraction"] == 0.25 for h in history)
  assert all(h["kept_score_mean"] >= h["score_mean"] for h in history)
  assert last["sft_loss"] < first["sft_loss"] / 2
  assert last["response_len"] > first["response_len"]  # Stopping early (EOS) forfeits reward.


def test_best_is_chosen_among_the_k_samples_of_one_prompt():
  """Each prompt's k samples are contiguous rows: under a reward of the prompt alone, every group
  ties, so 'best' keeps one sample of every prompt and the kept mean is the rollout's mean (groups
  mixing prompts would keep each group's best prompt instead)."""
  _, state, _, step = setup(BEST, reward_fn=prompt_reward)
  _, m = step(state, prompts(0))
  scores = prompts(0)["ids"][:, -1] / V
  assert float(m["score_mean"]) == pytest.approx(scores.mean(), rel=1e-6)
  assert float(m["kept_score_mean"]) == pytest.approx(scores.mean(), rel=1e-6)
  assert float(m["score_std"]) == pytest.approx(scores.std(), rel=1e-5)


def test_restart_finetunes_the_initial_policy_on_samples_of_the_current_one():
  """A restart round depends on the state only through the samples its policy draws.

  A state whose LM head has the same vector added to every vocabulary column is the same
  distribution (each position's logits shift by one constant) but different parameters; with a
  garbage optimizer state too, its restart round must give exactly the parameters of a restart round
  from the initial state. A continued round would keep the shift and use the garbage moments.
  """
  _, fresh, shardings, step = setup(TOP)
  init = init_policy()
  shift = np.random.default_rng(0).normal(size=(POLICY.d_model, 1)).astype(np.float32)
  odd = jax.device_get(fresh)
  odd["params"]["lm_head"]["kernel"] = odd["params"]["lm_head"]["kernel"] + shift
  odd["opt_state"] = jax.tree.map(lambda x: x + np.asarray(3, x.dtype), odd["opt_state"])
  odd = jax.device_put(odd, shardings)

  a, m_a = jax.device_get(step(fresh, prompts(0)))
  b, m_b = jax.device_get(step(odd, prompts(0)))
  assert m_b["score_mean"] == m_a["score_mean"]  # The same samples...
  assert abs(m_b["kl_mean"]) < 1e-4  # ...from a policy equal in distribution to the reference.
  assert max_abs_diff(a["params"], b["params"]) < 1e-6
  assert max_abs_diff(a["opt_state"], b["opt_state"]) < 1e-6
  assert max_abs_diff(a["params"], init) > 1e-3  # The round trained.

  # From the trained BEST policy: the samples are its own (high score, far from pi_init), but the
  # result is one round of finetuning pi_init, far closer to it than the policy that sampled.
  trained, _ = learned()
  c, m_c = jax.device_get(step(jax.device_put(trained, shardings), prompts(0)))
  assert m_c["score_mean"] > 0.5 and m_c["kl_mean"] > 5.0
  lm = lambda p: np.asarray(p["lm_head"]["kernel"])  # noqa: E731
  moved = np.abs(lm(c["params"]) - lm(init)).max()
  assert 0 < moved < np.abs(lm(trained["params"]) - lm(init)).max() / 2


@functools.lru_cache(maxsize=None)
def run_rounds(cfg, shape, rounds=2):
  mesh, state, _, step = setup(cfg, shape)
  metrics = []
  for it in range(rounds):
    old = state
    state, m = step(state, put(prompts(100 + it), mesh))
    assert old["params"]["lm_head"]["kernel"].is_deleted()  # Donated.
    metrics.append(jax.device_get(m))
  if shape == (
    2,
    2,
    2,
  ):  # Really sharded: FSDP x tensor blocks of the LM head, 4 prompts per device.
    kernel = state["params"]["lm_head"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(POLICY.d_model // 2, V // 2)}
    batch = put(prompts(0), mesh)
    assert {s.data.shape for s in batch["ids"].addressable_shards} == {(4, P)}
  return metrics, jax.device_get(state["params"])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=["data8", "data2_fsdp2_tensor2"])
@pytest.mark.parametrize("cfg", [BEST, TOP], ids=["best", "top_fraction_restart"])
def test_round_on_a_mesh_matches_single_device(cfg, shape):
  (ref_metrics, ref_params), (metrics, params) = run_rounds(cfg, REFERENCE), run_rounds(cfg, shape)
  for a, b in zip(ref_metrics, metrics):
    assert a.keys() == b.keys()
    for k in a:  # fp32 reductions differ in order across layouts.
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
  # 4-6 Adam steps of lr 3e-3 per round; layouts agree to ~1e-6.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-4), ref_params, params)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
  def run(num, ckpt_dir=None):
    mesh, state, shardings, step = setup(BEST)
    return train_loop(
      state,
      shardings,
      step,
      lambda i: put(prompts(i), mesh),
      num,
      ckpt_dir=ckpt_dir,
      save_every=2,
      log_every=1,
    )

  full, history, _ = run(6)
  ckpt = str(tmp_path / "ckpt")
  run(3, ckpt)  # "Killed" after round 3 (checkpoints at 2 and 3).
  resumed, r_history, _ = run(6, ckpt)  # A fresh process: new state, same config.
  assert int(resumed["step"]) == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full), jax.device_get(resumed))
  assert r_history == history
  assert history[-1]["score_mean"] > history[0]["score_mean"]
