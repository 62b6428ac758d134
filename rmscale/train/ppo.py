"""PPO for language models against a reward function, one jitted iteration per rollout.

An iteration is one pure function of ``(state, ref_params, reward_params, prompts)`` (the purejaxrl
structure): sample responses with the KV-cache sampler -> one full forward pass of the policy, the
frozen reference and the critic over ``[left-padded prompt | right-padded response]`` -> per-token
rewards (``-kl_coef * KL`` on every response token, the reward model's score added at the last) ->
GAE -> ``lax.scan`` over epochs of ``lax.scan`` over shuffled minibatches of optax updates. There is
no Python loop over tokens or minibatches, so the whole iteration compiles once and runs sharded.

Rollouts, log-probs, scoring and evaluation are the shared ones of ``rmscale.train.policy`` (its
docstring gives the sequence layout); the value of the state response token j is drawn from is read
at slot ``P + j - 1``, like its log-prob.

The train state is a plain dict of arrays (checkpointable by ``rmscale.checkpoint``):
``params`` and ``opt_state`` (the policy; with ``critic='shared'`` its value head is the critic),
``critic_params`` and ``critic_opt_state`` (``critic='separate'`` only), ``step`` (iterations done),
``rng`` (key data) and ``kl_coef`` (the KL controller's state).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from rmscale import rl_losses
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import last_token_index
from rmscale.parallel import mesh as mesh_lib
from rmscale.rl_losses import gae, kl_per_token, policy_loss, value_loss, whiten
from rmscale.train import policy
from rmscale.train.policy import RewardFn
from rmscale.train.state import State, init_state

KL_MODES = ("fixed", "adaptive")
CRITICS = ("shared", "separate")


@dataclasses.dataclass(frozen=True)
class PPOConfig(policy.RolloutConfig):
  """PPO hyper-parameters; defaults follow Gao et al. (2023, Table 1) where they give one.

  The rollout fields (``rollout_batch_size``: prompts per iteration, one response each, the paper
  uses 256; ``minibatch_size``: sequences per gradient step; temperature and the response layout)
  are ``policy.RolloutConfig``'s.
  """

  PREFIX: ClassVar[str] = "ppo."
  epochs: int = 4  # Passes over each rollout, reshuffled every pass.
  clip_eps: float = 0.2  # Clip range of the probability ratio in the surrogate.
  value_clip: float = 0.2  # Clip range of the value update around the rollout's values; 0 disables.
  vf_coef: float = 0.1  # Value-loss weight; small so a shared trunk is not dominated by the critic.
  gamma: float = 1.0  # Discount: episodes are short and the reward sits at the end.
  gae_lambda: float = 0.95  # GAE's bias-variance trade-off.
  # KL penalty per token (the initial value under 'adaptive'); 0 = Gao's default.
  kl_coef: float = 0.0
  kl_mode: str = "fixed"  # 'fixed' | 'adaptive' (Ziegler et al. 2019 proportional controller).
  kl_target: float = 6.0  # 'adaptive': KL(pi || pi_ref) per sequence (nats) the controller aims at.
  kl_horizon: int = 10000  # 'adaptive': sequences over which the coefficient may change by ~e^0.2.
  kl_estimator: str = "k1"  # Per-token KL in the penalty: 'k1' log-ratio, 'k2' half-square, 'k3'.
  entropy_coef: float = 0.0  # Entropy bonus weight in the policy loss.
  whiten_advantages: bool = True  # Normalise advantages over the rollout's response tokens.
  critic: str = "shared"  # 'shared': value head on the policy trunk; 'separate': own model.

  def __post_init__(self):
    super().__post_init__()
    for name in ("epochs", "kl_horizon"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ppo.{name} must be positive, got {getattr(self, name)}")
    if self.clip_eps <= 0:
      raise ValueError(f"ppo.clip_eps must be positive, got {self.clip_eps}")
    if self.value_clip < 0:
      raise ValueError(f"ppo.value_clip must be >= 0 (0 disables), got {self.value_clip}")
    for name in ("vf_coef", "kl_coef", "entropy_coef"):
      if getattr(self, name) < 0:
        raise ValueError(f"ppo.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("gamma", "gae_lambda"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")
    if self.kl_mode not in KL_MODES:
      raise ValueError(f"ppo.kl_mode={self.kl_mode!r} is not one of {KL_MODES}")
    if self.kl_mode == "adaptive" and (self.kl_coef <= 0 or self.kl_target <= 0):
      raise ValueError(
        "ppo.kl_mode='adaptive' needs ppo.kl_coef > 0 (the starting coefficient) and "
        f"ppo.kl_target > 0, got kl_coef={self.kl_coef}, kl_target={self.kl_target}"
      )
    if self.kl_estimator not in rl_losses.KL_ESTIMATORS:
      raise ValueError(
        f"ppo.kl_estimator={self.kl_estimator!r} is not one of {rl_losses.KL_ESTIMATORS}"
      )
    if self.critic not in CRITICS:
      raise ValueError(f"ppo.critic={self.critic!r} is not one of {CRITICS}")

  @property
  def updates_per_iteration(self) -> int:
    """Optimizer steps per iteration: size ``OptimConfig.total_steps`` as iterations times this."""
    return self.epochs * self.num_minibatches


# -- models ------------------------------------------------------------------------------------


def critic_config(base_cfg: TransformerConfig) -> TransformerConfig:
  """A separate critic on the trunk of ``base_cfg`` (a policy or a reward model): value head only.

  ``init_ppo_state`` then loads the trunk's parameters and initialises the value head fresh.
  """
  return base_cfg.replace(lm_head=False, tie_embeddings=False, reward_head="none", value_head=True)


def _check_models(
  cfg: PPOConfig, policy_cfg: TransformerConfig, critic_cfg: TransformerConfig | None
):
  if not policy_cfg.lm_head:
    raise ValueError("the PPO policy needs an LM head (model.lm_head=True)")
  if cfg.critic == "shared":
    if not policy_cfg.value_head:
      raise ValueError(
        "ppo.critic='shared' puts the value head on the policy: pass "
        "policy_cfg.replace(value_head=True)"
      )
    if critic_cfg is not None:
      raise ValueError(
        "ppo.critic='shared' takes no critic_cfg (the policy's value head is the critic)"
      )
  else:
    if critic_cfg is None or not critic_cfg.value_head:
      raise ValueError(
        "ppo.critic='separate' needs a critic_cfg with value_head=True "
        "(e.g. ppo.critic_config(policy_cfg) or ppo.critic_config(rm_cfg))"
      )
    if policy_cfg.value_head:
      raise ValueError(
        "ppo.critic='separate' trains its own critic: pass a policy_cfg without "
        "value_head (its value head would be dead weight)"
      )


def init_ppo_state(
  cfg: PPOConfig,
  policy_cfg: TransformerConfig,
  policy_params,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  *,
  critic_cfg: TransformerConfig | None = None,
  critic_params=None,
  critic_tx: optax.GradientTransformation | None = None,
  compiler_options: dict | None = None,
) -> tuple[State, dict]:
  """The sharded PPO train state and its shardings.

  ``policy_params`` (e.g. the SFT policy, possibly without a value head) seeds the policy; heads it
  lacks are initialised fresh. Under ``critic='separate'``, ``critic_params`` (a policy's or a reward
  model's parameters; any extra heads are dropped) seeds the critic's trunk and ``critic_tx``
  (default ``tx``) optimises it. ``compiler_options`` are XLA options for the init programs.
  """
  _check_models(cfg, policy_cfg, critic_cfg)
  key = jax.random.wrap_key_data(rng) if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  state, shardings = init_state(
    policy_cfg, tx, key, mesh, rules, params=policy_params, compiler_options=compiler_options
  )
  if cfg.critic == "separate":
    critic, critic_shardings = init_state(
      critic_cfg,
      critic_tx or tx,
      jax.random.fold_in(key, 1),
      mesh,
      rules,
      params=critic_params,
      compiler_options=compiler_options,
    )
    state.update(critic_params=critic["params"], critic_opt_state=critic["opt_state"])
    shardings.update(
      critic_params=critic_shardings["params"], critic_opt_state=critic_shardings["opt_state"]
    )
  rep = mesh_lib.replicated(mesh)
  state["kl_coef"] = jax.device_put(jnp.asarray(cfg.kl_coef, jnp.float32), rep)
  shardings["kl_coef"] = rep
  return state, shardings


# -- the iteration -----------------------------------------------------------------------------


def _response_values(out: dict, P: int):
  """V(state before response token j) for each j: [B, N]."""
  return out["value"][:, P - 1 : -1]


def ppo_iteration(
  state: State,
  ref_params,
  reward_params,
  batch: dict,
  *,
  cfg: PPOConfig,
  policy_cfg: TransformerConfig,
  reward_fn: RewardFn,
  tx: optax.GradientTransformation,
  critic_cfg: TransformerConfig | None = None,
  critic_tx: optax.GradientTransformation | None = None,
) -> tuple[State, dict]:
  """One PPO iteration on ``batch = {'ids': prompt_BxP, 'mask': prompt_mask_BxP}`` (left-padded).

  Pure and jittable; the iteration's randomness is ``fold_in(rng, step)``, so a resumed run repeats
  it exactly. Returns the new state and a flat dict of scalar metrics.
  """
  separate = cfg.critic == "separate"
  critic_tx = critic_tx or tx
  P = batch["ids"].shape[1]
  M, T = cfg.num_minibatches, cfg.temperature
  ref_cfg = policy.reference_config(policy_cfg)
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  sample_rng, shuffle_rng = jax.random.split(key)

  # Rollout and its scoring under the current (old) policy.
  roll = policy.rollout(
    state["params"],
    batch["ids"],
    batch["mask"],
    sample_rng,
    cfg=cfg.rollout_config(),
    policy_cfg=policy_cfg,
  )
  rmask_BxN = roll["response_mask"]

  def score_minibatch(mb):
    tok, m = mb["tokens"], mb["mask"]
    pol = policy.forward(policy_cfg, state["params"], tok, m)
    logits = policy.response_logits(pol, P, T)
    out = {
      "logp": policy.response_logprobs(logits, tok, P),
      "entropy": rl_losses.token_entropy(logits[:, :-1]),
      "logp_ref": policy.policy_logprobs(ref_cfg, ref_params, tok, m, P, T),
      "score": policy.score(reward_fn, reward_params, tok, m),
    }
    critic_out = policy.forward(critic_cfg, state["critic_params"], tok, m) if separate else pol
    out["value"] = _response_values(critic_out, P)
    return out

  exp = policy.map_minibatches(score_minibatch, {"tokens": roll["tokens"], "mask": roll["mask"]}, M)
  values_BxN = jnp.where(rmask_BxN, exp["value"], 0.0)
  N = rmask_BxN.shape[1]
  kl_coef = state["kl_coef"]
  kl_tok_BxN = jnp.where(
    rmask_BxN, kl_per_token(exp["logp"], exp["logp_ref"], cfg.kl_estimator), 0.0
  )
  at_last_BxN = jnp.arange(N)[None, :] == last_token_index(rmask_BxN)[:, None]
  rewards_BxN = -kl_coef * kl_tok_BxN + jnp.where(
    at_last_BxN & rmask_BxN, exp["score"][:, None], 0.0
  )
  adv_BxN, returns_BxN = gae(rewards_BxN, values_BxN, rmask_BxN, cfg.gamma, cfg.gae_lambda)
  if cfg.whiten_advantages:
    adv_BxN = whiten(adv_BxN, rmask_BxN)

  data = {
    "tokens": roll["tokens"],
    "mask": roll["mask"],
    "response_mask": rmask_BxN,
    "logp": exp["logp"],
    "value": values_BxN,
    "adv": adv_BxN,
    "ret": returns_BxN,
  }

  def loss_fn(trainable, mb):
    params, critic_params = trainable
    tok, m, rmask = mb["tokens"], mb["mask"], mb["response_mask"]
    pol = policy.forward(policy_cfg, params, tok, m)
    logits = policy.response_logits(pol, P, T)
    logp = policy.response_logprobs(logits, tok, P)
    values = _response_values(
      policy.forward(critic_cfg, critic_params, tok, m) if separate else pol, P
    )
    pg, pg_metrics = policy_loss(logp, mb["logp"], mb["adv"], rmask, cfg.clip_eps)
    vf, vf_metrics = value_loss(values, mb["value"], mb["ret"], rmask, cfg.value_clip)
    loss = pg + cfg.vf_coef * vf
    metrics = {"pg_loss": pg, "vf_loss": vf, **pg_metrics, **vf_metrics}
    if cfg.entropy_coef:
      entropy = rl_losses.masked_mean(rl_losses.token_entropy(logits[:, :-1]), rmask)
      loss = loss - cfg.entropy_coef * entropy
    return loss, metrics

  def minibatch_step(carry, mb):
    params, opt_state, critic_params, critic_opt_state = carry
    (_, metrics), (grads, critic_grads) = jax.value_and_grad(loss_fn, has_aux=True)(
      (params, critic_params), mb
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if separate:
      updates, critic_opt_state = critic_tx.update(critic_grads, critic_opt_state, critic_params)
      critic_params = optax.apply_updates(critic_params, updates)
      metrics["critic_grad_norm"] = optax.tree.norm(critic_grads)
    return (params, opt_state, critic_params, critic_opt_state), metrics

  def epoch(carry, epoch_rng):
    perm = jax.random.permutation(epoch_rng, cfg.rollout_batch_size)
    minibatches = jax.tree.map(lambda x: policy.to_minibatches(x[perm], M), data)
    return jax.lax.scan(minibatch_step, carry, minibatches)

  carry = (
    state["params"],
    state["opt_state"],
    state.get("critic_params"),
    state.get("critic_opt_state"),
  )
  carry, upd_ExM = jax.lax.scan(epoch, carry, jax.random.split(shuffle_rng, cfg.epochs))
  params, opt_state, critic_params, critic_opt_state = carry

  # KL(pi || pi_ref) per sequence (k1, the unbiased estimate whatever the penalty's estimator).
  seq_kl_B = rl_losses.sequence_kl(exp["logp"], exp["logp_ref"], rmask_BxN)
  kl_mean, kl_se = rl_losses.mean_and_se(seq_kl_B)
  new_coef = kl_coef
  if cfg.kl_mode == "adaptive":  # Ziegler et al.: proportional error clipped to +-0.2.
    err = jnp.clip(kl_mean / cfg.kl_target - 1.0, -0.2, 0.2)
    new_coef = kl_coef * (1.0 + err * cfg.rollout_batch_size / cfg.kl_horizon)

  new_state = {
    **state,
    "params": params,
    "opt_state": opt_state,
    "step": state["step"] + 1,
    "kl_coef": new_coef,
  }
  if separate:
    new_state.update(critic_params=critic_params, critic_opt_state=critic_opt_state)

  length_B = rmask_BxN.sum(1).astype(jnp.float32)
  metrics = {k: v.mean() for k, v in upd_ExM.items()}
  # The last epoch's minibatches see the policy after nearly all of the iteration's updates, so their
  # KL(pi_old || pi) measures how far this iteration moved the policy.
  metrics["approx_kl"] = upd_ExM["approx_kl"][-1].mean()
  metrics.update(
    score_mean=exp["score"].mean(),
    score_std=exp["score"].std(),
    kl_mean=kl_mean,
    kl_se=kl_se,
    kl_penalty=(kl_coef * kl_tok_BxN).sum(1).mean(),
    reward_mean=rewards_BxN.sum(1).mean(),
    entropy=rl_losses.masked_mean(exp["entropy"], rmask_BxN),
    response_len=length_B.mean(),
    value_mean=rl_losses.masked_mean(values_BxN, rmask_BxN),
    return_mean=rl_losses.masked_mean(returns_BxN, rmask_BxN),
    kl_coef=kl_coef,
  )
  return new_state, metrics


def make_ppo_step(
  cfg: PPOConfig,
  policy_cfg: TransformerConfig,
  reward_fn: RewardFn,
  tx: optax.GradientTransformation,
  state_shardings: dict,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  *,
  critic_cfg: TransformerConfig | None = None,
  critic_tx: optax.GradientTransformation | None = None,
  reward_shardings=None,
  compiler_options: dict | None = None,
):
  """``ppo_iteration`` jitted on ``mesh``: ``step(state, ref_params, reward_params, batch)``.

  The state is donated; prompts (host arrays: the whole batch, see ``global_batch``) and every
  per-sequence array are sharded over the data axes;
  ``ref_params`` (the initial policy, no value head) are laid out like the policy; ``reward_shardings``
  (default: replicated) lays out ``reward_params``. Metrics come back replicated.
  ``compiler_options`` are XLA options for this program (e.g. scheduler flags on TPU).
  """
  _check_models(cfg, policy_cfg, critic_cfg)
  mesh_lib.check_batch_divisible(cfg.rollout_batch_size, mesh, "ppo.rollout_batch_size")
  mesh_lib.check_batch_divisible(cfg.minibatch_size, mesh, "ppo.minibatch_size")
  fn = functools.partial(
    ppo_iteration,
    cfg=cfg,
    policy_cfg=policy_cfg,
    reward_fn=reward_fn,
    tx=tx,
    critic_cfg=critic_cfg,
    critic_tx=critic_tx,
  )
  return policy.jit_iteration(
    fn,
    policy_cfg=policy_cfg,
    state_shardings=state_shardings,
    mesh=mesh,
    rules=rules,
    prompts=cfg.rollout_batch_size,
    what="ppo.rollout_batch_size",
    reward_shardings=reward_shardings,
    compiler_options=compiler_options,
  )
