"""Sequence-level policy gradients for language models (REINFORCE, ReMax, RLOO, GRPO), one jitted
iteration per rollout.

The four methods are PPO without a critic: each response gets one scalar advantage, computed from
the rewards of other responses instead of a learned value. An iteration is one pure function of
``(state, ref_params, reward_params, prompts)``, structured like ``rmscale.train.ppo``: repeat each
prompt k times -> sample responses -> one forward pass of the policy and the frozen reference over
``[left-padded prompt | right-padded response]`` -> rewards
``R = score - kl_coef * KL(pi || pi_ref)`` per sequence (k1) -> advantages -> ``lax.scan`` over
epochs of ``lax.scan`` over shuffled minibatches of optax updates. The estimators
(``PGConfig.estimator``) differ only in the advantage and the loss:

- ``reinforce``: ``A = R - b``, b a moving average of past batches' mean reward (Williams 1992);
- ``remax`` (Li et al. 2023): ``A = R(sampled) - R(greedy)``, the greedy response to the same prompt
  (sampled at temperature 0) as the baseline;
- ``rloo`` (Ahmadian et al. 2024): k samples per prompt, ``A_i = R_i - mean_{j != i} R_j``;
- ``grpo`` (Shao et al. 2024): k samples per prompt,
  ``A_i = (R_i - mean_j R_j) / (std_j R_j + eps)`` on every token of response i, PPO's clipped
  ratio surrogate averaged over each response's tokens then over responses, plus ``kl_beta`` times
  the k3 estimate of KL(pi || pi_ref) in the loss.

The first three minimise ``-mean_b A_b log pi(y_b | x_b)`` (``reinforce_loss``): an on-policy score
function estimator, so they take one pass over each rollout (``epochs=1``); with several minibatches
the later ones see a policy a few updates old, as in PPO's first epoch, without a ratio to correct
it. GRPO's ratio makes several passes sound, hence its ``epochs`` (the paper's mu) and ``clip_eps``.

Batches: an iteration takes ``prompts_per_iteration = rollout_batch_size // k`` prompts and repeats
each k times contiguously, so group g is rollout rows ``g*k .. g*k + k - 1``; every method spends
``rollout_batch_size`` samples per iteration (ReMax also decodes one greedy response per prompt).

The train state is ``rmscale.train.state.init_state``'s (``params``, ``opt_state``, ``step``,
``rng``) plus ``baseline``: REINFORCE's moving average (a replicated float32 scalar, 0 and unused
for the other estimators), so a resumed run continues it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rmscale import rl_losses
from rmscale.models.config import TransformerConfig
from rmscale.parallel import mesh as mesh_lib
from rmscale.train import policy
from rmscale.train.policy import RewardFn
from rmscale.train.state import State, init_state

ESTIMATORS = ("reinforce", "remax", "rloo", "grpo")
GROUPED = ("rloo", "grpo")  # The estimators that sample k >= 2 responses per prompt.
# GRPO's guard on the group std (TRL's value): a group whose rewards are all equal gets A = 0.
GRPO_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class PGConfig(policy.RolloutConfig):
  """Policy-gradient hyper-parameters; KL options as PPO's (no penalty by default, like Gao).

  ``rollout_batch_size`` counts sequences per iteration (the same sample budget for every method);
  the other rollout fields are ``policy.RolloutConfig``'s.
  """

  PREFIX: ClassVar[str] = "pg."
  estimator: str = "rloo"  # 'reinforce' | 'remax' | 'rloo' | 'grpo'.
  k: int = 4  # Samples per prompt: >= 2 for rloo and grpo, 1 for reinforce and remax.
  epochs: int = 1  # Passes over each rollout: grpo's mu; the other estimators are on-policy (1).
  clip_eps: float = 0.2  # grpo: clip range of the probability ratio.
  kl_coef: float = 0.0  # KL(pi || pi_ref) penalty per sequence (k1) in the reward R.
  kl_beta: float = 0.04  # grpo: weight of the per-token k3 KL(pi || pi_ref) in the loss.
  baseline_decay: float = 0.9  # reinforce: decay of the moving-average baseline.
  entropy_coef: float = 0.0  # Entropy bonus weight in the loss.

  def __post_init__(self):
    super().__post_init__()
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"pg.estimator={self.estimator!r} is not one of {ESTIMATORS}")
    for name in ("k", "epochs"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"pg.{name} must be positive, got {getattr(self, name)}")
    if self.estimator in GROUPED and self.k < 2:
      raise ValueError(
        f"pg.k={self.k}: pg.estimator={self.estimator!r} compares k >= 2 samples of each prompt"
      )
    if self.estimator not in GROUPED and self.k != 1:
      raise ValueError(
        f"pg.k={self.k}: pg.estimator={self.estimator!r} samples one response per prompt (k=1)"
      )
    if self.rollout_batch_size % self.k:
      raise ValueError(
        f"pg.k={self.k} does not divide pg.rollout_batch_size={self.rollout_batch_size}"
      )
    if self.epochs > 1 and self.estimator != "grpo":
      raise ValueError(
        f"pg.epochs={self.epochs}: pg.estimator={self.estimator!r} has no importance ratio, so "
        "reusing a rollout would bias it; only 'grpo' takes several epochs"
      )
    if self.clip_eps <= 0:
      raise ValueError(f"pg.clip_eps must be positive, got {self.clip_eps}")
    for name in ("kl_coef", "kl_beta", "entropy_coef"):
      if getattr(self, name) < 0:
        raise ValueError(f"pg.{name} must be >= 0, got {getattr(self, name)}")
    if not 0.0 <= self.baseline_decay < 1.0:
      raise ValueError(f"pg.baseline_decay must be in [0, 1), got {self.baseline_decay}")

  @property
  def prompts_per_iteration(self) -> int:
    """Prompts in each iteration's batch: each is sampled k times."""
    return self.rollout_batch_size // self.k

  @property
  def updates_per_iteration(self) -> int:
    """Optimizer steps per iteration: size ``OptimConfig.total_steps`` as iterations times this."""
    return self.epochs * self.num_minibatches


# -- advantages and losses ---------------------------------------------------------------------


def reinforce_advantages(reward_B, ema, step, decay: float):
  """REINFORCE with a moving-average baseline: ``(A = R - b, b, the updated average)``.

  ``ema`` is the raw average ``m_t = decay * m_{t-1} + (1 - decay) * mean(R_t)`` over the t
  iterations done (``step``), with ``m_0 = 0``; the baseline is its bias-corrected value
  ``b = m_t / (1 - decay^t)`` (Adam's correction), 0 before any iteration. Without the correction b
  would start near 0 and leave early advantages all of one sign; with it, b after one iteration is
  that batch's mean. b uses earlier batches only, so the gradient estimate stays unbiased.
  """
  done = step > 0
  correction = 1.0 - jnp.power(jnp.float32(decay), step.astype(jnp.float32))
  baseline = jnp.where(done, ema / jnp.where(done, correction, 1.0), 0.0)
  new_ema = decay * ema + (1.0 - decay) * jnp.mean(reward_B)
  return reward_B - baseline, baseline, new_ema


def remax_advantages(reward_B, greedy_reward_B):
  """ReMax: each sample's reward minus that of the greedy response to its prompt."""
  return reward_B - greedy_reward_B


def rloo_advantages(reward_B, k: int):
  """RLOO: ``A_i = R_i - mean_{j != i} R_j`` within each group of k contiguous samples."""
  R_GxK = reward_B.reshape(-1, k)
  leave_one_out = (R_GxK.sum(1, keepdims=True) - R_GxK) / (k - 1)
  return (R_GxK - leave_one_out).reshape(-1)


def grpo_advantages(reward_B, k: int, eps: float = GRPO_EPS):
  """GRPO (outcome supervision): rewards normalised within each group of k contiguous samples,
  ``(R_i - mean) / (std + eps)``, with the unbiased (ddof=1) std as TRL and verl compute it."""
  R_GxK = reward_B.reshape(-1, k)
  mean = R_GxK.mean(1, keepdims=True)
  std = R_GxK.std(1, ddof=1, keepdims=True)
  return ((R_GxK - mean) / (std + eps)).reshape(-1)


def reinforce_loss(logp_BxN, adv_B, mask_BxN):
  """``-mean_b A_b log pi(y_b)``: the score-function surrogate on whole responses."""
  return -jnp.mean(adv_B * jnp.sum(jnp.where(mask_BxN, logp_BxN, 0.0), axis=1))


def sequence_token_mean(x_BxN, mask_BxN):
  """Each response's mean over its own tokens, [B] (GRPO's ``1/|o_i| sum_t``)."""
  m = mask_BxN.astype(jnp.float32)
  return jnp.sum(x_BxN * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def grpo_loss(logp_BxN, old_logp_BxN, ref_logp_BxN, adv_B, mask_BxN, clip_eps, kl_beta):
  """GRPO's objective, negated: clipped ratio surrogate plus ``kl_beta`` times the k3 KL to pi_ref,
  each averaged over a response's tokens, then over responses.

  Returns ``(loss, metrics)``: ``pg_loss`` (the surrogate term), ``kl_loss`` (the mean k3 KL),
  ``clip_frac`` (fraction of tokens where the clipped term is active) and ``approx_kl``
  (KL(pi_old || pi) per token, as in ``rl_losses.policy_loss``).
  """
  log_ratio = logp_BxN - old_logp_BxN
  ratio = jnp.exp(log_ratio)
  adv = adv_B[:, None]
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  pg = jnp.mean(sequence_token_mean(jnp.maximum(unclipped, clipped), mask_BxN))
  kl = jnp.mean(sequence_token_mean(rl_losses.kl_per_token(logp_BxN, ref_logp_BxN, "k3"), mask_BxN))
  metrics = {
    "pg_loss": pg,
    "kl_loss": kl,
    "clip_frac": rl_losses.masked_mean((clipped > unclipped).astype(jnp.float32), mask_BxN),
    "approx_kl": rl_losses.masked_mean((ratio - 1.0) - log_ratio, mask_BxN),
  }
  return pg + kl_beta * kl, metrics


# -- state -------------------------------------------------------------------------------------


def _check_policy(policy_cfg: TransformerConfig):
  if not policy_cfg.lm_head:
    raise ValueError("the policy needs an LM head (model.lm_head=True)")
  if policy_cfg.value_head:
    raise ValueError(
      "policy-gradient methods have no critic: pass a policy_cfg without value_head "
      "(its value head would be dead weight)"
    )


def init_pg_state(
  cfg: PGConfig,
  policy_cfg: TransformerConfig,
  policy_params,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  *,
  compiler_options: dict | None = None,
) -> tuple[State, dict]:
  """The sharded train state (``init_state``'s, seeded with ``policy_params``, plus a replicated
  float32 ``baseline`` of 0) and its shardings. ``compiler_options``: XLA options for the init."""
  del cfg  # Every estimator has the same state; the argument mirrors init_ppo_state.
  _check_policy(policy_cfg)
  key = jax.random.wrap_key_data(rng) if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  state, shardings = init_state(
    policy_cfg, tx, key, mesh, rules, params=policy_params, compiler_options=compiler_options
  )
  rep = mesh_lib.replicated(mesh)
  state["baseline"] = jax.device_put(jnp.zeros((), jnp.float32), rep)
  shardings["baseline"] = rep
  return state, shardings


# -- the iteration -----------------------------------------------------------------------------


def pg_iteration(
  state: State,
  ref_params,
  reward_params,
  batch: dict,
  *,
  cfg: PGConfig,
  policy_cfg: TransformerConfig,
  reward_fn: RewardFn,
  tx: optax.GradientTransformation,
) -> tuple[State, dict]:
  """One iteration on ``batch = {'ids', 'mask'}``: ``cfg.prompts_per_iteration`` left-padded
  prompts, each sampled k times.

  Pure and jittable; the iteration's randomness is ``fold_in(rng, step)``, so a resumed run repeats
  it exactly. Returns the new state and a flat dict of scalar metrics.
  """
  P = batch["ids"].shape[1]
  M, T, k = cfg.num_minibatches, cfg.temperature, cfg.k
  grpo = cfg.estimator == "grpo"
  rcfg = cfg.rollout_config()
  ref_cfg = policy.reference_config(policy_cfg)
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  sample_rng, shuffle_rng = jax.random.split(key)
  # Group g is rows g*k .. g*k + k - 1, kept on the device that holds prompt g.
  prompts = {
    name: nn.with_logical_constraint(jnp.repeat(x, k, axis=0), ("batch", None))
    for name, x in batch.items()
  }

  def sequence_stats(tok, m, rmask, with_kl: bool):
    """Score, and with ``with_kl`` the tempered log-probs and KL(pi || pi_ref), of sequences."""
    out = {"score": policy.score(reward_fn, reward_params, tok, m)}
    if with_kl:
      logits = policy.response_logits(policy.forward(policy_cfg, state["params"], tok, m), P, T)
      out["logp"] = policy.response_logprobs(logits, tok, P)
      out["entropy"] = rl_losses.token_entropy(logits[:, :-1])
      out["logp_ref"] = policy.policy_logprobs(ref_cfg, ref_params, tok, m, P, T)
      out["kl"] = rl_losses.sequence_kl(out["logp"], out["logp_ref"], rmask)
    return out

  roll = policy.rollout(
    state["params"], prompts["ids"], prompts["mask"], sample_rng, cfg=rcfg, policy_cfg=policy_cfg
  )
  rmask_BxN = roll["response_mask"]
  exp = policy.map_minibatches(
    lambda mb: sequence_stats(mb["tokens"], mb["mask"], mb["response_mask"], True), roll, M
  )
  reward_B = exp["score"] - cfg.kl_coef * exp["kl"]

  new_baseline = state["baseline"]
  extra = {}
  if cfg.estimator == "reinforce":
    adv_B, extra["baseline"], new_baseline = reinforce_advantages(
      reward_B, state["baseline"], state["step"], cfg.baseline_decay
    )
  elif cfg.estimator == "remax":
    # The greedy response's R carries the same KL penalty as the samples' (as ReMax's code does);
    # its log-probs are only needed when the penalty is on.
    greedy = policy.rollout(
      state["params"],
      prompts["ids"],
      prompts["mask"],
      sample_rng,
      cfg=rcfg,
      policy_cfg=policy_cfg,
      temperature=0.0,
    )
    with_kl = cfg.kl_coef > 0
    g = policy.map_minibatches(
      lambda mb: sequence_stats(mb["tokens"], mb["mask"], mb["response_mask"], with_kl), greedy, M
    )
    greedy_reward_B = g["score"] - cfg.kl_coef * g["kl"] if with_kl else g["score"]
    adv_B = remax_advantages(reward_B, greedy_reward_B)
    extra["greedy_score_mean"] = g["score"].mean()
  elif cfg.estimator == "rloo":
    adv_B = rloo_advantages(reward_B, k)
  else:
    adv_B = grpo_advantages(reward_B, k)

  data = {
    "tokens": roll["tokens"],
    "mask": roll["mask"],
    "response_mask": rmask_BxN,
    "adv": adv_B,
  }
  if grpo:
    data.update(logp=exp["logp"], logp_ref=exp["logp_ref"])

  def loss_fn(params, mb):
    tok, m, rmask = mb["tokens"], mb["mask"], mb["response_mask"]
    logits = policy.response_logits(policy.forward(policy_cfg, params, tok, m), P, T)
    logp = policy.response_logprobs(logits, tok, P)
    if grpo:
      loss, metrics = grpo_loss(
        logp, mb["logp"], mb["logp_ref"], mb["adv"], rmask, cfg.clip_eps, cfg.kl_beta
      )
    else:
      loss = reinforce_loss(logp, mb["adv"], rmask)
      metrics = {"pg_loss": loss}
    if cfg.entropy_coef:
      entropy = rl_losses.masked_mean(rl_losses.token_entropy(logits[:, :-1]), rmask)
      loss = loss - cfg.entropy_coef * entropy
    return loss, metrics

  params, opt_state, upd_ExM = policy.minibatch_epochs(
    loss_fn,
    tx,
    state["params"],
    state["opt_state"],
    data,
    jnp.arange(cfg.rollout_batch_size),
    M,
    shuffle_rng,
    cfg.epochs,
  )

  new_state = {
    **state,
    "params": params,
    "opt_state": opt_state,
    "step": state["step"] + 1,
    "baseline": new_baseline,
  }
  kl_mean, kl_se = rl_losses.mean_and_se(exp["kl"])
  metrics = {name: v.mean() for name, v in upd_ExM.items()}
  metrics.update(
    score_mean=exp["score"].mean(),
    score_std=exp["score"].std(),
    reward_mean=reward_B.mean(),
    advantage_std=adv_B.std(),
    kl_mean=kl_mean,
    kl_se=kl_se,
    entropy=rl_losses.masked_mean(exp["entropy"], rmask_BxN),
    response_len=rmask_BxN.sum(1).astype(jnp.float32).mean(),
    **extra,
  )
  return new_state, metrics


def make_pg_step(
  cfg: PGConfig,
  policy_cfg: TransformerConfig,
  reward_fn: RewardFn,
  tx: optax.GradientTransformation,
  state_shardings: dict,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  *,
  reward_shardings=None,
  compiler_options: dict | None = None,
):
  """``pg_iteration`` jitted on ``mesh``: ``step(state, ref_params, reward_params, batch)``.

  The state is donated; prompts (host arrays: the whole batch, see ``policy.global_batch``) and
  every per-sequence array are sharded over the data axes; ``ref_params`` (the initial policy) are
  laid out like the policy; ``reward_shardings`` (default: replicated) lays out ``reward_params``.
  Metrics come back replicated. ``step.jitted`` is the jitted function (for AOT lowering).
  """
  _check_policy(policy_cfg)
  mesh_lib.check_batch_divisible(cfg.rollout_batch_size, mesh, "pg.rollout_batch_size")
  mesh_lib.check_batch_divisible(cfg.minibatch_size, mesh, "pg.minibatch_size")
  mesh_lib.check_batch_divisible(cfg.prompts_per_iteration, mesh, "pg.prompts_per_iteration")
  return policy.jit_iteration(
    functools.partial(pg_iteration, cfg=cfg, policy_cfg=policy_cfg, reward_fn=reward_fn, tx=tx),
    policy_cfg=policy_cfg,
    state_shardings=state_shardings,
    mesh=mesh,
    rules=rules,
    prompts=cfg.prompts_per_iteration,
    what="pg.prompts_per_iteration",
    reward_shardings=reward_shardings,
    compiler_options=compiler_options,
  )
