"""Analysis on top of the fits: prediction bands, and extrapolating the laws to a larger reward model.

`rmscale.scaling.fit` fits one curve (with bootstrap intervals on its coefficients) and a trend of a
coefficient in log RM size. This module answers the questions a reader of a sweep asks next:

- how uncertain is the fitted *curve* at each distance d = sqrt(KL)? (`fit_with_band`: percentile
  bands of the bootstrap replicates' predictions, paired alpha and beta per replicate);
- given proxies of a few sizes, what law does the trend predict for a larger one, and how well does
  that prediction describe the larger proxy's measured curve? (`extrapolate`: the trend is fitted on
  every size but the largest, which is held out and compared).

Everything is plain numpy over the result records of ``results/*.jsonl``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np

from rmscale.scaling import fit as fit_lib

META = ("rm_size", "rm_params", "data_size", "seed", "run", "proxy_name", "kl_coef")


@dataclasses.dataclass(frozen=True)
class Curve:
  """One optimisation curve (a method against one proxy), its points in increasing KL.

  `gold_per_prompt` is [prompts, points] (the bootstrap's resampling units) in the same order as
  `d`, or None when the per-prompt scores were not kept.
  """

  method: str
  name: str
  meta: dict
  d: np.ndarray
  gold: np.ndarray
  gold_se: np.ndarray
  proxy: np.ndarray
  gold_per_prompt: np.ndarray | None = None
  form: str = ""  # The functional form fitted to it; default: the method's name if it is a form.

  def __post_init__(self):
    if not self.form:
      object.__setattr__(self, "form", _form_of({"method": self.method}))


def _form_of(rec: Mapping) -> str:
  """A record's or fit row's functional form: its ``form``, else its method if that names a form."""
  form = rec.get("form") or rec.get("method")
  if form not in fit_lib.FORMS:
    raise ValueError(f"{rec.get('method')!r} records carry no functional form in {fit_lib.FORMS}")
  return form


def curves(
  records: Sequence[Mapping], per_prompt: Mapping[tuple[str, str], np.ndarray] | None = None
) -> list[Curve]:
  """Groups result records by (method, name) into curves sorted by KL.

  `per_prompt[(method, name)]` is [prompts, points] with points in the records' KL order (as the
  fit stage and `rmscale.report.load_results` store them); a shape that does not match the curve
  raises, since pairing per-prompt scores with the wrong points would silently bias the bands.
  """
  groups = defaultdict(list)
  for r in records:
    for key in ("method", "name", "kl", "gold"):
      if r.get(key) is None:
        raise ValueError(f"result record lacks {key!r}: {dict(r)}")
    groups[(r["method"], r["name"])].append(r)
  out = []
  for (method, name), recs in sorted(groups.items()):
    recs = sorted(recs, key=lambda r: r["kl"])
    units = None if per_prompt is None else per_prompt.get((method, name))
    if units is not None:
      units = np.asarray(units, dtype=np.float64)
      if units.ndim != 2 or units.shape[1] != len(recs):
        raise ValueError(
          f"per-prompt scores of {method}/{name} have shape {units.shape}; the curve has "
          f"{len(recs)} points"
        )
    out.append(
      Curve(
        method=method,
        name=name,
        meta={k: recs[0][k] for k in META if k in recs[0]},
        d=np.sqrt(np.maximum([r["kl"] for r in recs], 0.0)),
        gold=np.array([r["gold"] for r in recs], dtype=np.float64),
        gold_se=np.array([r.get("gold_se", np.nan) for r in recs], dtype=np.float64),
        proxy=np.array([r.get("proxy", np.nan) for r in recs], dtype=np.float64),
        gold_per_prompt=units,
        form=_form_of(recs[0]),
      )
    )
  return out


def prediction_band(
  form: str, alpha_B, beta_B, d_G, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
  """Pointwise percentile band of R(d) over paired coefficient samples (one (alpha, beta) per replicate).

  Pairs are kept together: alpha and beta of a fit are strongly correlated, and banding them
  independently would widen the band far beyond what the data allow. Same order-statistic rule as
  `fit.bootstrap_fit` (no interpolation), so a band from replicates is exactly their envelope at
  level -> 1.
  """
  alpha_B, beta_B = np.asarray(alpha_B, np.float64), np.asarray(beta_B, np.float64)
  if alpha_B.ndim != 1 or alpha_B.shape != beta_B.shape or alpha_B.size == 0:
    raise ValueError(
      f"alpha and beta samples must be 1-D, paired and non-empty, got {alpha_B.shape}, "
      f"{beta_B.shape}"
    )
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  d_G = np.asarray(d_G, np.float64)
  pred_BxG = np.stack([fit_lib.predict(form, a, b, d_G) for a, b in zip(alpha_B, beta_B)])
  tail = (1.0 - level) / 2
  return (
    np.quantile(pred_BxG, tail, axis=0, method="lower"),
    np.quantile(pred_BxG, 1.0 - tail, axis=0, method="higher"),
  )


@dataclasses.dataclass(frozen=True)
class FittedCurve:
  """A curve, its fitted law and (with per-prompt scores) a bootstrap band on a grid of d."""

  curve: Curve
  fit: fit_lib.Fit
  d_grid: np.ndarray
  centre: np.ndarray
  lo: np.ndarray | None
  hi: np.ndarray | None
  boot: fit_lib.BootstrapFit | None
  level: float

  def row(self) -> dict:
    """A fits.jsonl-style row: method, identifying keys, coefficients, peak, bootstrap intervals."""
    row = {
      "method": self.curve.method,
      "name": self.curve.name,
      **self.curve.meta,
      **self.fit.to_dict(),
    }
    if self.boot is not None:
      for coef, (lo, hi) in self.boot.intervals.items():
        row[f"{coef}_lo"], row[f"{coef}_hi"] = lo, hi
    return row


def fit_with_band(
  curve: Curve, num_boot: int, rng: np.random.Generator, *, level: float = 0.95, num_grid: int = 100
) -> FittedCurve:
  """Fits the curve's law (BoN or RL form by its method) and, if it has per-prompt scores, a band.

  The point fit is on the curve's mean scores (as the fit stage does); the band comes from
  `fit.bootstrap_fit` over prompts, evaluated on `num_grid` points from 0 to the curve's largest d.
  """
  form = curve.form
  f = fit_lib.fit_curve(form, curve.d, curve.gold)
  d_grid = np.linspace(0.0, float(curve.d.max()), num_grid)
  boot = lo = hi = None
  if curve.gold_per_prompt is not None and num_boot:
    boot = fit_lib.bootstrap_fit(form, curve.d, curve.gold_per_prompt, num_boot, rng, level=level)
    lo, hi = prediction_band(form, boot.samples["alpha"], boot.samples["beta"], d_grid, level)
  return FittedCurve(
    curve=curve,
    fit=f,
    d_grid=d_grid,
    centre=f.predict(d_grid),
    lo=lo,
    hi=hi,
    boot=boot,
    level=level,
  )


def trend_prediction(sizes, coeffs, size: float) -> tuple[float, float]:
  """The log-size trend's value at `size` and its standard error.

  SE of a least-squares line's mean prediction: s sqrt(1/n + (x0 - xbar)^2 / Sxx) with x = ln size
  and s^2 = RSS / (n - 2); NaN when there is no residual degree of freedom (two sizes).
  """
  t = fit_lib.coefficient_trend(sizes, coeffs)
  x = np.log(np.asarray(sizes, np.float64))
  y = np.asarray(coeffs, np.float64)
  x0 = float(np.log(size))
  pred = float(t.predict(size))
  dof = x.size - 2
  if dof <= 0:
    return pred, float("nan")
  s2 = float(np.sum((y - (t.intercept + t.slope * x)) ** 2)) / dof
  sxx = float(np.sum((x - x.mean()) ** 2))
  return pred, float(np.sqrt(s2 * (1.0 / x.size + (x0 - x.mean()) ** 2 / sxx)))


@dataclasses.dataclass(frozen=True)
class Extrapolation:
  """The law predicted for a held-out (largest) RM from the trend of smaller ones, and its actual fit.

  `rmse_predicted` is the RMS error of the predicted law on the held-out curves' measured gold
  scores, `rmse_fitted` that of their own fitted law: the first can only be larger, and how much
  larger says how far the trend carries.
  """

  method: str
  form: str  # The functional form of the method's curves.
  data_size: int | None
  heldout_params: int
  train_params: tuple[int, ...]
  predicted: dict  # alpha, beta, alpha_se, beta_se, d_star, r_star
  actual: dict  # alpha, beta, d_star, r_star (mean over held-out rows, e.g. seeds)
  rmse_predicted: float
  rmse_fitted: float
  heldout_names: tuple[str, ...]

  def table(self) -> list[dict]:
    """Rows (quantity, predicted, actual) for display."""
    return [
      {"quantity": k, "predicted": self.predicted[k], "actual": self.actual[k]}
      for k in ("alpha", "beta", "d_star", "r_star")
    ] + [
      {
        "quantity": "gold RMSE on held-out points",
        "predicted": self.rmse_predicted,
        "actual": self.rmse_fitted,
      }
    ]


def extrapolate(
  rows: Sequence[Mapping], curves_: Sequence[Curve], method: str, data_size: int | None = None
) -> Extrapolation:
  """Fits alpha and beta against log RM size on all but the largest size, predicts the largest.

  Args:
    rows: fit rows (fits.jsonl or `FittedCurve.row()`): method, name, rm_params, data_size, alpha, beta.
    curves_: the measured curves, to score the predicted law on the held-out proxy's points.
    method: the method whose curves to extrapolate (its rows carry the form, or name one).
    data_size: restrict to proxies trained on this many comparisons (None: every row of the method,
      which only makes sense when the sweep has one data size).
  """
  rows = [
    r for r in rows if r["method"] == method and (data_size is None or r["data_size"] == data_size)
  ]
  if not rows:
    raise ValueError(f"no {method} fits" + (f" at {data_size:,} comparisons" if data_size else ""))
  if data_size is None and len({r["data_size"] for r in rows}) > 1:
    raise ValueError(
      f"{method} fits span data sizes {sorted({r['data_size'] for r in rows})}; pass data_size"
    )
  sizes = sorted({int(r["rm_params"]) for r in rows})
  if len(sizes) < 3:
    raise ValueError(
      f"extrapolating {method} needs fits at >= 3 RM sizes (2 for the trend, 1 held out); "
      f"got {len(sizes)}: {sizes}"
    )
  held = sizes[-1]
  train = [r for r in rows if r["rm_params"] < held]
  test = [r for r in rows if r["rm_params"] == held]
  predicted = {}
  for coef in ("alpha", "beta"):
    predicted[coef], predicted[f"{coef}_se"] = trend_prediction(
      [r["rm_params"] for r in train], [r[coef] for r in train], held
    )
  form = _form_of(rows[0])
  predicted["d_star"], predicted["r_star"] = fit_lib.peak(
    form, predicted["alpha"], predicted["beta"]
  )
  actual = {c: float(np.mean([r[c] for r in test])) for c in ("alpha", "beta")}
  actual["d_star"], actual["r_star"] = fit_lib.peak(form, actual["alpha"], actual["beta"])
  names = {r["name"] for r in test}
  held_curves = [c for c in curves_ if c.method == method and c.name in names]
  if len(held_curves) != len(names):
    raise ValueError(
      f"no measured {method} curve for held-out fits {sorted(names - {c.name for c in held_curves})}"
    )
  by_name = {r["name"]: r for r in test}
  err_pred, err_fit = [], []
  for c in held_curves:
    err_pred.append(c.gold - fit_lib.predict(form, predicted["alpha"], predicted["beta"], c.d))
    err_fit.append(
      c.gold - fit_lib.predict(form, by_name[c.name]["alpha"], by_name[c.name]["beta"], c.d)
    )
  rms = lambda e: float(np.sqrt(np.mean(np.concatenate(e) ** 2)))  # noqa: E731
  return Extrapolation(
    method=method,
    form=form,
    data_size=data_size,
    heldout_params=held,
    train_params=tuple(sizes[:-1]),
    predicted=predicted,
    actual=actual,
    rmse_predicted=rms(err_pred),
    rmse_fitted=rms(err_fit),
    heldout_names=tuple(sorted(names)),
  )


def fit_all(
  curves_: Sequence[Curve], num_boot: int, rng: np.random.Generator, *, level: float = 0.95
) -> list[FittedCurve]:
  """`fit_with_band` for every curve, drawing the bootstraps from one explicitly threaded generator."""
  return [fit_with_band(c, num_boot, rng, level=level) for c in curves_]


def extrapolate_all(
  rows: Sequence[Mapping], curves_: Sequence[Curve]
) -> tuple[list[Extrapolation], list[str]]:
  """`extrapolate` for every (method, data size) with fits at >= 3 RM sizes; for the others, why not."""
  groups = defaultdict(set)
  for r in rows:
    groups[(r["method"], r["data_size"])].add(int(r["rm_params"]))
  done, skipped = [], []
  for (method, data_size), sizes in sorted(groups.items()):
    if len(sizes) < 3:
      skipped.append(
        f"{method}, {data_size:,} comparisons: proxies of {len(sizes)} size(s) "
        f"({', '.join(f'{s:,}' for s in sorted(sizes))}); extrapolation needs >= 3 "
        "(2 to fit the trend, 1 held out)"
      )
      continue
    done.append(extrapolate(rows, curves_, method, data_size))
  return done, skipped
