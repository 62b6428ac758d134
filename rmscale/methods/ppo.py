"""PPO (``rmscale.train.ppo``) against a proxy, as Gao et al. run it: no KL penalty by default."""

from __future__ import annotations

import dataclasses
import functools

from rmscale import checks
from rmscale.methods import iterative
from rmscale.methods.base import Method
from rmscale.train import ppo


def _validate(config, devices: int) -> None:
  del devices
  s = "optimise.ppo"
  checks.positive(config, f"{s}.lr")
  checks.count(config, f"{s}.epochs")
  for key in ("clip_eps", "value_clip", "kl_target"):
    checks.positive(config, f"{s}.{key}")
  for key in ("vf_coef", "entropy_coef"):
    checks.non_negative(config, f"{s}.{key}")
  checks.in_range(config, f"{s}.gae_lambda", 0.0, 1.0, closed_hi=True)
  checks.one_of(config, f"{s}.kl_mode", ppo.KL_MODES)
  checks.one_of(config, f"{s}.critic", ppo.CRITICS)
  if config.optimise.ppo.kl_mode == "adaptive" and not config.optimise.kl_coef > 0:
    checks.fail(
      "optimise.kl_coef", config.optimise.kl_coef, "must be > 0 (the start) with kl_mode='adaptive'"
    )


def build(setup: iterative.Setup) -> iterative.Trainer:
  s, o = setup.section, setup.ctx.config.optimise
  cfg = ppo.PPOConfig(
    rollout_batch_size=o.rollout_batch_size,
    minibatch_size=o.minibatch_size,
    epochs=s.epochs,
    clip_eps=s.clip_eps,
    value_clip=s.value_clip,
    vf_coef=s.vf_coef,
    gae_lambda=s.gae_lambda,
    kl_coef=setup.kl_coef,
    kl_mode=s.kl_mode,
    kl_target=s.kl_target,
    entropy_coef=s.entropy_coef,
    critic=s.critic,
    **setup.rollout_fields(),
  )
  train_cfg = (
    setup.policy_cfg.replace(value_head=True) if cfg.critic == "shared" else setup.policy_cfg
  )
  critic_cfg = ppo.critic_config(setup.policy_cfg) if cfg.critic == "separate" else None
  return setup.trainer(
    "ppo",
    cfg,
    functools.partial(ppo.init_ppo_state, critic_cfg=critic_cfg, critic_params=setup.init_params),
    functools.partial(ppo.make_ppo_step, critic_cfg=critic_cfg),
    policy_cfg=train_cfg,
    # kl_coef only seeds the state's coefficient, so a KL study's runs share the program.
    step_key=dataclasses.replace(cfg, kl_coef=0.0),
  )


METHOD = Method(
  name="ppo",
  title="PPO",
  form="rl",
  x="iteration",
  defaults={
    "lr": 1e-4,
    "epochs": 4,  # Passes over each rollout.
    "clip_eps": 0.2,
    "value_clip": 0.2,
    "vf_coef": 0.1,
    "gae_lambda": 0.95,
    "entropy_coef": 0.0,
    "critic": "shared",  # shared (value head on the policy) | separate (own model from the policy).
    "kl_mode": "fixed",  # fixed | adaptive (optimise.kl_coef is then the start).
    "kl_target": 6.0,  # adaptive: the KL per sequence (nats) the controller aims at.
  },
  run=iterative.runner(build),
  programs=iterative.programs(build),
  validate=_validate,
  kl_penalised=True,
)
