"""Stage ``bon``: best-of-n against every proxy, scored by the gold RM, on held-out prompts.

N samples per evaluation prompt are drawn once from the initial policy and scored by every proxy,
the gold RM and the human utility; the unbiased estimator turns them into exact best-of-n curves
for a geometric grid of n, with KL_bon(n) = log n - (n-1)/n. Gold and utility are recentred to mean
0 and unit variance under the initial policy, proxies only shifted (Gao et al.).
"""

from __future__ import annotations

import numpy as np

from rmscale import bon, checks, results
from rmscale.stages import common, proxies

RESULTS = ("results", "bon.jsonl")
SAMPLES = ("bon", "samples.npz")


def validate(config, devices: int) -> None:
  """config.bon: prompts, samples per prompt and the grid of n."""
  del devices
  checks.count(config, "bon.num_prompts")
  checks.count(config, "bon.n_samples", minimum=2)
  checks.count(config, "bon.num_n", minimum=2)


def run(ctx: common.Context) -> dict:
  c, seed = ctx.config.bon, ctx.config.seed
  P, N = c.num_prompts, c.n_samples
  policy_cfg = common.model_config(ctx, ctx.config.policy.size, "policy")
  policy = common.load_params(ctx, ctx.path("policy_init", "params"), policy_cfg)
  prompts = ctx.world.sample_prompts(np.random.default_rng(seed + 8), P, "eval")
  prompt_ids, prompt_mask = np.repeat(prompts["ids"], N, 0), np.repeat(prompts["mask"], N, 0)
  resp = common.sample(ctx, policy_cfg, policy, prompt_ids, prompt_mask, seed + 9)
  tokens, mask = common.sequences(prompt_ids, prompt_mask, resp["ids"], resp["mask"])

  gold_raw = common.gold_fn(ctx)(tokens, mask).reshape(P, N)
  utility_raw = ctx.world.utility(prompt_ids, resp["ids"], resp["mask"]).reshape(P, N)
  gold = bon.recentre(gold_raw, gold_raw)
  # Real preference data has no hidden utility (NaN): its curves are then NaN, not estimated.
  has_utility = bool(np.isfinite(utility_raw).all())
  utility = bon.recentre(utility_raw, utility_raw) if has_utility else None
  ns = bon.geometric_ns(N, c.num_n)

  records, proxy_scores, curves = [], [], {}
  for rec in proxies.load(ctx):
    cfg = common.model_config(ctx, rec["rm_size"], "rm")
    params = common.load_params(ctx, ctx.path("proxies", rec["name"], "params"), cfg)
    raw = common.reward_fn(ctx, cfg, params)(tokens, mask).reshape(P, N)
    proxy = bon.recentre(raw, raw, shift_only=True)
    curve = bon.unbiased_best_of_n(proxy, gold, ns)
    if has_utility:
      true = bon.unbiased_best_of_n(proxy, utility, ns)
      u_curve, u_se_curve = true.gold, true.gold_se
    else:
      u_curve = u_se_curve = np.full(len(ns), np.nan)
    meta = {k: rec[k] for k in ("rm_size", "rm_params", "data_size", "seed", "name")}
    for r, u, u_se in zip(curve.records(**meta), u_curve, u_se_curve):
      records.append(
        {**r, "d": float(np.sqrt(r["kl"])), "utility": float(u), "utility_se": float(u_se)}
      )
    proxy_scores.append(raw)
    curves[rec["name"]] = curve.gold_per_prompt
  results.write_npz(
    ctx.path(*SAMPLES),
    prompt_ids=prompts["ids"],
    response_ids=resp["ids"].reshape(P, N, -1),
    response_mask=resp["mask"].reshape(P, N, -1),
    gold=gold_raw,
    utility=utility_raw,
    proxy=np.stack(proxy_scores),
    proxy_names=np.array([r["name"] for r in proxies.load(ctx)]),
    ns=ns,
    **{f"gold_per_prompt__{k}": v for k, v in curves.items()},
  )
  results.write_jsonl(ctx.path(*RESULTS), records)
  return {
    "num_prompts": P,
    "n_samples": N,
    "max_kl": float(bon.kl_bon(N)),
    "headline": common.gold_peak_headline(records, "n"),
  }
