"""What every policy-optimisation method shares: rollouts, tempered per-token log-probs, reward
scoring, minibatching that keeps rows on their devices, and the evaluator that measures a policy on
held-out prompts (fresh samples, KL(pi || pi_init) per sequence, the proxy's score).

Conventions. A sequence is ``[left-padded prompt (P) | right-padded response (N)]``; response token
j sits at slot ``P + j`` and its log-prob is read from the logits at slot ``P + j - 1``. Log-probs are
those of the *tempered* policy (``logits / temperature``), the distribution the sampler draws from,
for the policy and the reference alike, so KL(pi || pi_ref) is the KL between the distributions
actually sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmscale import rl_losses
from rmscale.losses import token_logprobs
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import Transformer, abstract_params
from rmscale.parallel import distributed
from rmscale.parallel import mesh as mesh_lib
from rmscale.sampling import SamplingConfig, sample

# reward_fn(reward_params, tokens_BxL, mask_BxL) -> float32[B]: a pure, jittable scorer of full
# [prompt | response] sequences. Its parameters are an argument (not closed over) so a reward model
# is passed to a jitted step sharded, like any other input, instead of baked into the program.
RewardFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How a method samples and scores: batch sizes, temperature and the response layout.

  Every method's config (``ppo.PPOConfig``, ``pg.PGConfig``, ``rejection.RejectionConfig``) extends
  it, so these fields, their checks and ``rollout_config()`` are written once; a subclass names its
  section in ``PREFIX`` for the error messages (``pg.minibatch_size=5 does not divide ...``).
  """

  PREFIX: ClassVar[str] = ""
  rollout_batch_size: int = 64  # Sequences per rollout (and per evaluation batch).
  minibatch_size: int = 16  # Sequences per forward pass when scoring (and per gradient step).
  temperature: float = 1.0  # Sampling temperature; log-probs and KL are the tempered policy's.
  max_new_tokens: int = 32  # Response length limit (the rollout's time axis).
  eos_id: int | None = None  # The tokenizer's EOS (ends a response); None: fixed-length responses.
  pad_id: int = 0  # The tokenizer's pad id, written after EOS.

  def __post_init__(self):
    p = self.PREFIX
    for name in ("rollout_batch_size", "minibatch_size", "max_new_tokens"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{p}{name} must be a positive integer, got {value!r}")
    if self.rollout_batch_size % self.minibatch_size:
      raise ValueError(
        f"{p}minibatch_size={self.minibatch_size} does not divide "
        f"{p}rollout_batch_size={self.rollout_batch_size}"
      )
    if not 0.0 < self.temperature < math.inf:
      raise ValueError(
        f"{p}temperature must be > 0 and finite (policy gradients need a stochastic policy), "
        f"got {self.temperature}"
      )
    if self.eos_id is not None and self.eos_id < 0:
      raise ValueError(f"{p}eos_id must be a token id >= 0 or None, got {self.eos_id}")
    if self.pad_id < 0:
      raise ValueError(f"{p}pad_id must be a token id >= 0, got {self.pad_id}")

  @property
  def num_minibatches(self) -> int:
    return self.rollout_batch_size // self.minibatch_size

  def rollout_config(self) -> RolloutConfig:
    """Just the sampling and scoring fields, for ``rollout`` and ``make_evaluator``."""
    return RolloutConfig(
      **{f.name: getattr(self, f.name) for f in dataclasses.fields(RolloutConfig)}
    )

  def sampling_config(self, temperature: float | None = None) -> SamplingConfig:
    return SamplingConfig(
      max_new_tokens=self.max_new_tokens,
      temperature=self.temperature if temperature is None else temperature,
      eos_id=self.eos_id,
      pad_id=self.pad_id,
    )


def reference_config(policy_cfg: TransformerConfig) -> TransformerConfig:
  """The frozen reference (initial policy): the policy's architecture without a value head."""
  return policy_cfg.replace(value_head=False)


def rm_reward_fn(rm_cfg: TransformerConfig) -> RewardFn:
  """A reward model's score at the last real token as a ``RewardFn`` (params passed per call)."""
  if rm_cfg.reward_head == "none":
    raise ValueError("rm_reward_fn needs a model config with a reward head (model.reward_head)")
  model = Transformer(rm_cfg)

  def score(params, tokens_BxL, mask_BxL):
    return model.apply({"params": params}, tokens_BxL, mask_BxL, method=Transformer.forward)[
      "reward"
    ]

  return score


def global_batch(batch: dict, sharding) -> dict:
  """A batch as global arrays laid out by ``sharding``.

  Host (numpy) arrays are taken as the *whole* batch, identical on every process (prompts drawn
  from a shared seed): each process places only its own devices' rows. That is what makes a host
  batch work under multi-controller JAX, where a jitted function refuses numpy inputs with a
  non-replicated sharding. ``jax.Array``s (e.g. ``mesh.put_batch``'s) pass through.
  """
  return {
    k: v if isinstance(v, jax.Array) else distributed.global_array(v, sharding)
    for k, v in batch.items()
  }


def model_param_shardings(model_cfg: TransformerConfig, mesh, rules=mesh_lib.DEFAULT_RULES):
  """NamedShardings of a model's parameters from their logical axis names."""
  shapes, specs = abstract_params(model_cfg)
  return mesh_lib.logical_shardings(shapes, specs, mesh, rules)


def check_reference(ref_params, policy_cfg: TransformerConfig) -> None:
  """``ref_params`` have the reference model's structure (the policy without a value head)."""
  if jax.tree.structure(ref_params) != jax.tree.structure(
    abstract_params(reference_config(policy_cfg))[0]
  ):
    raise ValueError(
      "ref_params do not match the reference model (the policy's architecture without "
      "a value head): pass the initial policy's parameters"
    )


def check_prompts(batch: dict, rows: int, what: str) -> None:
  if set(batch) != {"ids", "mask"} or batch["ids"].shape[0] != rows:
    raise ValueError(
      f"batch must be {{'ids', 'mask'}} of {rows} left-padded prompts ({what}); got keys "
      f"{sorted(batch)} with {batch['ids'].shape[0] if 'ids' in batch else '?'} rows"
    )


def jit_iteration(
  iteration: Callable,
  *,
  policy_cfg: TransformerConfig,
  state_shardings,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  prompts: int,
  what: str,
  reward_shardings=None,
  compiler_options: dict | None = None,
):
  """A method's ``iteration(state, ref_params, reward_params, batch) -> (state, metrics)`` jitted
  on ``mesh``: ``step(state, ref_params, reward_params, batch)``.

  The state is donated; prompts (host arrays: the whole batch of ``prompts`` rows, see
  ``global_batch``) are sharded over the data axes; ``ref_params`` (the initial policy, no value
  head) are laid out like the policy; ``reward_shardings`` (default: replicated) lays out
  ``reward_params``; metrics come back replicated. ``what`` names the prompt count in errors.
  ``step.jitted`` is the jitted function, for ahead-of-time lowering (``rmscale.aot``).
  """
  ref_shardings = model_param_shardings(reference_config(policy_cfg), mesh, rules)
  rep, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  jitted = jax.jit(
    iteration,
    in_shardings=(state_shardings, ref_shardings, reward_shardings or rep, data),
    out_shardings=(state_shardings, rep),
    donate_argnums=0,
    compiler_options=compiler_options,
  )

  def step(state, ref_params, reward_params, batch):
    check_reference(ref_params, policy_cfg)
    check_prompts(batch, prompts, what)
    batch = global_batch(batch, data)
    with mesh_lib.sharding_context(mesh, rules):
      return jitted(state, ref_params, reward_params, batch)

  step.jitted = jitted
  return step


# -- minibatches -------------------------------------------------------------------------------


def to_minibatches(x, n: int):
  """[B, ...] -> [n, B/n, ...], minibatch m holding rows m, n + m, 2n + m, ...

  That row order keeps each device's rows on that device when the batch dimension is sharded (a
  device's contiguous block of rows splits evenly over the minibatches), so no data moves.
  """
  B = x.shape[0]
  y = x.reshape((B // n, n) + x.shape[1:]).swapaxes(0, 1)
  return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))


def from_minibatches(y):
  n, b = y.shape[:2]
  return y.swapaxes(0, 1).reshape((n * b,) + y.shape[2:])


def map_minibatches(fn, arrays: dict, n: int) -> dict:
  """``fn`` over n minibatches in sequence (``lax.map``), so full [B, L, V] logits never coexist."""
  out = jax.lax.map(fn, jax.tree.map(lambda x: to_minibatches(x, n), arrays))
  return jax.tree.map(from_minibatches, out)


def minibatch_epochs(
  loss_fn, tx, params, opt_state, data: dict, rows, num_minibatches: int, rng, epochs: int
):
  """``epochs`` passes of optax updates over ``data[rows]``, reshuffled every pass.

  ``loss_fn(params, minibatch) -> (loss, metrics)``; each pass permutes ``rows`` (row indices of
  ``data``) and splits them into ``num_minibatches`` minibatches (``to_minibatches``). Returns
  ``(params, opt_state, metrics [epochs, num_minibatches])`` with ``grad_norm`` added.
  """

  def minibatch_step(carry, mb):
    params, opt_state = carry
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), {**metrics, "grad_norm": optax.tree.norm(grads)}

  def epoch(carry, epoch_rng):
    perm = rows[jax.random.permutation(epoch_rng, rows.shape[0])]
    minibatches = jax.tree.map(lambda x: to_minibatches(x[perm], num_minibatches), data)
    return jax.lax.scan(minibatch_step, carry, minibatches)

  (params, opt_state), metrics = jax.lax.scan(
    epoch, (params, opt_state), jax.random.split(rng, epochs)
  )
  return params, opt_state, metrics


# -- forward passes ----------------------------------------------------------------------------


def forward(model_cfg: TransformerConfig, params, tokens_BxL, mask_BxL) -> dict:
  return Transformer(model_cfg).apply(
    {"params": params}, tokens_BxL, mask_BxL, method=Transformer.forward
  )


def response_logits(out: dict, P: int, temperature: float):
  """Tempered logits predicting each response token and the one after the last: [B, N+1, V]."""
  return out["logits"][:, P - 1 :] / temperature


def response_logprobs(logits_BxN1xV, tokens_BxL, P: int):
  """log pi(response token j) for each j, [B, N], from ``response_logits``."""
  return token_logprobs(logits_BxN1xV, tokens_BxL[:, P - 1 :])


def policy_logprobs(model_cfg, params, tokens_BxL, mask_BxL, P: int, temperature: float):
  """The tempered per-token log-probs of a sequence's response under a model: [B, N]."""
  out = forward(model_cfg, params, tokens_BxL, mask_BxL)
  return response_logprobs(response_logits(out, P, temperature), tokens_BxL, P)


def score(reward_fn: RewardFn, reward_params, tokens_BxL, mask_BxL):
  """The reward of each sequence, float32[B] (checks the scorer's shape)."""
  s = reward_fn(reward_params, tokens_BxL, mask_BxL)
  if s.shape != (tokens_BxL.shape[0],):
    raise ValueError(
      f"reward_fn must return one score per sequence, shape ({tokens_BxL.shape[0]},); got {s.shape}"
    )
  return s.astype(jnp.float32)


def rollout(
  params,
  prompt_BxP,
  prompt_mask_BxP,
  rng,
  *,
  cfg: RolloutConfig,
  policy_cfg: TransformerConfig,
  temperature: float | None = None,
):
  """One response per prompt row; returns full ``tokens``/``mask`` [B, P+N] and ``response_mask``.

  ``temperature=0`` samples greedily (ReMax's baseline); default: ``cfg.temperature``.
  """
  out = sample(
    params,
    prompt_BxP,
    prompt_mask_BxP,
    rng,
    model_cfg=policy_cfg,
    scfg=cfg.sampling_config(temperature),
  )
  tokens = jnp.concatenate([prompt_BxP.astype(jnp.int32), out["tokens"]], 1)
  mask = jnp.concatenate([prompt_mask_BxP.astype(bool), out["mask"]], 1)
  return {"tokens": tokens, "mask": mask, "response_mask": out["mask"]}


# -- evaluation --------------------------------------------------------------------------------


def evaluate_batch(
  policy_params,
  init_params,
  reward_params,
  batch: dict,
  rng,
  *,
  cfg: RolloutConfig,
  policy_cfg: TransformerConfig,
  reward_fn: RewardFn | None = None,
) -> dict:
  """Fresh samples from the policy with KL(pi || pi_init) per sequence (and the reward, if given).

  Returns ``tokens``/``mask`` [B, P+N] ([prompt | response], for a gold RM), ``response_mask``,
  ``kl`` [B] (sum over response tokens of log pi - log pi_init, tempered), ``length`` [B] and
  ``score`` [B] when ``reward_fn`` is given.
  """
  P, T = batch["ids"].shape[1], cfg.temperature
  roll = rollout(policy_params, batch["ids"], batch["mask"], rng, cfg=cfg, policy_cfg=policy_cfg)
  ref_cfg = reference_config(policy_cfg)

  def per_minibatch(mb):
    tok, m = mb["tokens"], mb["mask"]
    logp = policy_logprobs(policy_cfg, policy_params, tok, m, P, T)
    logp_init = policy_logprobs(ref_cfg, init_params, tok, m, P, T)
    out = {"kl": rl_losses.sequence_kl(logp, logp_init, mb["response_mask"])}
    if reward_fn is not None:
      out["score"] = score(reward_fn, reward_params, tok, m)
    return out

  B = batch["ids"].shape[0]
  out = map_minibatches(
    per_minibatch, roll, B // cfg.minibatch_size if B % cfg.minibatch_size == 0 else 1
  )
  return {**roll, **out, "length": roll["response_mask"].sum(1)}


def make_evaluator(
  cfg: RolloutConfig,
  policy_cfg: TransformerConfig,
  policy_shardings,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  *,
  reward_fn: RewardFn | None = None,
  reward_shardings=None,
  compiler_options: dict | None = None,
):
  """``evaluate_batch`` jitted on ``mesh`` for batches of ``cfg.rollout_batch_size`` prompts:
  ``fn(policy_params, init_params, reward_params, batch, rng) -> dict`` (see ``evaluate``).

  Host prompts are the whole batch on every process (``global_batch``); outputs stay sharded over
  the data axes (``evaluate`` fetches them with ``distributed.to_host``).
  """
  mesh_lib.check_batch_divisible(cfg.rollout_batch_size, mesh, "rollout_batch_size")
  rep, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  fn = functools.partial(evaluate_batch, cfg=cfg, policy_cfg=policy_cfg, reward_fn=reward_fn)
  jitted = jax.jit(
    fn,
    in_shardings=(
      policy_shardings,
      model_param_shardings(reference_config(policy_cfg), mesh, rules),
      reward_shardings or rep,
      data,
      rep,
    ),
    out_shardings=data,
    compiler_options=compiler_options,
  )

  def evaluator(policy_params, init_params, reward_params, batch, rng):
    batch = global_batch(batch, data)
    with mesh_lib.sharding_context(mesh, rules):
      return jitted(policy_params, init_params, reward_params, batch, rng)

  evaluator.batch_size = cfg.rollout_batch_size
  return evaluator


def evaluate(
  evaluator,
  policy_params,
  init_params,
  prompt_ids: np.ndarray,
  prompt_mask: np.ndarray,
  rng: jax.Array,
  *,
  reward_params=None,
) -> dict:
  """KL(pi || pi_init) on fresh samples for every prompt row, in the evaluator's fixed batches.

  Returns host arrays ``tokens``, ``mask`` (full sequences, ready for a gold RM), ``response_mask``,
  ``kl`` and ``length`` per sample (``score`` too if the evaluator has a reward_fn), plus
  ``kl_mean`` and ``kl_se`` (standard error) in nats. Batch i uses ``fold_in(rng, i)``.
  Under multi-host every process passes all prompt rows and gets every result back.
  """
  n, batch = prompt_ids.shape[0], evaluator.batch_size
  if n == 0:
    raise ValueError("evaluate needs at least one prompt")
  parts = []
  for i, start in enumerate(range(0, n, batch)):
    ids, mask = prompt_ids[start : start + batch], prompt_mask[start : start + batch]
    k = ids.shape[0]
    if k < batch:  # Pad with copies of the last prompt; their samples are dropped.
      ids = np.concatenate([ids, np.repeat(ids[-1:], batch - k, 0)])
      mask = np.concatenate([mask, np.repeat(mask[-1:], batch - k, 0)])
    out = evaluator(
      policy_params,
      init_params,
      reward_params,
      {"ids": ids.astype(np.int32), "mask": mask.astype(bool)},
      jax.random.fold_in(rng, i),
    )
    parts.append({key: v[:k] for key, v in distributed.to_host(out).items()})
  res = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
  res["kl_mean"], res["kl_se"] = (float(x) for x in rl_losses.mean_and_se(res["kl"]))
  return res
