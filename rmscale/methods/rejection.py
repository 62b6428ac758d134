"""Rejection-sampling finetuning (``rmscale.train.rejection``) against a proxy: each iteration samples
k responses per prompt from the current policy, keeps the proxy's best of each prompt (Llama 2) or
the top fraction of the round (RAFT), and finetunes on them, continued or (``restart``) afresh from
the initial policy. Its KL is measured on samples, like every method's."""

from __future__ import annotations

from rmscale import checks
from rmscale.methods import iterative
from rmscale.methods.base import Method
from rmscale.train import rejection


def _validate(config, devices: int) -> None:
  s, o = "optimise.rejection", config.optimise
  checks.positive(config, f"{s}.lr")
  k = checks.count(config, f"{s}.k", minimum=2)
  checks.one_of(config, f"{s}.keep", rejection.KEEPS)
  checks.in_range(config, f"{s}.keep_fraction", 0.0, 1.0, closed_hi=True)
  checks.count(config, f"{s}.sft_epochs")
  if not isinstance(o.rejection.restart, bool):
    checks.fail(f"{s}.restart", o.rejection.restart, "must be True or False")
  if o.rollout_batch_size % k or (o.rollout_batch_size // k) % devices:
    checks.fail(
      f"{s}.k",
      k,
      f"must divide optimise.rollout_batch_size={o.rollout_batch_size} into a number of prompts "
      f"divisible by the {devices} data-parallel devices",
    )
  r = o.rejection
  kept = rejection.num_kept_rows(o.rollout_batch_size, k, r.keep, r.keep_fraction)
  if kept % o.minibatch_size:
    checks.fail(
      "optimise.minibatch_size",
      o.minibatch_size,
      f"does not divide the {kept} sequences rejection sampling keeps per round "
      f"(optimise.rejection.keep={r.keep!r})",
    )


def build(setup: iterative.Setup) -> iterative.Trainer:
  s, o = setup.section, setup.ctx.config.optimise
  cfg = rejection.RejectionConfig(
    rollout_batch_size=o.rollout_batch_size,
    minibatch_size=o.minibatch_size,
    k=s.k,
    keep=s.keep,
    keep_fraction=s.keep_fraction,
    sft_epochs=s.sft_epochs,
    restart=s.restart,
    **setup.rollout_fields(),
  )
  return setup.trainer(
    "rejection",
    cfg,
    rejection.init_rejection_state,
    rejection.make_rejection_step,
    per_round=cfg.restart,  # Restarted rounds each run the whole schedule afresh.
  )


METHOD = Method(
  name="rejection",
  title="Rejection sampling",
  form="rl",
  x="iteration",
  defaults={
    "lr": 1e-4,
    "k": 4,  # Samples per prompt.
    "keep": "best",  # best (Llama 2: each prompt's best of k) | top_fraction (RAFT).
    "keep_fraction": 0.25,  # top_fraction: the share of the round kept.
    "sft_epochs": 1,  # Passes over the kept samples per round.
    "restart": False,  # True: every round finetunes the initial policy afresh.
  },
  run=iterative.runner(build),
  programs=iterative.programs(build),
  validate=_validate,
)
