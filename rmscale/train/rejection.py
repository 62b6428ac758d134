"""Rejection-sampling finetuning against a reward function, one jitted round per call.

A round samples k responses per prompt from the current policy, keeps those the proxy reward model
ranks highest and finetunes on them with the plain SFT loss; repeated, the policy drifts towards
what the proxy prefers (and away from what it cannot tell apart), which is what makes it an
over-optimisation method like PPO. Two selection rules:

- ``keep='best'`` (Llama 2's rejection sampling, Touvron et al. 2023): each prompt's best of its k
  samples, ``rollout_batch_size / k`` rows.
- ``keep='top_fraction'`` (RAFT, Dong et al. 2023): the top ``ceil(keep_fraction *
  rollout_batch_size)`` samples of the whole rollout. Ranking is over the batch, not per prompt
  (RAFT's global ranking), so a prompt may contribute anywhere from 0 to k samples.

Either way the number of kept rows is static, so the round has static shapes; ties go to the lower
row index. A round is one pure function of ``(state, ref_params, reward_params, prompts)``: repeat
each prompt k times -> ``policy.rollout`` -> score every row in minibatches (proxy score, and the
tempered log-probs of the policy and the frozen reference for KL) -> select -> ``lax.scan`` over
``sft_epochs`` of ``lax.scan`` over shuffled minibatches of optax updates. Sequences follow
``rmscale.train.policy``'s layout ``[left-padded prompt (P) | right-padded response (N)]``.

The SFT loss is the mean next-token NLL over the kept responses' tokens (EOS included, prompt and
padding excluded) under the *untempered* policy (temperature 1): a finetuned model is the plain
language model the kept samples are data for, whatever temperature drew them; the temperature only
shapes sampling (and the tempered KL metric, as in PPO).

``restart=False`` (continued, Llama 2's iterations) finetunes the current policy and carries its
optimizer state across rounds: size ``OptimConfig.total_steps`` as rounds times
``updates_per_iteration``. ``restart=True`` starts every round's finetuning from the reference
(initial) parameters with a fresh optimizer state (``tx.init``), so a round's model is the initial
policy finetuned on that round's selected samples, which were drawn from the previous round's model
(RAFT-style "retrain from the base" rounds; there the optimizer schedule restarts every round:
size ``total_steps`` as ``updates_per_iteration``).

The train state is ``rmscale.train.state``'s plain dict: ``params``, ``opt_state``, ``step`` (rounds
done) and ``rng`` (key data), checkpointable by ``rmscale.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
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

KEEPS = ("best", "top_fraction")


def num_kept_rows(rollout_batch_size: int, k: int, keep: str, keep_fraction: float) -> int:
  """Rows ``select`` keeps: ``B / k`` for 'best', ``ceil(keep_fraction * B)`` for 'top_fraction'.

  The product is rounded to 9 decimals before the ceiling, so float error cannot add a row
  (``0.1 * 30`` is 3.0000000000000004 in floating point; 3 rows are meant).
  """
  if keep == "best":
    return rollout_batch_size // k
  return math.ceil(round(keep_fraction * rollout_batch_size, 9))


@dataclasses.dataclass(frozen=True)
class RejectionConfig(policy.RolloutConfig):
  """Rejection-sampling hyper-parameters (Llama 2 best-of-k; RAFT top fraction).

  ``rollout_batch_size`` counts sequences sampled per round (``rollout_batch_size / k`` prompts);
  ``minibatch_size`` is the sequences per SFT step and per scoring pass over the rollout; the other
  rollout fields are ``policy.RolloutConfig``'s.
  """

  PREFIX: ClassVar[str] = "rejection."
  k: int = 4  # Samples per prompt.
  keep: str = "best"  # 'best': each prompt's best of k (Llama 2); 'top_fraction': RAFT.
  keep_fraction: float = 0.25  # 'top_fraction': share of the whole rollout kept, in (0, 1].
  sft_epochs: int = 1  # Passes over the kept sequences per round, reshuffled every pass.
  restart: bool = False  # True: every round finetunes the initial policy afresh (see module doc).

  def __post_init__(self):
    super().__post_init__()
    for name in ("k", "sft_epochs"):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"rejection.{name} must be a positive integer, got {value!r}")
    if self.rollout_batch_size % self.k:
      raise ValueError(
        f"rejection.k={self.k} does not divide rejection.rollout_batch_size="
        f"{self.rollout_batch_size} (each prompt is sampled k times)"
      )
    if self.keep not in KEEPS:
      raise ValueError(f"rejection.keep={self.keep!r} is not one of {KEEPS}")
    if not 0.0 < self.keep_fraction <= 1.0:
      raise ValueError(f"rejection.keep_fraction must be in (0, 1], got {self.keep_fraction}")
    if self.num_kept % self.minibatch_size:
      raise ValueError(
        f"rejection.minibatch_size={self.minibatch_size} does not divide the {self.num_kept} "
        f"sequences kept per round (rejection.keep={self.keep!r}"
        + (f", keep_fraction={self.keep_fraction}" if self.keep == "top_fraction" else "")
        + ")"
      )
    if not isinstance(self.restart, bool):
      raise ValueError(f"rejection.restart must be True or False, got {self.restart!r}")

  @property
  def prompts_per_iteration(self) -> int:
    """Prompts per round: each is sampled k times."""
    return self.rollout_batch_size // self.k

  @property
  def num_kept(self) -> int:
    """Sequences finetuned on per round (see ``num_kept_rows``)."""
    return num_kept_rows(self.rollout_batch_size, self.k, self.keep, self.keep_fraction)

  @property
  def sft_steps_per_epoch(self) -> int:
    """SFT steps per pass over the kept sequences."""
    return self.num_kept // self.minibatch_size

  @property
  def updates_per_iteration(self) -> int:
    """Optimizer steps per round: size ``OptimConfig.total_steps`` from this (see module doc)."""
    return self.sft_epochs * self.sft_steps_per_epoch


def select(scores_B, k: int, keep: str, keep_fraction: float):
  """The rows to finetune on, from the proxy's scores of a rollout of B/k prompts x k samples.

  Rows ``g*k .. g*k + k - 1`` are prompt g's samples. Returns ``(indices, weight)``: ``indices``
  int32[num_kept] (``num_kept_rows``; static) are the kept rows, for 'best' prompt g's best sample
  at position g, for 'top_fraction' in order of decreasing score; ``weight`` float32[B] is 1 on
  kept rows and 0 elsewhere (the selection as a mask over the rollout, for statistics). Ties go to
  the lower row index, so the choice is deterministic.
  """
  B = scores_B.shape[0]
  if keep == "best":
    best_G = jnp.argmax(scores_B.reshape(B // k, k), axis=1)  # The first maximum on ties.
    indices = jnp.arange(0, B, k) + best_G
  elif keep == "top_fraction":
    # lax.top_k puts the lower index first among equal values.
    _, indices = jax.lax.top_k(scores_B, num_kept_rows(B, k, keep, keep_fraction))
  else:
    raise ValueError(f"rejection.keep={keep!r} is not one of {KEEPS}")
  indices = indices.astype(jnp.int32)
  weight = jnp.zeros((B,), jnp.float32).at[indices].set(1.0)
  return indices, weight


# -- state -------------------------------------------------------------------------------------


def _check_model(policy_cfg: TransformerConfig):
  if not policy_cfg.lm_head:
    raise ValueError("the rejection-sampling policy needs an LM head (model.lm_head=True)")
  if policy_cfg.value_head:
    raise ValueError(
      "rejection sampling trains no critic: pass a policy_cfg without value_head (its parameters "
      "must match the reference's, which restart=True finetunes from)"
    )


def init_rejection_state(
  cfg: RejectionConfig,
  policy_cfg: TransformerConfig,
  policy_params,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  *,
  compiler_options: dict | None = None,
) -> tuple[State, dict]:
  """The sharded train state (``params`` from ``policy_params``, e.g. the SFT policy) and its
  shardings. ``compiler_options`` are XLA options for the init program."""
  del cfg  # The state does not depend on the method's settings; taken for symmetry with PPO.
  _check_model(policy_cfg)
  key = jax.random.wrap_key_data(rng) if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return init_state(
    policy_cfg, tx, key, mesh, rules, params=policy_params, compiler_options=compiler_options
  )


# -- the round ---------------------------------------------------------------------------------


def rejection_round(
  state: State,
  ref_params,
  reward_params,
  batch: dict,
  *,
  cfg: RejectionConfig,
  policy_cfg: TransformerConfig,
  reward_fn: RewardFn,
  tx: optax.GradientTransformation,
) -> tuple[State, dict]:
  """One round on ``batch = {'ids': prompt_GxP, 'mask': prompt_mask_GxP}`` (left-padded,
  G = ``cfg.prompts_per_iteration``).

  Pure and jittable; the round's randomness is ``fold_in(rng, step)``, so a resumed run repeats it
  exactly. Returns the new state and a flat dict of scalar metrics: the proxy's ``score_mean`` and
  ``score_std`` over all samples and ``kept_score_mean`` over the kept ones, ``kept_fraction``, the
  mean ``sft_loss`` and ``grad_norm`` of the round's steps, ``kl_mean``/``kl_se`` (KL(pi || pi_ref)
  per sampled sequence under the policy that sampled it, k1 on tempered log-probs) and
  ``response_len``.
  """
  P = batch["ids"].shape[1]
  B, T = cfg.rollout_batch_size, cfg.temperature
  ref_cfg = policy.reference_config(policy_cfg)
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  sample_rng, shuffle_rng = jax.random.split(key)

  # k contiguous copies of each prompt, sampled independently from the current policy.
  ids, mask = (
    nn.with_logical_constraint(jnp.repeat(x, cfg.k, axis=0, total_repeat_length=B), ("batch", None))
    for x in (batch["ids"], batch["mask"])
  )
  roll = policy.rollout(
    state["params"], ids, mask, sample_rng, cfg=cfg.rollout_config(), policy_cfg=policy_cfg
  )
  rmask_BxN = roll["response_mask"]

  def score_minibatch(mb):
    tok, m = mb["tokens"], mb["mask"]
    return {
      "logp": policy.policy_logprobs(policy_cfg, state["params"], tok, m, P, T),
      "logp_ref": policy.policy_logprobs(ref_cfg, ref_params, tok, m, P, T),
      "score": policy.score(reward_fn, reward_params, tok, m),
    }

  exp = policy.map_minibatches(
    score_minibatch, {"tokens": roll["tokens"], "mask": roll["mask"]}, B // cfg.minibatch_size
  )
  indices, weight_B = select(exp["score"], cfg.k, cfg.keep, cfg.keep_fraction)
  data = {"tokens": roll["tokens"], "mask": roll["mask"], "response_mask": rmask_BxN}

  def loss_fn(params, mb):
    out = policy.forward(policy_cfg, params, mb["tokens"], mb["mask"])
    logp = policy.response_logprobs(policy.response_logits(out, P, 1.0), mb["tokens"], P)
    loss = -rl_losses.masked_mean(logp, mb["response_mask"])
    return loss, {"sft_loss": loss}

  if cfg.restart:
    start = (ref_params, tx.init(ref_params))
  else:
    start = (state["params"], state["opt_state"])
  params, opt_state, upd_ExM = policy.minibatch_epochs(
    loss_fn, tx, *start, data, indices, cfg.sft_steps_per_epoch, shuffle_rng, cfg.sft_epochs
  )

  seq_kl_B = rl_losses.sequence_kl(exp["logp"], exp["logp_ref"], rmask_BxN)
  kl_mean, kl_se = rl_losses.mean_and_se(seq_kl_B)
  new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
  metrics = {k: v.mean() for k, v in upd_ExM.items()}
  metrics.update(
    score_mean=exp["score"].mean(),
    score_std=exp["score"].std(),
    kept_score_mean=jnp.sum(exp["score"] * weight_B) / jnp.sum(weight_B),
    kept_fraction=weight_B.mean(),
    kl_mean=kl_mean,
    kl_se=kl_se,
    response_len=rmask_BxN.sum(1).astype(jnp.float32).mean(),
  )
  return new_state, metrics


def make_rejection_step(
  cfg: RejectionConfig,
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
  """``rejection_round`` jitted on ``mesh``: ``step(state, ref_params, reward_params, batch)``.

  The state is donated; prompts (host arrays: the whole batch of ``cfg.prompts_per_iteration``, see
  ``policy.global_batch``) and every per-sequence array are sharded over the data axes, so the
  prompt count and ``minibatch_size`` must divide over the data-parallel devices; ``ref_params``
  (the initial policy) are laid out like the policy; ``reward_shardings`` (default: replicated) lays
  out ``reward_params``. Metrics come back replicated. ``step.jitted`` is the jitted function (for
  AOT lowering). ``compiler_options`` are XLA options for this program.
  """
  _check_model(policy_cfg)
  mesh_lib.check_batch_divisible(cfg.prompts_per_iteration, mesh, "rejection.prompts_per_iteration")
  mesh_lib.check_batch_divisible(cfg.minibatch_size, mesh, "rejection.minibatch_size")
  return policy.jit_iteration(
    functools.partial(rejection_round, cfg=cfg, policy_cfg=policy_cfg, reward_fn=reward_fn, tx=tx),
    policy_cfg=policy_cfg,
    state_shardings=state_shardings,
    mesh=mesh,
    rules=rules,
    prompts=cfg.prompts_per_iteration,
    what="rejection.rollout_batch_size // rejection.k",
    reward_shardings=reward_shardings,
    compiler_options=compiler_options,
  )
