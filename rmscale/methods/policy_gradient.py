"""REINFORCE, ReMax, RLOO and GRPO (``rmscale.train.pg``) against a proxy: one module, four methods.

They share PPO's rollout, reward and KL options and its evaluation; they differ in the baseline
(a moving average; the greedy response's reward; the other k - 1 samples' mean; the group's mean and
spread) and, for GRPO, in a clipped ratio and a KL term in the loss. ``optimise.rollout_batch_size``
counts sequences for every method, so at k samples per prompt an iteration sees ``1/k`` as many
prompts: every method spends the same samples per iteration.
"""

from __future__ import annotations

from rmscale import checks
from rmscale.methods import iterative
from rmscale.methods.base import Method
from rmscale.train import pg


def _builder(estimator: str):
  def build(setup: iterative.Setup) -> iterative.Trainer:
    s, o = setup.section, setup.ctx.config.optimise
    cfg = pg.PGConfig(
      estimator=estimator,
      rollout_batch_size=o.rollout_batch_size,
      minibatch_size=o.minibatch_size,
      k=s.get("k", 1),
      epochs=s.get("epochs", 1),
      clip_eps=s.get("clip_eps", 0.2),
      kl_beta=s.get("kl_beta", 0.0),
      baseline_decay=s.get("baseline_decay", 0.9),
      kl_coef=setup.kl_coef,
      entropy_coef=s.entropy_coef,
      **setup.rollout_fields(),
    )
    return setup.trainer(estimator, cfg, pg.init_pg_state, pg.make_pg_step)

  return build


def _validator(name: str):
  def validate(config, devices: int) -> None:
    section = config.optimise[name]
    s = f"optimise.{name}"
    checks.positive(config, f"{s}.lr")
    checks.non_negative(config, f"{s}.entropy_coef")
    if "k" in section:
      k = checks.count(config, f"{s}.k", minimum=2)
      o = config.optimise
      if o.rollout_batch_size % k:
        checks.fail(f"{s}.k", k, "does not divide optimise.rollout_batch_size")
      if (o.rollout_batch_size // k) % devices:
        checks.fail(
          f"{s}.k",
          k,
          f"leaves {o.rollout_batch_size // k} prompts per iteration, not divisible by the "
          f"{devices} data-parallel devices",
        )
    if "epochs" in section:
      checks.count(config, f"{s}.epochs")
    if "clip_eps" in section:
      checks.positive(config, f"{s}.clip_eps")
    if "kl_beta" in section:
      checks.non_negative(config, f"{s}.kl_beta")
    if "baseline_decay" in section:
      checks.in_range(config, f"{s}.baseline_decay", 0.0, 1.0)

  return validate


def _method(name: str, title: str, defaults: dict) -> Method:
  return Method(
    name=name,
    title=title,
    form="rl",
    x="iteration",
    defaults={"lr": 1e-4, "entropy_coef": 0.0, **defaults},
    run=iterative.runner(_builder(name)),
    programs=iterative.programs(_builder(name)),
    validate=_validator(name),
    kl_penalised=True,
  )


REINFORCE = _method("reinforce", "REINFORCE", {"baseline_decay": 0.9})
REMAX = _method("remax", "ReMax", {})
RLOO = _method("rloo", "RLOO", {"k": 4})
GRPO = _method("grpo", "GRPO", {"k": 4, "epochs": 2, "clip_eps": 0.2, "kl_beta": 0.04})
METHODS = (REINFORCE, REMAX, RLOO, GRPO)
