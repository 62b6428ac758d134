"""Reward-model training (Bradley-Terry) and batched, jitted scoring."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rmscale import losses
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import Transformer
from rmscale.parallel import mesh as mesh_lib


BATCH_KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask")


def make_rm_loss(model_cfg: TransformerConfig, score_l2: float = 0.0):
  """Batch: ``chosen``/``rejected`` tokens [B,L] with ``chosen_mask``/``rejected_mask``.

  Both sides go through one forward pass of batch 2B, so their statistics share one compiled step.
  """
  model = Transformer(model_cfg)

  def loss_fn(params, batch, rng):
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], 0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
    out = model.apply(
      {"params": params},
      tokens,
      mask,
      method=Transformer.forward,
      deterministic=False,
      rngs={"dropout": rng},
    )
    r_chosen, r_rejected = jnp.split(out["reward"], 2)
    loss, acc = losses.bradley_terry_loss(r_chosen, r_rejected, score_l2)
    return loss, {"accuracy": acc, "reward_mean": out["reward"].mean()}

  return loss_fn


def _reward(params, tokens_BxL, mask_BxL, *, model_cfg):
  return Transformer(model_cfg).apply(
    {"params": params}, tokens_BxL, mask_BxL, method=Transformer.forward
  )["reward"]


def make_scorer(
  model_cfg: TransformerConfig,
  mesh,
  param_shardings,
  rules=mesh_lib.DEFAULT_RULES,
  compiler_options: dict | None = None,
):
  """jit(reward) with explicit shardings: ``fn(params, tokens_BxL, mask_BxL) -> float32[B]``.

  Nothing is donated: the parameters score many batches. Scores come back replicated.
  """
  jitted = jax.jit(
    functools.partial(_reward, model_cfg=model_cfg),
    in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh), mesh_lib.batch_sharding(mesh)),
    out_shardings=mesh_lib.replicated(mesh),
    compiler_options=compiler_options,
  )

  def score(params, tokens, mask):
    with mesh_lib.sharding_context(mesh, rules):
      return jitted(params, tokens, mask)

  return score


def score_in_batches(
  score_fn, params, tokens_NxL: np.ndarray, mask_NxL: np.ndarray, batch_size: int
) -> np.ndarray:
  """Scores N sequences in fixed-size batches (the last one padded) so one compilation serves all."""
  n = tokens_NxL.shape[0]
  out = np.empty((n,), np.float32)
  for start in range(0, n, batch_size):
    tok, m = tokens_NxL[start : start + batch_size], mask_NxL[start : start + batch_size]
    k = tok.shape[0]
    if k < batch_size:
      tok = np.concatenate([tok, np.repeat(tok[-1:], batch_size - k, 0)])
      m = np.concatenate([m, np.repeat(m[-1:], batch_size - k, 0)])
    out[start : start + k] = np.asarray(score_fn(params, tok, m))[:k]
  return out
