"""Stage ``label``: two samples per prompt from the initial policy, the gold RM picks the winner.

Labels are deterministic (higher gold score wins, as in Gao et al.), with optional label noise
(flip probability ``label.noise``, seeded). The last ``label.val_fraction`` of rows is validation.
"""

from __future__ import annotations

import numpy as np

from rmscale import checks, results, rng
from rmscale.stages import common, roles
from rmscale.stages.gold import comparison_arrays

PATH = ("label", "comparisons.npz")


def validate(config, devices: int) -> None:
  """config.label: how many comparisons, the validation share and the label noise."""
  del devices
  checks.count(config, "label.num_comparisons", minimum=2)
  checks.in_range(config, "label.noise", 0.0, 0.5)
  fraction = checks.value(config, "label.val_fraction")
  if not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
    checks.fail("label.val_fraction", fraction, "must be in (0, 1)")


def num_train(config) -> int:
  """Training comparisons the label stage gives (the rest are held out for validation)."""
  n = config.label.num_comparisons
  return n - round(config.label.val_fraction * n)


def run(ctx: common.Context) -> dict:
  c, seed = ctx.config.label, ctx.config.seed
  policy_cfg = roles.model_config(ctx, ctx.config.policy.size, "policy")
  params = common.load_params(ctx, ctx.path("policy_init", "params"), policy_cfg)
  prompts = ctx.world.sample_prompts(
    rng.numpy(seed, "label", "prompts"), c.num_comparisons, "train"
  )
  a = common.sample(
    ctx, policy_cfg, params, prompts["ids"], prompts["mask"], rng.key(seed, "label", "a")
  )
  b = common.sample(
    ctx, policy_cfg, params, prompts["ids"], prompts["mask"], rng.key(seed, "label", "b")
  )
  gold = roles.gold_fn(ctx)
  ga = gold(*common.sequences(prompts["ids"], prompts["mask"], a["ids"], a["mask"]))
  gb = gold(*common.sequences(prompts["ids"], prompts["mask"], b["ids"], b["mask"]))
  ua = ctx.world.utility(prompts["ids"], a["ids"], a["mask"])
  ub = ctx.world.utility(prompts["ids"], b["ids"], b["mask"])
  a_wins = ga >= gb
  flip = rng.numpy(seed, "label", "noise").random(len(a_wins)) < c.noise
  labels = a_wins ^ flip
  arrays = comparison_arrays(prompts["ids"], prompts["mask"], a, b, labels)
  n_val = int(round(c.val_fraction * len(labels)))
  split = np.zeros(len(labels), np.int8)
  split[len(labels) - n_val :] = 1
  decided = np.isfinite(ua) & np.isfinite(ub) & (ua != ub)  # Real data has no utility (NaN).
  results.write_npz(
    ctx.path(*PATH),
    split=split,
    gold_chosen=np.where(labels, ga, gb),
    gold_rejected=np.where(labels, gb, ga),
    **arrays,
  )
  out = {
    "num_train": int((split == 0).sum()),
    "num_val": n_val,
    "label_noise": c.noise,
    "mean_response_tokens": float(np.concatenate([a["mask"], b["mask"]]).sum(1).mean()),
  }
  if decided.any():
    # How often the gold label agrees with the human utility on policy samples (ties excluded).
    out["gold_utility_agreement"] = float(np.mean((ga >= gb)[decided] == (ua > ub)[decided]))
  out["headline"] = f"{out['num_train']:,} training and {n_val:,} validation comparisons" + (
    f", gold agrees with the utility on {out['gold_utility_agreement']:.3f}"
    if decided.any()
    else ""
  )
  return out


def load(ctx: common.Context) -> tuple[dict, dict]:
  """(train, validation) comparison arrays."""
  data = results.read_npz(ctx.path(*PATH))
  split = data.pop("split")
  return ({k: v[split == 0] for k, v in data.items()}, {k: v[split == 1] for k, v in data.items()})
