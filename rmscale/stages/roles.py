"""One place maps a role (the policy, a proxy RM, the gold RM) to its model, parameters and scorer.

A role's model is a named size of ``rmscale/models/sizes.py`` sized to the world's sequences, or a
real checkpoint from a local Hugging Face directory (``rmscale.hf``):

- policy: ``config.policy.hf_dir`` (a causal LM); ``policy_init`` copies it into the workdir,
  optionally after SFT on the dataset's chosen responses (``policy.sft``);
- proxies: ``config.proxies.init = "hf"``: each size starts from the LM in
  ``proxies.hf_dir_template.format(size=...)``, with a fresh reward head (a sequence-classification
  checkpoint's trained head loads as is);
- gold: ``config.gold.kind = "hf"``: the ``*ForSequenceClassification`` checkpoint in
  ``gold.hf_dir`` scores every sample. A gold RM with its own tokenizer (``gold.tokenizer_dir``, e.g.
  a Llama-based RM judging a Pythia policy, as in Coste et al.) sees the samples as text,
  re-tokenised into its own ``[prompt | response]`` layout.

A checkpoint's architecture comes from its config.json (rotary fraction, vocabulary, widths), not
from ``config.model``, which only sets dtypes, the reward-head type and the matmul kind. Every error
names the config key and the file at fault.
"""

from __future__ import annotations

import functools
import os

import jax

from rmscale import hf, rng
from rmscale.data import hf_tokenize
from rmscale.errors import UserError
from rmscale.models import sizes
from rmscale.models.config import TransformerConfig
from rmscale.stages import common


def model_config(ctx: common.Context, size: str, role: str) -> TransformerConfig:
  """The model of a role ('policy' or 'rm') at a named size, sized to the world's sequences."""
  hf_cfg = hf_model_config(ctx, size, role)  # A local Hugging Face checkpoint's shape.
  if hf_cfg is not None:
    return hf_cfg
  m = ctx.config.model
  common = dict(
    vocab_size=ctx.world.tokenizer.vocab_size,
    vocab_multiple=m.get("vocab_multiple", 8),  # Padded: splits over tensor axes of up to 8.
    family=m.family,
    rotary_pct=m.rotary_pct,
    max_len=ctx.prompt_len + ctx.response_len,
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    matmul=m.matmul,
  )
  if role == "policy":
    return sizes.model_config(size, **common)
  if role == "rm":
    return sizes.model_config(size, lm_head=False, reward_head=m.reward_head, **common)
  raise ValueError(f"unknown model role {role!r}")


def policy_dir(config) -> str:
  return config.policy.get("hf_dir", "") or ""


def proxy_dir(config, size: str) -> str:
  """The directory of the LM a proxy of ``size`` starts from ("" unless ``proxies.init == "hf"``)."""
  if config.proxies.init != "hf":
    return ""
  return config.proxies.hf_dir_template.format(size=size)


def _role_kwargs(config, role: str) -> dict:
  m = config.model
  common_kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, matmul=m.matmul)
  if role == "policy":
    return dict(reward_head="none", lm_head=True, **common_kw)
  if role == "rm":
    return dict(reward_head=m.reward_head, lm_head=False, **common_kw)
  if role == "gold":  # The checkpoint's own heads: a trained score head (checked in config_for).
    return dict(reward_head=None, lm_head=None, **common_kw)
  raise ValueError(f"unknown model role {role!r}")


@functools.lru_cache(maxsize=64)
def _load_config(path: str, key: str, items: tuple) -> TransformerConfig:
  try:
    return hf.load_config(path, **dict(items))
  except (ValueError, OSError) as e:
    raise UserError(f"config.{key}={path!r}: {e}") from None


def config_for(ctx: common.Context, path: str, role: str, key: str) -> TransformerConfig:
  """The checkpoint's TransformerConfig for ``role``, checked against this run's data."""
  cfg = _load_config(path, key, tuple(sorted(_role_kwargs(ctx.config, role).items())))
  tok = ctx.world.tokenizer
  if role != "gold" or not gold_retokenizes(ctx):
    if tok.vocab_size > cfg.vocab_size:
      raise UserError(
        f"config.{key}={path!r}: the model's vocab_size={cfg.vocab_size} is smaller than the "
        f"tokenizer's {tok.vocab_size} tokens (config.data.tokenizer_dir); they do not match"
      )
    if ctx.prompt_len + ctx.response_len > cfg.max_len:
      raise UserError(
        f"config.{key}={path!r}: data.prompt_len + data.response_len = "
        f"{ctx.prompt_len + ctx.response_len} exceeds the model's max_len={cfg.max_len}"
      )
  if role == "gold" and cfg.reward_head == "none":
    raise UserError(
      f"config.gold.hf_dir={path!r}: {os.path.join(path, 'config.json')} is not a "
      "*ForSequenceClassification checkpoint; the gold RM needs its trained score head"
    )
  return cfg


def hf_model_config(ctx: common.Context, size: str, role: str) -> TransformerConfig | None:
  """The checkpoint config of a role/size that this run loads from Hugging Face, else None."""
  c = ctx.config
  if role == "policy" and size == c.policy.size and policy_dir(c):
    return config_for(ctx, policy_dir(c), "policy", "policy.hf_dir")
  if role == "rm" and size in c.proxies.sizes and proxy_dir(c, size):
    return config_for(ctx, proxy_dir(c, size), "rm", "proxies.hf_dir_template")
  return None


def load_hf(ctx: common.Context, path: str, cfg: TransformerConfig, role: str, seed: int):
  """Parameters of ``path`` for ``role``, placed straight into this run's sharding."""
  _, params = hf.load_pretrained(
    path,
    **_role_kwargs(ctx.config, role),
    shardings=common.param_shardings(ctx, cfg),
    rng=jax.random.key(seed),
  )
  return params


def proxy_init(ctx: common.Context, size: str, seed: int):
  """A proxy's starting parameters: the checkpoint of its size (a trained score head included).

  From a causal LM only the trunk matters: it is loaded with its LM head, which ``init_state``'s
  merge drops while its jitted init draws the fresh reward head (``hf``'s own fresh heads are
  initialised eagerly, seconds per load on a CPU).
  """
  path = proxy_dir(ctx.config, size)
  cfg = model_config(ctx, size, "rm")
  stored = _load_config(path, "proxies.hf_dir_template", (("lm_head", None), ("reward_head", None)))
  if stored.reward_head != "none" or not stored.lm_head:
    return load_hf(ctx, path, cfg, "rm", seed)
  lm_cfg = config_for(ctx, path, "policy", "proxies.hf_dir_template")
  return load_hf(ctx, path, lm_cfg, "policy", seed)


def gold_retokenizes(ctx: common.Context) -> bool:
  """Whether the gold RM reads text through its own tokenizer (``gold.tokenizer_dir``)."""
  own = ctx.config.gold.get("tokenizer_dir", "")
  data = ctx.config.get("data", {}).get("tokenizer_dir", "")
  return bool(own) and os.path.realpath(own) != os.path.realpath(data)


def gold_scorer(ctx: common.Context):
  """``score(tokens_NxL, mask_NxL) -> float32[N]`` of the Hugging Face gold RM."""
  g = ctx.config.gold
  cfg = config_for(ctx, g.hf_dir, "gold", "gold.hf_dir")
  params = load_hf(ctx, g.hf_dir, cfg, "gold", rng.integer(ctx.config.seed, "gold", "heads"))
  if not gold_retokenizes(ctx):
    return common.reward_fn(ctx, cfg, params)
  try:
    dst = hf_tokenize.load_tokenizer(g.tokenizer_dir)
  except (ValueError, OSError) as e:
    raise UserError(f"config.gold.tokenizer_dir={g.tokenizer_dir!r}: {e}") from None
  P, R = g.get("prompt_len", 0) or ctx.prompt_len, g.get("response_len", 0) or ctx.response_len
  if dst.vocab_size > cfg.vocab_size or P + R > cfg.max_len:
    raise UserError(
      f"config.gold.hf_dir={g.hf_dir!r}: its tokenizer ({dst.vocab_size} tokens, "
      f"gold.tokenizer_dir) or lengths ({P} + {R}, gold.prompt_len/response_len) do not fit the "
      f"model (vocab_size={cfg.vocab_size}, max_len={cfg.max_len})"
    )
  score = common.reward_fn(ctx, cfg, params)
  src = ctx.world.tokenizer
  return lambda tokens, mask: score(
    *hf_tokenize.retokenize(src, dst, tokens, mask, ctx.prompt_len, P, R)
  )


def gold_fn(ctx: common.Context):
  """The gold scorer: the world's human utility ('oracle') or the trained gold RM."""
  if ctx.config.gold.kind == "hf":  # A local sequence-classification checkpoint.
    return gold_scorer(ctx)
  if ctx.config.gold.kind == "oracle":
    P = ctx.prompt_len
    return lambda tokens, mask: ctx.world.utility(tokens[:, :P], tokens[:, P:], mask[:, P:])
  cfg = model_config(ctx, ctx.config.gold.size, "rm")
  return common.reward_fn(ctx, cfg, common.load_params(ctx, ctx.path("gold", "params"), cfg))
