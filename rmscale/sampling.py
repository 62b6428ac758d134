"""Batched autoregressive sampling with a KV cache, one jitted ``lax.while_loop``, static shapes.

Prompts are **left-padded** (``Tokenizer.encode_batch(..., padding_side='left')``): every row's last
prompt token then sits in the same slot, so one prefill call yields the first next-token logits for
all rows, and per-row positions (counting only real tokens) keep the rotary/learned positions exact.

The loop stops early once every row has emitted EOS; slots after a row's EOS hold ``pad_id`` with mask 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import Transformer, default_positions, init_cache
from rmscale.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  temperature: float = 1.0  # 0 means greedy.
  top_k: int = 0  # 0 disables.
  top_p: float = 1.0  # 1 disables nucleus filtering.
  eos_id: int | None = None  # None: never stop early.
  pad_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"sampling.max_new_tokens must be positive, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits_BxV, scfg: SamplingConfig):
  """The sampling distribution's logits: tempered, then top-k and top-p filtered (-inf outside)."""
  if scfg.greedy:
    return logits_BxV
  logits = logits_BxV / scfg.temperature
  if scfg.top_k:
    kth_B = jax.lax.top_k(logits, scfg.top_k)[0][:, -1]
    logits = jnp.where(logits < kth_B[:, None], -jnp.inf, logits)
  if scfg.top_p < 1.0:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is kept if the mass before it < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep_B = jnp.maximum(jnp.sum(mass_before < scfg.top_p, axis=-1), 1)
    threshold_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)
    logits = jnp.where(logits < threshold_B, -jnp.inf, logits)
  return logits


def draw_tokens(rng, logits_BxV):
  """One token per row from ``softmax(logits)`` by inverting its CDF with a single uniform per row.

  Exact in distribution like Gumbel-max (``jax.random.categorical``), but it draws B random numbers
  instead of B x V: on CPU the random bits dominated the whole sampler's time. Tokens with zero
  probability (filtered to -inf) are never drawn.
  """
  probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
  cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
  u_Bx1 = jax.random.uniform(rng, (logits_BxV.shape[0], 1)) * cdf_BxV[:, -1:]
  tok_B = jnp.sum(cdf_BxV <= u_Bx1, axis=-1)
  # Rounding can put u on the CDF's last plateau: fall back to the last token with mass.
  V = logits_BxV.shape[-1]
  last_B = V - 1 - jnp.argmax(probs_BxV[:, ::-1] > 0, axis=-1)
  return jnp.minimum(tok_B, last_B).astype(jnp.int32)


def sample(
  params, prompt_BxP, prompt_mask_BxP, rng, *, model_cfg: TransformerConfig, scfg: SamplingConfig
):
  """Samples ``scfg.max_new_tokens`` tokens after each left-padded prompt.

  Returns ``tokens`` [B,N] (pad after EOS), ``mask`` [B,N] (1 for generated tokens, EOS included),
  ``logprobs`` [B,N]: log-probability of each sampled token under the distribution it was drawn
  from (tempered and filtered; the raw model for greedy), 0 where mask is 0.
  """
  model = Transformer(model_cfg)
  B, P = prompt_BxP.shape
  N = scfg.max_new_tokens
  if model_cfg.position == "learned" and P + N > model_cfg.max_len:
    raise ValueError(
      f"prompt length {P} + max_new_tokens {N} exceeds model.max_len={model_cfg.max_len}"
    )
  apply = functools.partial(model.apply, {"params": params}, method=Transformer.forward)

  prompt_mask_BxP = prompt_mask_BxP.astype(bool)
  positions_BxP = default_positions(prompt_mask_BxP)
  out = apply(prompt_BxP, prompt_mask_BxP, positions_BxP, cache=init_cache(model_cfg, B, P + N))

  def cond(carry):
    step, done_B = carry[0], carry[-1]
    return (step < N) & ~jnp.all(done_B)

  def body(carry):
    step, cache, logits_BxV, pos_B, tokens, mask, logprobs, done_B = carry
    logits = filter_logits(logits_BxV, scfg)
    if scfg.greedy:
      tok_B = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      tok_B = draw_tokens(jax.random.fold_in(rng, step), logits)
    lp_B = jnp.take_along_axis(jax.nn.log_softmax(logits), tok_B[:, None], -1)[:, 0]
    live_B = ~done_B
    tok_B = jnp.where(live_B, tok_B, scfg.pad_id)
    tokens = tokens.at[:, step].set(tok_B)
    mask = mask.at[:, step].set(live_B)
    logprobs = logprobs.at[:, step].set(jnp.where(live_B, lp_B, 0.0))
    if scfg.eos_id is not None:
      done_B = done_B | (tok_B == scfg.eos_id)
    nxt = apply(tok_B[:, None], live_B[:, None], pos_B[:, None], cache=cache)
    return (step + 1, nxt["cache"], nxt["logits"][:, -1], pos_B + 1, tokens, mask, logprobs, done_B)

  init = (
    jnp.zeros((), jnp.int32),
    out["cache"],
    out["logits"][:, -1],
    positions_BxP[:, -1] + 1,
    jnp.full((B, N), scfg.pad_id, jnp.int32),
    jnp.zeros((B, N), bool),
    jnp.zeros((B, N), jnp.float32),
    jnp.zeros((B,), bool),
  )
  _, _, _, _, tokens, mask, logprobs, _ = jax.lax.while_loop(cond, body, init)
  return {"tokens": tokens, "mask": mask, "logprobs": logprobs}


def make_sampler(
  model_cfg: TransformerConfig, scfg: SamplingConfig, in_shardings=None, out_shardings=None
):
  """``jit(sample)`` for fixed configs: ``fn(params, prompt_BxP, prompt_mask_BxP, rng)``."""
  fn = functools.partial(sample, model_cfg=model_cfg, scfg=scfg)
  if in_shardings is None:
    return jax.jit(fn)
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)


def make_sharded_sampler(
  model_cfg: TransformerConfig,
  scfg: SamplingConfig,
  mesh,
  param_shardings,
  rules=mesh_lib.DEFAULT_RULES,
  compiler_options: dict | None = None,
):
  """``sample`` jitted on ``mesh``: ``fn(params, prompt_BxP, prompt_mask_BxP, rng) -> dict``.

  Parameters are laid out by ``param_shardings``, prompts and every output split over the data axes,
  the key replicated (so a row draws the same tokens on any mesh). Nothing is donated: the
  parameters serve many batches and the KV cache lives inside the program. The model's activation
  constraints resolve on ``mesh`` because every call traces inside its sharding context.
  """
  data = mesh_lib.batch_sharding(mesh)
  jitted = jax.jit(
    functools.partial(sample, model_cfg=model_cfg, scfg=scfg),
    in_shardings=(param_shardings, data, data, mesh_lib.replicated(mesh)),
    out_shardings=data,
    compiler_options=compiler_options,
  )

  def sampler(params, prompt_BxP, prompt_mask_BxP, rng):
    with mesh_lib.sharding_context(mesh, rules):
      return jitted(params, prompt_BxP, prompt_mask_BxP, rng)

  return sampler
