"""Loss functions as pure functions of model outputs (float32 throughout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BxLxV, tokens_BxL):
  """log p(tokens[t+1] | tokens[:t+1]) for t < L-1, shape [B, L-1]."""
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]


def sft_loss(logits_BxLxV, tokens_BxL, loss_mask_BxL):
  """Mean next-token NLL over masked tokens; also returns the token count for weighting."""
  lp = token_logprobs(logits_BxLxV, tokens_BxL)
  m = loss_mask_BxL[:, 1:].astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  return -(lp * m).sum() / n, n


def bradley_terry_loss(r_chosen_B, r_rejected_B, score_l2: float = 0.0):
  """-log sigma(r_w - r_l), optional L2 on scores (Coste et al. use 1e-3); returns (loss, accuracy)."""
  margin = r_chosen_B - r_rejected_B
  loss = -jax.nn.log_sigmoid(margin).mean()
  if score_l2:
    loss = loss + score_l2 * jnp.mean(jnp.square(r_chosen_B) + jnp.square(r_rejected_B))
  return loss, (margin > 0).astype(jnp.float32).mean()
