"""The one schema of an optimisation curve's points, the one recentring, and the one loader.

Every method (best-of-n, PPO, REINFORCE, ...) writes its curves as records of this schema into
``results/curves.jsonl``; ``fit`` and ``rmscale.report`` read them back with ``load``. A record is one
point of one run (a method against one proxy):

- ``method`` (a registered method), ``form`` (the functional form its gold curve is fitted with,
  'bon' or 'rl'), ``name`` (the run: the proxy's name, or e.g. ``<proxy>_kl0.05`` in a KL study),
  ``proxy_name``, ``rm_size``, ``rm_params``, ``data_size``, ``seed`` (the proxy's);
- ``x``: what indexes the curve (``n`` for best-of-n, ``iteration`` otherwise) and its value under
  that key;
- ``kl`` and ``kl_se`` (KL(pi || pi_init) in nats), ``d = sqrt(kl)``;
- ``proxy``, ``gold``, ``utility`` and their ``*_se`` (standard errors over evaluation prompts),
  recentred by the ``Reference``; ``gold_per_prompt`` (the bootstrap's resampling units);
- the method's own metrics, prefixed ``train_``.

The ``Reference`` is the initial policy's samples on the held-out evaluation prompts (stage
``reference``): gold and utility are scaled to mean 0 and unit variance under it, each proxy only
shifted to mean 0 (Gao et al.), so every curve starts at KL 0, gold 0.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from rmscale import fs, results

FILE = ("results", "curves.jsonl")
STUDY_FILE = ("results", "kl_study.jsonl")
IDENTITY = ("rm_size", "rm_params", "data_size", "seed", "name", "proxy_name")


def mean_and_se(x, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard error of the mean (ddof=1) along ``axis``; the error is NaN below 2 values.

  Best-of-n curves, curve records and reports use it. The KL statistics of jitted steps and of
  ``train.policy.evaluate`` come from ``rl_losses.mean_and_se``, which reports 0 below 2 values
  instead (a training metric that must stay finite).
  """
  x = np.asarray(x, dtype=np.float64)
  n = x.shape[axis]
  mean = x.mean(axis=axis)
  if n < 2:
    return mean, np.full_like(mean, np.nan)
  return mean, x.std(axis=axis, ddof=1) / np.sqrt(n)


@dataclasses.dataclass(frozen=True)
class Reference:
  """The initial policy's score statistics on the evaluation prompts: the origin of every curve."""

  gold: tuple[float, float]  # (mean, std) of the raw gold score.
  utility: tuple[float, float]  # (mean, std) of the human utility (NaN on real data).
  proxy: dict[str, float]  # Mean raw score of each proxy.
  # Recentred per-prompt means over the N samples ('gold', 'utility', 'proxy/<name>'), [prompts].
  per_prompt: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, compare=False)

  @classmethod
  def from_samples(cls, samples: Mapping[str, np.ndarray]) -> Reference:
    """From ``reference/samples.npz`` (``gold``, ``utility`` [prompts, N]; ``proxy`` [proxies,
    prompts, N] with ``proxy_names``)."""
    gold = np.asarray(samples["gold"], np.float64)
    utility = np.asarray(samples["utility"], np.float64)
    if not np.isfinite(gold).all():
      raise ValueError("the reference gold scores must be finite (found NaN or inf)")
    if not gold.std() > 0:
      raise ValueError(
        "the reference gold scores have zero variance; cannot scale to unit variance"
      )
    ref = cls(
      gold=(float(gold.mean()), float(gold.std())),
      utility=(float(utility.mean()), float(utility.std())),
      proxy={
        str(n): float(np.asarray(p, np.float64).mean())
        for n, p in zip(samples["proxy_names"], samples["proxy"])
      },
    )
    ref.per_prompt["gold"] = ref.gold_scores(gold).mean(axis=1)
    ref.per_prompt["utility"] = ref.utility_scores(utility).mean(axis=1)
    for n, p in zip(samples["proxy_names"], samples["proxy"]):
      ref.per_prompt[f"proxy/{n}"] = ref.proxy_scores(str(n), p).mean(axis=1)
    return ref

  def origin(self, proxy_name: str) -> dict:
    """The initial policy's point of every curve (KL 0), from all N reference samples per prompt:
    gold and proxy exactly 0 on average, per-prompt scores for the bootstrap."""
    return dict(
      kl=0.0,
      kl_se=0.0,
      proxy=self.per_prompt[f"proxy/{proxy_name}"],
      gold=self.per_prompt["gold"],
      utility=self.per_prompt["utility"],
    )

  def gold_scores(self, raw) -> np.ndarray:
    return (np.asarray(raw, np.float64) - self.gold[0]) / self.gold[1]

  def utility_scores(self, raw) -> np.ndarray:
    return (np.asarray(raw, np.float64) - self.utility[0]) / self.utility[1]

  def proxy_scores(self, proxy_name: str, raw) -> np.ndarray:
    if proxy_name not in self.proxy:
      raise KeyError(f"the reference samples have no scores of proxy {proxy_name!r}")
    return np.asarray(raw, np.float64) - self.proxy[proxy_name]


def point(*, kl, kl_se, proxy, gold, utility, length=None, **identity) -> dict:
  """One evaluation as a record: per-sample recentred scores [prompts] -> means and errors."""
  rec = {**identity, "kl": float(max(kl, 0.0)), "kl_se": float(kl_se)}
  rec["d"] = float(np.sqrt(rec["kl"]))
  for key, v in (("proxy", proxy), ("gold", gold), ("utility", utility)):
    m, se = mean_and_se(v)
    rec[key], rec[f"{key}_se"] = float(m), float(se)
  if length is not None:
    rec["length"] = float(np.mean(length))
  rec["gold_per_prompt"] = np.asarray(gold, np.float64).tolist()
  return rec


def load(workdir: str, parts: tuple = FILE) -> list[dict]:
  """The records of ``results/curves.jsonl`` (or another file of this schema); [] when absent."""
  path = os.path.join(workdir, *parts)
  return results.read_jsonl(path) if fs.exists(path) else []


def group(records: Iterable[Mapping]) -> dict[tuple[str, str], list[dict]]:
  """Records by curve, ``(method, name)``, each curve's points in increasing KL."""
  by = defaultdict(list)
  for r in records:
    by[(r["method"], r["name"])].append(dict(r))
  return {k: sorted(v, key=lambda r: r["kl"]) for k, v in sorted(by.items())}


def per_prompt(records: Sequence[Mapping]) -> dict[tuple[str, str], np.ndarray]:
  """Each curve's per-prompt gold scores [prompts, points], points in increasing KL (the order
  ``group`` and ``scaling.analysis.curves`` use); curves without them are left out."""
  out = {}
  for key, recs in group(records).items():
    if all(r.get("gold_per_prompt") is not None for r in recs):
      out[key] = np.stack([np.asarray(r["gold_per_prompt"], np.float64) for r in recs], axis=1)
  return out
