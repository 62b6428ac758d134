"""Best-of-n maths: the unbiased estimator, its KL, and score recentring.

Best-of-n (BoN) draws n samples from the initial policy and keeps the one the proxy RM likes best.
Running it once per n would need sum(ns) samples per prompt and give a noisy curve; instead we draw
N >= max(ns) samples once and compute, exactly, the *expected* proxy and gold score of the best
of a uniformly random n-subset of them (Nakano et al. 2021, App. I; Gao et al. 2023). With the
samples sorted by proxy score ascending, sample i (1-based) is the best of a random n-subset with
probability C(i-1, n-1) / C(N, n): the subset must contain it and n-1 of the i-1 samples below it.

This module is only the estimator; sampling and scoring live with the policy and RM code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.special import gammaln

from rmscale import curves


def kl_bon(n):
  """Analytic KL(best-of-n || base policy) in nats: log n - (n - 1) / n.

  Exact for a continuous proxy with no ties (Stiennon et al. 2020; Gao et al. 2023). A scalar in
  gives a Python float out; an array in gives an array out.
  """
  n_arr = np.asarray(n, dtype=np.float64)
  if not np.all(np.isfinite(n_arr)) or np.any(n_arr < 1):
    raise ValueError(f"kl_bon needs n >= 1, got {n!r}")
  kl = np.log(n_arr) - (n_arr - 1.0) / n_arr
  return float(kl) if kl.ndim == 0 else kl


def _check_n(N: Any, n: Any) -> tuple[int, int]:
  for name, value in (("N", N), ("n", n)):
    try:
      is_int = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
      is_int = False
    if not is_int:
      raise ValueError(f"{name} must be an integer, got {value!r}")
  N, n = int(N), int(n)
  if not 1 <= n <= N:
    raise ValueError(f"best-of-n needs 1 <= n <= N, got n={n}, N={N}")
  return N, n


def bon_weights(N: int, n: int) -> np.ndarray:
  """Probability that the i-th lowest of N proxy-sorted samples is the best of a random n-subset.

  Returns float64 weights_N (index 0 = lowest proxy score); entries below position n are 0 and the
  rest are C(i-1, n-1) / C(N, n) for i = n..N, which sum to 1 (hockey-stick identity). Computed as
  differences of log-gamma values because the binomials overflow float64 already at N ~ 1,100.
  """
  N, n = _check_n(N, n)
  i = np.arange(n, N + 1, dtype=np.float64)
  log_num = gammaln(i) - gammaln(n) - gammaln(i - n + 1)  # log C(i-1, n-1)
  log_den = gammaln(N + 1) - gammaln(n + 1) - gammaln(N - n + 1)  # log C(N, n)
  weights_N = np.zeros(N, dtype=np.float64)
  weights_N[n - 1 :] = np.exp(log_num - log_den)
  return weights_N


def geometric_ns(N: int, num: int) -> np.ndarray:
  """min(num, N) distinct integers from 1 to N inclusive, spaced as evenly as possible in log n.

  Plain rounding of a geometric grid collapses its low end (1, 1, 1, 2, 2, ...); here each point
  is pushed up to at least one above its predecessor, and down so the remaining points still fit
  below N, so asking for num points gives exactly num points. num > N is capped at N.
  """
  N, _ = _check_n(N, 1)
  if isinstance(num, bool) or int(num) != num or num < 1:
    raise ValueError(f"num must be a positive integer, got {num!r}")
  num = min(int(num), N)
  if num == 1:
    if N != 1:
      raise ValueError(f"a grid from 1 to N={N} needs num >= 2")
    return np.ones(1, dtype=np.int64)
  ideal = np.exp(np.linspace(0.0, np.log(N), num))
  ns = np.empty(num, dtype=np.int64)
  prev = 0
  for k, target in enumerate(ideal):
    ns[k] = min(max(int(round(target)), prev + 1), N - (num - 1 - k))
    prev = ns[k]
  return ns


@dataclasses.dataclass(frozen=True)
class BonCurve:
  """Best-of-n estimates for a grid of n; arrays have shape [..., len(ns)].

  Leading dimensions are those of a batch of proxies (none for the 2-D contract). `*_per_prompt`
  have shape [..., prompts, len(ns)] and are what a bootstrap over prompts resamples.
  Standard errors are over prompts (ddof=1); they are NaN with a single prompt.
  """

  ns: np.ndarray
  kl: np.ndarray
  proxy: np.ndarray
  proxy_se: np.ndarray
  gold: np.ndarray
  gold_se: np.ndarray
  proxy_per_prompt: np.ndarray
  gold_per_prompt: np.ndarray

  @property
  def d(self) -> np.ndarray:
    """Distance sqrt(KL) in sqrt-nats, the x-axis of every scaling-law fit."""
    return np.sqrt(self.kl)

  def records(self, **meta) -> list[dict]:
    """One plain dict per n (the results-jsonl / plotting format), with `meta` merged in."""
    if self.proxy.ndim != 1:
      raise ValueError(
        f"records() needs a single proxy's curve; this one has batch shape {self.proxy.shape[:-1]}"
      )
    return [
      dict(
        meta,
        n=int(n),
        kl=float(kl),
        proxy=float(p),
        proxy_se=float(pse),
        gold=float(g),
        gold_se=float(gse),
      )
      for n, kl, p, pse, g, gse in zip(
        self.ns, self.kl, self.proxy, self.proxy_se, self.gold, self.gold_se
      )
    ]


def _average_ties(sorted_proxy: np.ndarray, sorted_gold: np.ndarray) -> np.ndarray:
  """Replace each gold score by the mean gold of its run of equal proxy scores.

  Best-of-n with ties broken uniformly at random picks each member of a tied run equally often, so
  the tied golds enter the estimate only through their mean. Averaging makes the estimate exact for
  random tie-breaking and independent of the order samples arrived in, instead of silently
  favouring whichever sample a sort happened to put last.
  """
  rows, N = sorted_proxy.shape
  starts = np.ones((rows, N), dtype=bool)
  starts[:, 1:] = sorted_proxy[:, 1:] != sorted_proxy[:, :-1]
  if starts.all():
    return sorted_gold
  group = np.cumsum(starts, axis=1) - 1 + N * np.arange(rows)[:, None]  # unique ids across rows
  flat = group.ravel()
  sums = np.bincount(flat, weights=sorted_gold.ravel(), minlength=rows * N)
  counts = np.bincount(flat, minlength=rows * N)
  return (sums[flat] / counts[flat]).reshape(rows, N)


def unbiased_best_of_n(proxy_scores, gold_scores, ns) -> BonCurve:
  """Expected proxy and gold score of best-of-n, for each n in `ns`, without resampling noise.

  Args:
    proxy_scores: [prompts, N] proxy-RM scores of N samples per prompt from the initial policy.
      Several proxies scoring the same samples may be stacked in front: [..., prompts, N].
    gold_scores: [prompts, N] gold-RM scores of the same samples (broadcast against the proxies).
    ns: the n values, each in 1..N.

  Samples are ordered by proxy score ascending with a stable sort; samples whose proxy scores tie
  exactly contribute their mean gold (see `_average_ties`), so the result is a function of the
  (proxy, gold) pairs only, not of their order.
  """
  proxy = np.asarray(proxy_scores, dtype=np.float64)
  gold = np.asarray(gold_scores, dtype=np.float64)
  if proxy.ndim < 2:
    raise ValueError(f"proxy_scores must be [prompts, N] (or [..., prompts, N]), got {proxy.shape}")
  if gold.ndim != 2:
    raise ValueError(f"gold_scores must be [prompts, N], got shape {gold.shape}")
  if proxy.shape[-2:] != gold.shape:
    raise ValueError(
      f"proxy_scores {proxy.shape} and gold_scores {gold.shape} disagree on [prompts, N]"
    )
  prompts, N = gold.shape
  if prompts == 0 or N == 0:
    raise ValueError(f"need at least one prompt and one sample, got [prompts, N] = {gold.shape}")
  if not (np.all(np.isfinite(proxy)) and np.all(np.isfinite(gold))):
    raise ValueError("scores must be finite (found NaN or inf)")
  ns_K = np.asarray(ns)
  if ns_K.ndim != 1 or ns_K.size == 0:
    raise ValueError(f"ns must be a non-empty 1-D sequence, got {ns!r}")
  weights_KxN = np.stack([bon_weights(N, n) for n in ns_K.tolist()])
  ns_K = ns_K.astype(np.int64)

  batch = proxy.shape[:-2]
  gold = np.broadcast_to(gold, proxy.shape)
  order = np.argsort(proxy, axis=-1, kind="stable")
  sorted_proxy = np.take_along_axis(proxy, order, axis=-1).reshape(-1, N)
  sorted_gold = np.take_along_axis(gold, order, axis=-1).reshape(-1, N)
  sorted_gold = _average_ties(sorted_proxy, sorted_gold)

  proxy_per_prompt = (sorted_proxy @ weights_KxN.T).reshape(*batch, prompts, ns_K.size)
  gold_per_prompt = (sorted_gold @ weights_KxN.T).reshape(*batch, prompts, ns_K.size)
  proxy_mean, proxy_se = curves.mean_and_se(proxy_per_prompt, axis=-2)  # Over prompts.
  gold_mean, gold_se = curves.mean_and_se(gold_per_prompt, axis=-2)
  return BonCurve(
    ns=ns_K,
    kl=np.asarray(kl_bon(ns_K), dtype=np.float64).reshape(ns_K.shape),
    proxy=proxy_mean,
    proxy_se=proxy_se,
    gold=gold_mean,
    gold_se=gold_se,
    proxy_per_prompt=proxy_per_prompt,
    gold_per_prompt=gold_per_prompt,
  )


def recentre(scores, reference, *, shift_only: bool = False) -> np.ndarray:
  """Express scores relative to the initial policy: (scores - mean(ref)) / std(ref).

  `reference` holds scores of samples from the initial policy under the same RM, so afterwards the
  initial policy scores 0 and (unless `shift_only`) has unit variance. The paper scales gold scores
  this way and only shifts proxy scores, so proxy and gold curves share an origin but the proxy
  keeps its own units. Statistics are over all elements of `reference`; std uses ddof=0 so the
  recentred reference has exactly unit variance.
  """
  scores = np.asarray(scores, dtype=np.float64)
  ref = np.asarray(reference, dtype=np.float64)
  if ref.size == 0:
    raise ValueError("reference scores are empty")
  if not np.all(np.isfinite(ref)):
    raise ValueError("reference scores must be finite (found NaN or inf)")
  shifted = scores - ref.mean()
  if shift_only:
    return shifted
  std = ref.std()
  if not std > 0:
    raise ValueError(
      "reference scores have zero variance; cannot scale to unit variance (use shift_only=True)"
    )
  return shifted / std
