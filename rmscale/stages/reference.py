"""Stage ``reference``: the initial policy on the held-out evaluation prompts, every curve's origin.

``reference.num_prompts`` held-out prompts (the ones every method is evaluated on) get
``reference.samples_per_prompt`` samples each from the initial policy, scored by the gold RM, the
human utility and every proxy. Their statistics are the one recentring of every curve
(``curves.Reference``: gold and utility to mean 0 and unit variance, proxies shifted to mean 0), and
best-of-n draws from these very samples.
"""

from __future__ import annotations

import numpy as np

from rmscale import checks, curves, fs, results, rng
from rmscale.stages import common, proxies, roles

SAMPLES = ("reference", "samples.npz")


def validate(config, devices: int) -> None:
  """config.reference: the evaluation prompts and the initial policy's samples per prompt."""
  del devices
  checks.count(config, "reference.num_prompts")
  checks.count(config, "reference.samples_per_prompt", minimum=2)


def prompts(ctx: common.Context) -> dict[str, np.ndarray]:
  """The held-out evaluation prompts (``ids``, ``mask``): one stream, shared by every method."""
  n = ctx.config.reference.num_prompts
  return ctx.world.sample_prompts(rng.numpy(ctx.config.seed, "reference", "prompts"), n, "eval")


def samples(ctx: common.Context) -> dict[str, np.ndarray]:
  """This stage's samples and scores (``reference/samples.npz``)."""
  path = ctx.path(*SAMPLES)
  if not fs.exists(path):
    raise fs.MissingFileError(
      f"the initial policy's reference samples are missing ({path}); run the reference stage first"
    )
  return results.read_npz(path)


def load(ctx: common.Context) -> curves.Reference:
  return curves.Reference.from_samples(samples(ctx))


def run(ctx: common.Context) -> dict:
  c = ctx.config.reference
  P, N = c.num_prompts, c.samples_per_prompt
  policy_cfg = roles.model_config(ctx, ctx.config.policy.size, "policy")
  policy = common.load_params(ctx, ctx.path("policy_init", "params"), policy_cfg)
  p = prompts(ctx)
  prompt_ids, prompt_mask = np.repeat(p["ids"], N, 0), np.repeat(p["mask"], N, 0)
  key = rng.key(ctx.config.seed, "reference", "samples")
  resp = common.sample(ctx, policy_cfg, policy, prompt_ids, prompt_mask, key)
  tokens, mask = common.sequences(prompt_ids, prompt_mask, resp["ids"], resp["mask"])
  gold = roles.gold_fn(ctx)(tokens, mask).reshape(P, N)
  # Real preference data has no hidden utility: NaN, and its curves are then NaN too.
  utility = ctx.world.utility(prompt_ids, resp["ids"], resp["mask"]).reshape(P, N)
  records = proxies.load(ctx)
  proxy_scores = []
  for rec in records:
    cfg = roles.model_config(ctx, rec["rm_size"], "rm")
    params = common.load_params(ctx, ctx.path("proxies", rec["name"], "params"), cfg)
    proxy_scores.append(common.reward_fn(ctx, cfg, params)(tokens, mask).reshape(P, N))
  arrays = dict(
    prompt_ids=p["ids"],
    prompt_mask=p["mask"],
    response_ids=resp["ids"].reshape(P, N, -1),
    response_mask=resp["mask"].reshape(P, N, -1),
    gold=gold,
    utility=utility,
    proxy=np.stack(proxy_scores),
    proxy_names=np.array([r["name"] for r in records]),
  )
  ref = curves.Reference.from_samples(arrays)  # Fails here, not later, on degenerate scores.
  results.write_npz(ctx.path(*SAMPLES), **arrays)
  return {
    "num_prompts": P,
    "samples_per_prompt": N,
    "gold_mean": ref.gold[0],
    "gold_std": ref.gold[1],
    "headline": f"{P} prompts x {N} samples; raw gold {ref.gold[0]:+.3f} +- {ref.gold[1]:.3f}",
  }
