"""RL objectives for language models as pure functions over per-token arrays (float32 throughout).

Everything here works on ``[B, T]`` arrays of response positions with a ``mask_BxT`` marking real
response tokens; masked positions never contribute to a loss, a statistic or an advantage. The
functions are shared by PPO and any later policy-gradient method (ReMax, RLOO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x, mask):
  """Mean of ``x`` over positions where ``mask`` is set (0 when none is)."""
  m = mask.astype(jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def whiten(x_BxT, mask_BxT, shift_mean: bool = True, eps: float = 1e-8):
  """Normalises ``x`` to zero mean and unit variance over the masked positions; 0 elsewhere.

  ``shift_mean=False`` only rescales (keeps the mean), e.g. for rewards whose sign matters.
  """
  mean = masked_mean(x_BxT, mask_BxT)
  var = masked_mean(jnp.square(x_BxT - mean), mask_BxT)
  out = (x_BxT - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask_BxT, out, 0.0)


def gae(rewards_BxT, values_BxT, mask_BxT, gamma: float, lam: float):
  """Generalised advantage estimation (Schulman et al. 2016), one reversed ``lax.scan`` over time.

  Masked positions are skipped, not treated as steps: they get advantage and return 0 and the
  recursion bridges them, so the last real token bootstraps from 0 (an episode ends at EOS or at the
  length limit) and a hole in the mask does not cut an episode. Returns ``(advantages, returns)``
  with ``returns = advantages + values`` on real tokens (the value targets).
  """
  valid_TxB = mask_BxT.astype(bool).T
  rewards_TxB = rewards_BxT.astype(jnp.float32).T
  values_TxB = values_BxT.astype(jnp.float32).T

  def step(carry, x):
    next_value_B, next_adv_B = carry
    r_B, v_B, valid_B = x
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = jnp.where(valid_B, delta_B + gamma * lam * next_adv_B, 0.0)
    carry = (jnp.where(valid_B, v_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
    return carry, adv_B

  B = rewards_BxT.shape[0]
  zeros_B = jnp.zeros((B,), jnp.float32)
  _, adv_TxB = jax.lax.scan(
    step, (zeros_B, zeros_B), (rewards_TxB, values_TxB, valid_TxB), reverse=True
  )
  adv_BxT = adv_TxB.T
  returns_BxT = jnp.where(mask_BxT, adv_BxT + values_BxT, 0.0)
  return adv_BxT, returns_BxT


def policy_loss(logp_BxT, old_logp_BxT, advantages_BxT, mask_BxT, clip_eps: float):
  """PPO's clipped surrogate, averaged over real tokens.

  Returns ``(loss, metrics)``: ``clip_frac`` is the fraction of tokens where the clipped term is
  the active one; ``approx_kl`` estimates KL(pi_old || pi) per token with the non-negative,
  unbiased ``(r - 1) - log r`` on tokens sampled from pi_old (r = pi / pi_old).
  """
  log_ratio = logp_BxT - old_logp_BxT
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages_BxT * ratio
  clipped = -advantages_BxT * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask_BxT)
  metrics = {
    "clip_frac": masked_mean((clipped > unclipped).astype(jnp.float32), mask_BxT),
    "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask_BxT),
  }
  return loss, metrics


def value_loss(values_BxT, old_values_BxT, returns_BxT, mask_BxT, clip: float):
  """Half squared error to the returns, with PPO's value clipping around the rollout's values.

  ``clip <= 0`` disables clipping. Returns ``(loss, metrics)`` with ``vf_clip_frac`` the fraction of
  tokens where the clipped error is the larger (active) one.
  """
  err = jnp.square(values_BxT - returns_BxT)
  if clip <= 0:
    return 0.5 * masked_mean(err, mask_BxT), {"vf_clip_frac": jnp.zeros((), jnp.float32)}
  # Clipped as a range around the old value (not old + clip(new - old)), so an unclipped value stays
  # bit-identical and the clip fraction counts only real clipping.
  v_clipped = jnp.clip(values_BxT, old_values_BxT - clip, old_values_BxT + clip)
  err_clipped = jnp.square(v_clipped - returns_BxT)
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask_BxT)
  return loss, {"vf_clip_frac": masked_mean((err_clipped > err).astype(jnp.float32), mask_BxT)}


def kl_per_token(logp_BxT, logp_ref_BxT, kind: str = "k1"):
  """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1/k2/k3).

  ``k1 = log pi - log pi_ref``: unbiased, can be negative per token (the penalty of Ziegler et al.
  and what Gao et al. report); ``k2 = (k1)^2 / 2``: biased, non-negative, low variance (Coste et
  al.'s estimator); ``k3 = (rho - 1) - log rho`` with rho = pi_ref / pi: unbiased and non-negative.
  """
  log_ratio = logp_BxT - logp_ref_BxT
  if kind == "k1":
    return log_ratio
  if kind == "k2":
    return 0.5 * jnp.square(log_ratio)
  if kind == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"unknown KL estimator {kind!r}; known: {KL_ESTIMATORS}")


def sequence_kl(logp_BxT, logp_ref_BxT, mask_BxT):
  """KL(pi || pi_ref) of each sampled sequence: sum over its tokens of log pi - log pi_ref, [B].

  Its mean over samples from pi is an unbiased estimate of the sequence-level KL in nats.
  """
  return jnp.sum(jnp.where(mask_BxT, logp_BxT - logp_ref_BxT, 0.0), axis=-1)


def mean_and_se(x_B):
  """Mean and standard error of the mean (ddof=1) of a batch of per-sequence values."""
  n = x_B.shape[0]
  mean = jnp.mean(x_B)
  if n < 2:
    return mean, jnp.zeros((), x_B.dtype)
  return mean, jnp.std(x_B, ddof=1) / jnp.sqrt(n)


def token_entropy(logits_BxTxV):
  """Entropy in nats of each position's next-token distribution, [B, T]."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
