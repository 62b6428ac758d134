"""Stage ``policy_init``: supervised finetuning of the initial policy on the human writer's corpus."""

from __future__ import annotations

import numpy as np

from rmscale import checks, rng
from rmscale.stages import common, roles
from rmscale.train import sft


def validate(config, devices: int) -> None:
  """config.policy (the initial policy) and config.pretrain (LMs that initialise RMs)."""
  if not config.policy.get("hf_dir"):  # A Hugging Face policy's size is a name only.
    checks.model_size(config, "policy.size")
  for section in ("policy", "pretrain"):
    checks.divisible(config, f"{section}.batch_size", devices)
    checks.count(config, f"{section}.num_examples")
    checks.optimizer(config, section)


def sft_corpus(ctx: common.Context, n: int) -> dict[str, np.ndarray]:
  """The human writer's SFT corpus (one stream, so every LM of the run learns from the same text)."""
  ex = ctx.world.sft_examples(rng.numpy(ctx.config.seed, "sft_corpus"), n, split="train")
  tokens, mask = common.sequences(
    ex["prompt_ids"], ex["prompt_mask"], ex["response_ids"], ex["response_mask"]
  )
  loss_mask = np.zeros_like(mask)
  loss_mask[:, ctx.prompt_len :] = ex["response_mask"]
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def train_lm(ctx: common.Context, name: str, size: str, section) -> tuple:
  """SFT of an LM of ``size`` on the writer corpus (the policy, and pretrained RM trunks)."""
  model_cfg = roles.model_config(ctx, size, "policy")
  data = sft_corpus(ctx, section.num_examples)
  params, history = common.train(
    ctx,
    name,
    model_cfg,
    sft.make_sft_loss(model_cfg),
    data,
    batch_size=section.batch_size,
    steps=section.steps,
    optim=common.optim_config(section, section.steps),
    seed=rng.integer(ctx.config.seed, name, "train"),
  )
  return params, history


def pretrained_lm(ctx: common.Context, size: str):
  """An LM of ``size`` trained on the SFT corpus, to initialise reward models (as Gao et al. do).

  The initial policy serves when the size matches; other sizes are trained once under
  ``pretrained/<size>`` with ``config.pretrain`` and shared by every RM of that size.
  """
  if size == ctx.config.policy.size:
    return common.load_params(
      ctx, ctx.path("policy_init", "params"), roles.model_config(ctx, size, "policy")
    )
  params, _ = train_lm(ctx, f"pretrained/{size}", size, ctx.config.pretrain)
  return params


def run(ctx: common.Context) -> dict:
  if ctx.config.policy.get("hf_dir"):  # A local Hugging Face LM (roles.py), SFT optional.
    return init_hf_policy(ctx)
  _, history = train_lm(ctx, "policy_init", ctx.config.policy.size, ctx.config.policy)
  loss = history[-1]["loss"]
  return {"final_loss": loss, "headline": f"final SFT loss {loss:.3f}"}


def init_hf_policy(ctx: common.Context) -> dict:
  """Stage policy_init for a Hugging Face policy: load, optionally SFT, save to the workdir."""
  p, path = ctx.config.policy, roles.policy_dir(ctx.config)
  cfg = roles.model_config(ctx, p.size, "policy")
  params = roles.load_hf(
    ctx, path, cfg, "policy", rng.integer(ctx.config.seed, "policy_init", "heads")
  )
  # How many prompts the length limits kept, for the record.
  out = {"hf_dir": path, "prompt_filter": getattr(ctx.world, "filter_report", None)}
  if not p.get("sft", False):
    common.save_params(ctx.path("policy_init", "params"), params)
    return {**out, "sft": False, "headline": f"loaded {path}, no SFT"}
  params, history = common.train(
    ctx,
    "policy_init",
    cfg,
    sft.make_sft_loss(cfg),
    sft_corpus(ctx, p.num_examples),
    batch_size=p.batch_size,
    steps=p.steps,
    optim=common.optim_config(p, p.steps),
    seed=rng.integer(ctx.config.seed, "policy_init", "train"),
    init_params=params,
  )
  loss = history[-1]["loss"]
  headline = f"loaded {path}, final SFT loss {loss:.3f}"
  return {**out, "sft": True, "final_loss": loss, "headline": headline}
