"""Supervised finetuning / LM pretraining loss: next-token NLL on the masked (response) tokens."""

from __future__ import annotations

from rmscale import losses
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import Transformer


def make_sft_loss(model_cfg: TransformerConfig):
  """Batch: ``tokens`` [B,L], ``mask`` [B,L] (real tokens), ``loss_mask`` [B,L] (tokens to learn)."""
  model = Transformer(model_cfg)

  def loss_fn(params, batch, rng):
    del rng
    logits = model.apply({"params": params}, batch["tokens"], batch["mask"])
    loss, n_tokens = losses.sft_loss(logits, batch["tokens"], batch["loss_mask"])
    return loss, {"tokens": n_tokens}

  return loss_fn
