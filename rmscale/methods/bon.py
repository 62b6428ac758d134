"""Best-of-n: the proxy's best of n samples from the initial policy, exactly, without resampling.

It reuses the reference stage's samples (N per evaluation prompt): the unbiased estimator turns
them into the expected proxy, gold and utility scores of best-of-n for a geometric grid of n up to
N, with KL_bon(n) = log n - (n - 1)/n (Gao et al.; Stiennon et al.).
"""

from __future__ import annotations

import numpy as np

from rmscale import bon, checks, curves
from rmscale.methods.base import Method, Run
from rmscale.stages import common, reference


def _validate(config, devices: int) -> None:
  del devices
  checks.count(config, "optimise.bon.num_n", minimum=2)


def run(
  method: Method, ctx: common.Context, section, spec: Run, ref: curves.Reference
) -> list[dict]:
  samples = reference.samples(ctx)
  name = spec.proxy["name"]
  names = [str(n) for n in samples["proxy_names"]]
  if name not in names:
    raise ValueError(f"the reference samples have no scores of proxy {name!r}; rerun reference")
  proxy = ref.proxy_scores(name, samples["proxy"][names.index(name)])
  gold = ref.gold_scores(samples["gold"])
  utility = ref.utility_scores(samples["utility"])
  ns = bon.geometric_ns(gold.shape[1], section.num_n)
  curve = bon.unbiased_best_of_n(proxy, gold, ns)
  has_utility = bool(np.isfinite(utility).all())
  true = bon.unbiased_best_of_n(proxy, utility, ns) if has_utility else None
  meta = {k: spec.proxy[k] for k in ("rm_size", "rm_params", "data_size", "seed")}
  records = []
  for i, r in enumerate(curve.records()):
    records.append(
      {
        "method": method.name,
        "form": method.form,
        "x": method.x,
        "name": spec.name,
        "proxy_name": name,
        **meta,
        **r,
        "kl_se": 0.0,  # Exact: KL_bon(n) is analytic.
        "d": float(np.sqrt(r["kl"])),
        "utility": float(true.gold[i]) if true else float("nan"),
        "utility_se": float(true.gold_se[i]) if true else float("nan"),
        "gold_per_prompt": curve.gold_per_prompt[:, i].tolist(),
      }
    )
  return records


METHOD = Method(
  name="bon",
  title="Best-of-n",
  form="bon",
  x="n",
  defaults={"num_n": 12},  # Points on the geometric grid of n from 1 to the reference's N.
  run=run,
  validate=_validate,
)
