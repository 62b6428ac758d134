"""Fitting the scaling laws: gold score vs distance from the initial policy, and how the fitted
coefficients move with reward-model size.

With d = sqrt(KL(pi || pi_init)) in sqrt-nats (Gao, Schulman & Hilton 2023):
  best-of-n:  R(d) = d (alpha - beta d)
  RL:         R(d) = d (alpha - beta log d),  R(0) := 0.
Both are linear in (alpha, beta), so they are fitted by (weighted) least squares in closed form:
no starting point, no local minima, and standard errors come from the usual covariance.
Uncertainty that the residuals cannot see (prompt-to-prompt or seed-to-seed variation) comes
from `bootstrap_fit`, which resamples those units.

`fit_multiplicative_law` fits Zhang et al. (2024)'s L = A X^-alpha D^-beta + E, which is not
linear and is fitted the Chinchilla way (Huber loss on log L, quasi-Newton from a grid of starts).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable

import numpy as np
from scipy import optimize
from scipy.special import expit, huber, xlogy

FORMS = ("bon", "rl")
_INF = float("inf")


class FitError(ValueError):
  """A curve these forms cannot be fitted to (too few distinct points, a singular design)."""


def _check_form(form: str) -> str:
  if form not in FORMS:
    raise ValueError(f"unknown functional form {form!r}; expected one of {FORMS}")
  return form


def _as_distance(d) -> np.ndarray:
  d = np.asarray(d, dtype=np.float64)
  if not np.all(np.isfinite(d)) or np.any(d < 0):
    raise ValueError("d = sqrt(KL) must be finite and >= 0")
  return d


def _design(form: str, d: np.ndarray) -> np.ndarray:
  """Columns multiplying (alpha, beta); d log d is taken as 0 at d = 0 (its limit)."""
  if form == "bon":
    return np.stack([d, -d * d], axis=-1)
  return np.stack([d, -xlogy(d, d)], axis=-1)


def predict(form: str, alpha: float, beta: float, d) -> np.ndarray:
  """R(d) of the given form; d >= 0 (the RL form is defined as 0 at d = 0)."""
  _check_form(form)
  d = _as_distance(d)
  return _design(form, d) @ np.array([alpha, beta], dtype=np.float64)


def peak(form: str, alpha: float, beta: float) -> tuple[float, float]:
  """(d*, R*) maximising R(d) over d >= 0.

  BoN: d* = alpha / (2 beta), R* = alpha^2 / (4 beta).
  RL:  R'(d) = alpha - beta (log d + 1) = 0 gives d* = exp(alpha / beta - 1), and then
       R* = d* (alpha - (alpha - beta)) = beta d*.
  Degenerate cases, chosen so the answer is still the supremum over d >= 0:
  - beta < 0, or beta == 0 with alpha > 0: R grows without bound, so (inf, inf): the proxy is not
    (yet) over-optimised within this law;
  - BoN with alpha <= 0 < beta, or beta == 0 with alpha <= 0: R <= 0 everywhere, max at the origin,
    so (0.0, 0.0);
  - RL with beta > 0 always has an interior peak (R ~ -beta d log d > 0 near 0); d* may overflow to
    inf when alpha / beta is huge, and then R* is inf too.
  """
  _check_form(form)
  alpha, beta = float(alpha), float(beta)
  if beta < 0 or (beta == 0 and alpha > 0):
    return _INF, _INF
  if beta == 0:
    return 0.0, 0.0
  if form == "bon":
    if alpha <= 0:
      return 0.0, 0.0
    return alpha / (2 * beta), alpha * alpha / (4 * beta)
  with np.errstate(over="ignore"):
    d_star = float(np.exp(alpha / beta - 1.0))
  return d_star, beta * d_star


@dataclasses.dataclass(frozen=True)
class Fit:
  """A fitted R(d); `*_se` are standard errors of the coefficients (NaN with no residual dof).

  r2 and rmse are on the unweighted residuals of the fitted points (r2 against their mean).
  """

  form: str
  alpha: float
  beta: float
  alpha_se: float
  beta_se: float
  r2: float
  rmse: float
  n_points: int

  def predict(self, d) -> np.ndarray:
    return predict(self.form, self.alpha, self.beta, d)

  def peak(self) -> tuple[float, float]:
    """(d*, R*); see `peak` for the no-peak conventions (inf, or 0 at the origin)."""
    return peak(self.form, self.alpha, self.beta)

  def to_dict(self) -> dict:
    d_star, r_star = self.peak()
    return dict(dataclasses.asdict(self), d_star=d_star, r_star=r_star)


def _validate_curve(d, r, sigma):
  d = _as_distance(d)
  r = np.asarray(r, dtype=np.float64)
  if d.ndim != 1 or d.shape != r.shape:
    raise ValueError(f"d and r must be 1-D and the same length, got {d.shape} and {r.shape}")
  if not np.all(np.isfinite(r)):
    raise ValueError("r must be finite (found NaN or inf)")
  if sigma is not None:
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), d.shape)
    if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
      raise ValueError("sigma must be finite and > 0 for every point")
  if np.count_nonzero(np.unique(d)) < 2:
    raise FitError(
      f"need at least two distinct d > 0 to fit two coefficients (got d = {d.tolist()})"
    )
  return d, r, sigma


def fit_curve(form: str, d, r, *, sigma=None, absolute_sigma: bool = False) -> Fit:
  """Least-squares fit of R(d) = alpha * f1(d) - beta * f2(d) of the given form.

  Args:
    form: 'bon' or 'rl'.
    d: [points] sqrt(KL) values, >= 0. Points at d = 0 are kept: both forms pass through the
      origin, so they do not move the coefficients but do count in r2 / rmse (a recentred curve
      has R(0) = 0 there).
    r: [points] gold (or proxy) scores.
    sigma: optional per-point standard errors; points are weighted by 1 / sigma^2.
    absolute_sigma: if True, sigma are true standard errors and the coefficient covariance is
      (X^T W X)^-1; otherwise (the scipy.optimize.curve_fit default) it is rescaled by the reduced
      chi-square, so only the relative sizes of sigma matter.
  """
  _check_form(form)
  d, r, sigma = _validate_curve(d, r, sigma)
  X = _design(form, d)
  sqrt_w = np.ones_like(d) if sigma is None else 1.0 / sigma
  Xw, rw = X * sqrt_w[:, None], r * sqrt_w
  coef, _, rank, _ = np.linalg.lstsq(Xw, rw, rcond=None)
  if rank < 2:
    raise FitError(f"the {form} design is rank-deficient for d = {d.tolist()}")
  cov = np.linalg.inv(Xw.T @ Xw)
  dof = d.size - 2
  if not absolute_sigma:
    cov = cov * (np.sum((rw - Xw @ coef) ** 2) / dof) if dof > 0 else np.full_like(cov, np.nan)
  resid = r - X @ coef
  rss = float(np.sum(resid**2))
  tss = float(np.sum((r - r.mean()) ** 2))
  return Fit(
    form=form,
    alpha=float(coef[0]),
    beta=float(coef[1]),
    alpha_se=float(np.sqrt(cov[0, 0])),
    beta_se=float(np.sqrt(cov[1, 1])),
    r2=1.0 - rss / tss if tss > 0 else float("nan"),
    rmse=float(np.sqrt(rss / d.size)),
    n_points=int(d.size),
  )


def fit_bon(d, r, **kwargs) -> Fit:
  """Fit R = d (alpha - beta d); see `fit_curve` for the options."""
  return fit_curve("bon", d, r, **kwargs)


def fit_rl(d, r, **kwargs) -> Fit:
  """Fit R = d (alpha - beta log d) with R(0) = 0; see `fit_curve` for the options."""
  return fit_curve("rl", d, r, **kwargs)


@dataclasses.dataclass(frozen=True)
class BootstrapFit:
  """Point fit on the unit-averaged curve plus percentile intervals from resampled units.

  `samples[name]` holds one value per bootstrap replicate for name in alpha, beta, d_star, r_star;
  `intervals[name]` is (lo, hi) at the given `level`. Peak samples may be inf (no peak in that
  replicate), and intervals then take inf as a value rather than NaN; `peak_fraction` is the share
  of replicates with a finite peak.
  """

  fit: Fit
  level: float
  samples: dict[str, np.ndarray]
  intervals: dict[str, tuple[float, float]]
  peak_fraction: float


def bootstrap_fit(
  form: str, d, r_per_unit, num_boot: int, rng: np.random.Generator, *, level: float = 0.95
) -> BootstrapFit:
  """Uncertainty of the fitted law from variation between units (prompts, or RM / RL seeds).

  Each replicate draws `units` rows with replacement, averages them into one curve and refits.
  Percentile intervals use the order statistics just outside the nominal quantiles (no
  interpolation), which keeps them conservative and well defined when some replicates are inf.

  Args:
    form: 'bon' or 'rl'.
    d: [points] shared sqrt(KL) grid (BoN: analytic), or [units, points] when each unit has its
      own (RL seeds), in which case d is resampled and averaged with r.
    r_per_unit: [units, points] scores.
    num_boot: number of replicates.
    rng: numpy Generator, threaded explicitly so the intervals are reproducible.
    level: two-sided interval level, e.g. 0.95.
  """
  _check_form(form)
  r_UxP = np.asarray(r_per_unit, dtype=np.float64)
  if r_UxP.ndim != 2 or r_UxP.shape[0] < 2:
    raise ValueError(f"r_per_unit must be [units >= 2, points], got shape {r_UxP.shape}")
  d_arr = _as_distance(d)
  if d_arr.shape not in (r_UxP.shape[1:], r_UxP.shape):
    raise ValueError(
      f"d must be [points] or [units, points] matching r_per_unit {r_UxP.shape}, got {d_arr.shape}"
    )
  d_UxP = np.broadcast_to(d_arr, r_UxP.shape)
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
  if isinstance(num_boot, bool) or int(num_boot) != num_boot or num_boot < 1:
    raise ValueError(f"num_boot must be a positive integer, got {num_boot!r}")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")

  point = fit_curve(form, d_UxP.mean(0), r_UxP.mean(0))
  units = r_UxP.shape[0]
  idx_BxU = rng.integers(0, units, size=(int(num_boot), units))
  names = ("alpha", "beta", "d_star", "r_star")
  samples = {k: np.empty(int(num_boot)) for k in names}
  for b, idx in enumerate(idx_BxU):
    f = fit_curve(form, d_UxP[idx].mean(0), r_UxP[idx].mean(0))
    samples["alpha"][b], samples["beta"][b] = f.alpha, f.beta
    samples["d_star"][b], samples["r_star"][b] = f.peak()
  tail = (1.0 - level) / 2
  intervals = {
    k: (
      float(np.quantile(v, tail, method="lower")),
      float(np.quantile(v, 1.0 - tail, method="higher")),
    )
    for k, v in samples.items()
  }
  return BootstrapFit(
    fit=point,
    level=level,
    samples=samples,
    intervals=intervals,
    peak_fraction=float(np.mean(np.isfinite(samples["d_star"]))),
  )


@dataclasses.dataclass(frozen=True)
class Trend:
  """coeff ~ intercept + slope * ln(size); slope is per e-fold of parameters."""

  slope: float
  intercept: float
  slope_se: float
  r2: float
  n_points: int

  def predict(self, size) -> np.ndarray:
    size = np.asarray(size, dtype=np.float64)
    if np.any(size <= 0):
      raise ValueError("size must be > 0")
    return self.intercept + self.slope * np.log(size)


def coefficient_trend(sizes, coeffs) -> Trend:
  """Least-squares line of a fitted coefficient against log(RM parameters).

  The paper finds the coefficients roughly linear in log size (alpha_bon up, beta down); the
  slope's sign and SE say whether a sweep reproduces that.
  """
  x = np.asarray(sizes, dtype=np.float64)
  y = np.asarray(coeffs, dtype=np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"sizes and coeffs must be 1-D and the same length, got {x.shape}, {y.shape}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(x <= 0):
    raise ValueError("sizes must be finite and > 0, coeffs finite")
  if np.unique(x).size < 2:
    raise ValueError("need at least two distinct sizes to fit a trend")
  lx = np.log(x)
  X = np.stack([np.ones_like(lx), lx], axis=-1)
  coef, _, _, _ = np.linalg.lstsq(X, y, rcond=None)
  resid = y - X @ coef
  rss = float(np.sum(resid**2))
  tss = float(np.sum((y - y.mean()) ** 2))
  dof = x.size - 2
  slope_se = float(np.sqrt(rss / dof / np.sum((lx - lx.mean()) ** 2))) if dof > 0 else float("nan")
  return Trend(
    slope=float(coef[1]),
    intercept=float(coef[0]),
    slope_se=slope_se,
    r2=1.0 - rss / tss if tss > 0 else float("nan"),
    n_points=int(x.size),
  )


@dataclasses.dataclass(frozen=True)
class MultiplicativeFit:
  """L(X, D) = A X^-alpha D^-beta + E (Zhang et al. 2024), in the caller's units of X, D and L."""

  A: float
  alpha: float
  beta: float
  E: float
  loss: float  # Mean Huber loss (in units of delta^2) at the optimum.
  n_points: int

  def predict(self, X, D) -> np.ndarray:
    X, D = np.asarray(X, dtype=np.float64), np.asarray(D, dtype=np.float64)
    return self.A * X**-self.alpha * D**-self.beta + self.E

  def heldout_error(self, X, D, L) -> dict[str, float]:
    """Extrapolation error on points not used in the fit (Zhang et al. hold out the largest model).

    Returns rmse_log (RMS of log L - log L_hat) and mean_abs_rel_err (mean |L_hat / L - 1|).
    """
    X, D, L = _check_law_data(X, D, L)
    pred = self.predict(X, D)
    return dict(
      rmse_log=float(np.sqrt(np.mean((np.log(L) - np.log(pred)) ** 2))),
      mean_abs_rel_err=float(np.mean(np.abs(pred / L - 1.0))),
    )


def _check_law_data(X, D, L):
  arrays = [np.asarray(v, dtype=np.float64).ravel() for v in (X, D, L)]
  if not arrays[0].size or len({a.size for a in arrays}) != 1:
    raise ValueError(
      f"X, D, L must be non-empty and equally long, got sizes {[a.size for a in arrays]}"
    )
  for name, a in zip("XDL", arrays):
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
      raise ValueError(f"{name} must be finite and > 0")
  return arrays


def fit_multiplicative_law(
  X,
  D,
  L,
  *,
  huber_delta: float = 1e-3,
  starts: Iterable[tuple[float, float, float, float]] | None = None,
  num_refine: int | None = 8,
  method: str = "BFGS",
) -> MultiplicativeFit:
  """Fit L = A X^-alpha D^-beta + E by Huber loss on log L, (L-)BFGS from a grid of starts.

  The Huber loss on log values (delta = 1e-3, as in Chinchilla and Zhang et al.) keeps a few bad
  runs from steering the exponents. Internally X and D are divided by their geometric means, so
  that log A lives near log L instead of near alpha * log(1e9); A is reported in the caller's
  units. Chinchilla runs L-BFGS from every grid point; here the objective is first evaluated on
  the whole grid at once and only the `num_refine` best points are refined, which finds the
  same optimum on well-posed data at a fraction of the cost (num_refine=None refines them all).

  Args:
    X: model size (or pretraining tokens, or PET parameters), > 0.
    D: finetuning examples, > 0.
    L: loss or perplexity, > 0.
    huber_delta: transition of the Huber loss, in units of log L.
    starts: optional (A, alpha, beta, E) starting points in the caller's units; by default a
      4^4 grid scaled to the data (E below min L, A' around the typical reducible loss).
    num_refine: how many of the best starting points the minimiser refines.
    method: the scipy quasi-Newton minimiser, "BFGS" (default) or "L-BFGS-B". With four
      parameters limited memory buys nothing, and scipy's L-BFGS-B calls threaded OpenBLAS
      LAPACK routines every iteration, which on an oversubscribed CPU made the fit ~15x slower
      (1.4 s vs 0.08 s measured) for the same optimum.
  """
  X, D, L = _check_law_data(X, D, L)
  if X.size < 4:
    raise ValueError(f"need at least 4 points to fit 4 parameters, got {X.size}")
  if not huber_delta > 0:
    raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
  if num_refine is not None and (
    isinstance(num_refine, bool) or int(num_refine) != num_refine or num_refine < 1
  ):
    raise ValueError(f"num_refine must be a positive integer or None, got {num_refine!r}")
  options = {
    "BFGS": dict(maxiter=2000, gtol=1e-10),
    "L-BFGS-B": dict(maxiter=2000, ftol=1e-14, gtol=1e-10),
  }.get(method)
  if options is None:
    raise ValueError(f"method must be 'BFGS' or 'L-BFGS-B', got {method!r}")
  log_x0, log_d0 = np.log(X).mean(), np.log(D).mean()
  x, y, log_L = np.log(X) - log_x0, np.log(D) - log_d0, np.log(L)
  scale = 1.0 / (huber_delta**2 * X.size)  # Objective O(1): tolerances bite.

  def loss_and_parts(theta_Gx4):
    a, alpha, beta, e = (theta_Gx4[..., k, None] for k in range(4))
    t = a - alpha * x - beta * y
    resid = log_L - np.logaddexp(t, e)
    return np.sum(huber(huber_delta, resid), axis=-1) * scale, t, e, resid

  def objective(theta):
    loss, t, e, resid = loss_and_parts(theta)
    s = expit(t - e)  # d log_pred / d t
    dres = -np.clip(resid, -huber_delta, huber_delta) * scale  # d loss / d log_pred
    grad = np.array(
      [np.sum(dres * s), -np.sum(dres * s * x), -np.sum(dres * s * y), np.sum(dres * (1.0 - s))]
    )
    return float(loss), grad

  if starts is None:
    log_min, log_med = np.log(L.min()), np.log(np.median(L))
    exponents = (0.05, 0.2, 0.5, 1.0)
    grid_Gx4 = np.array(
      list(
        itertools.product(
          log_med + np.array([-4.0, -2.5, -1.0, 0.0]),
          exponents,
          exponents,
          log_min + np.array([-3.0, -1.0, -0.3, -0.05]),
        )
      )
    )
  else:
    rows = []
    for A0, alpha0, beta0, E0 in starts:
      if A0 <= 0 or E0 <= 0:
        raise ValueError(f"starting A and E must be > 0, got A={A0}, E={E0}")
      rows.append((np.log(A0) - alpha0 * log_x0 - beta0 * log_d0, alpha0, beta0, np.log(E0)))
    if not rows:
      raise ValueError("starts is empty")
    grid_Gx4 = np.array(rows, dtype=np.float64)
  grid_loss = loss_and_parts(grid_Gx4)[0]
  order = np.argsort(np.where(np.isfinite(grid_loss), grid_loss, np.inf), kind="stable")
  grid_Gx4 = grid_Gx4[order[:num_refine]]
  best = None
  for theta0 in grid_Gx4:
    res = optimize.minimize(objective, theta0, jac=True, method=method, options=options)
    if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
      best = res
  if best is None:
    raise ValueError("every starting point diverged; check the data or pass `starts`")
  a, alpha, beta, e = best.x
  return MultiplicativeFit(
    A=float(np.exp(a + alpha * log_x0 + beta * log_d0)),
    alpha=float(alpha),
    beta=float(beta),
    E=float(np.exp(e)),
    loss=float(best.fun),
    n_points=int(X.size),
  )
