"""Scaling-law fits: planted-coefficient recovery, parity with scipy, peaks, bootstrap coverage."""

import math

import numpy as np
import pytest
from scipy import optimize

from rmscale import bon
from rmscale.scaling import fit

# Third-party readings of Gao et al. Fig. 3 (algorithms.md section 1).
RM_PARAMS = np.array([3e6, 12e6, 25e6, 42e6, 85e6, 300e6, 680e6, 1.2e9, 3e9])
ALPHA_BON = np.array([0.490, 0.513, 0.558, 0.548, 0.599, 0.633, 0.649, 0.653, 0.662])
BETA_BON = np.array([0.120, 0.120, 0.115, 0.111, 0.106, 0.0995, 0.098, 0.0965, 0.090])
BETA_RL = np.array([0.175, 0.167, 0.152, 0.146, 0.137, 0.124, 0.119, 0.122, 0.118])

D_BON = np.sqrt(bon.kl_bon(bon.geometric_ns(1000, 20)))  # n <= 1000, as the paper fitted.
D_RL = np.linspace(0.0, 10.0, 41)  # RL runs reach ~100 nats.


@pytest.mark.parametrize("form,d,alpha,beta", [("bon", D_BON, 0.6, 0.1), ("rl", D_RL, 0.5, 0.15)])
def test_recovers_planted_coefficients_from_noisy_curve(form, d, alpha, beta):
  rng = np.random.default_rng(0)
  r = fit.predict(form, alpha, beta, d) + 0.01 * rng.normal(size=d.shape)
  f = fit.fit_curve(form, d, r)
  assert f.form == form and f.n_points == d.size
  assert abs(f.alpha - alpha) < 0.02 and abs(f.beta - beta) < 0.01
  assert abs(f.alpha - alpha) < 4 * f.alpha_se and abs(f.beta - beta) < 4 * f.beta_se
  assert f.r2 > 0.99 and 0.005 < f.rmse < 0.015


def test_recovers_published_table_exactly_without_noise():
  for a, b, b_rl in zip(ALPHA_BON, BETA_BON, BETA_RL):
    f = fit.fit_bon(D_BON, D_BON * (a - b * D_BON))
    assert (f.alpha, f.beta) == (pytest.approx(a, abs=1e-10), pytest.approx(b, abs=1e-10))
    assert f.rmse < 1e-12 and f.r2 == pytest.approx(1.0)
    # alpha_RL is nearly size-independent; 0.5 stands in for it.
    r = np.where(D_RL > 0, D_RL * (0.5 - b_rl * np.log(np.where(D_RL > 0, D_RL, 1.0))), 0.0)
    g = fit.fit_rl(D_RL, r)
    assert (g.alpha, g.beta) == (pytest.approx(0.5, abs=1e-10), pytest.approx(b_rl, abs=1e-10))


def test_standard_errors_match_repeated_experiments():
  rng = np.random.default_rng(1)
  truth = fit.predict("bon", 0.6, 0.1, D_BON)
  fits = [fit.fit_bon(D_BON, truth + 0.02 * rng.normal(size=D_BON.shape)) for _ in range(400)]
  alphas = np.array([f.alpha for f in fits])
  betas = np.array([f.beta for f in fits])
  assert np.mean([f.alpha_se for f in fits]) == pytest.approx(alphas.std(), rel=0.15)
  assert np.mean([f.beta_se for f in fits]) == pytest.approx(betas.std(), rel=0.15)


@pytest.mark.parametrize("form", ["bon", "rl"])
@pytest.mark.parametrize("absolute_sigma", [False, True])
def test_weighted_fit_matches_scipy_curve_fit(form, absolute_sigma):
  rng = np.random.default_rng(2)
  d = np.linspace(0.2, 4.0, 15)
  sigma = rng.uniform(0.01, 0.1, size=d.shape)
  r = fit.predict(form, 0.55, 0.12, d) + sigma * rng.normal(size=d.shape)
  f = fit.fit_curve(form, d, r, sigma=sigma, absolute_sigma=absolute_sigma)
  model = (
    (lambda x, a, b: x * (a - b * x))
    if form == "bon"
    else (lambda x, a, b: x * (a - b * np.log(x)))
  )
  popt, pcov = optimize.curve_fit(
    model, d, r, p0=[0.5, 0.1], sigma=sigma, absolute_sigma=absolute_sigma
  )
  np.testing.assert_allclose([f.alpha, f.beta], popt, rtol=1e-6)
  np.testing.assert_allclose([f.alpha_se, f.beta_se], np.sqrt(np.diag(pcov)), rtol=1e-4)


def test_integer_weights_equal_repeated_points():
  d = np.array([0.5, 1.0, 1.5, 2.0, 2.5])
  r = np.array([0.3, 0.5, 0.62, 0.58, 0.55])
  counts = np.array([1, 3, 2, 1, 4])
  weighted = fit.fit_bon(d, r, sigma=1 / np.sqrt(counts))
  repeated = fit.fit_bon(np.repeat(d, counts), np.repeat(r, counts))
  assert weighted.alpha == pytest.approx(repeated.alpha, abs=1e-12)
  assert weighted.beta == pytest.approx(repeated.beta, abs=1e-12)


@pytest.mark.parametrize(
  "form,alpha,beta", [("bon", 0.6, 0.1), ("bon", 0.49, 0.12), ("rl", 0.5, 0.15), ("rl", 0.3, 0.2)]
)
def test_peak_matches_formula_and_dense_grid(form, alpha, beta):
  d_star, r_star = fit.peak(form, alpha, beta)
  if form == "bon":
    assert d_star == pytest.approx(alpha / (2 * beta))
    assert r_star == pytest.approx(alpha**2 / (4 * beta))
  else:
    assert d_star == pytest.approx(math.exp(alpha / beta - 1))
    assert r_star == pytest.approx(beta * d_star)
  grid = np.linspace(0, 4 * d_star, 400_001)
  values = fit.predict(form, alpha, beta, grid)
  assert grid[np.argmax(values)] == pytest.approx(d_star, rel=1e-4)
  assert values.max() == pytest.approx(r_star, rel=1e-8)
  assert fit.predict(form, alpha, beta, d_star) == pytest.approx(r_star)


def test_peak_degenerate_cases():
  inf = float("inf")
  for form in ("bon", "rl"):
    assert fit.peak(form, 0.5, -0.1) == (inf, inf)  # Convex: no over-optimisation in range.
    assert fit.peak(form, 0.5, 0.0) == (inf, inf)  # Straight line up.
    assert fit.peak(form, -0.5, 0.0) == (0.0, 0.0)  # Straight line down: best is not to move.
  assert fit.peak("bon", -0.2, 0.1) == (0.0, 0.0)
  d_star, r_star = fit.peak("rl", -0.2, 0.1)  # RL still rises first: -beta d log d > 0 near 0.
  assert d_star == pytest.approx(math.exp(-3)) and r_star > 0
  assert fit.peak("rl", 1000.0, 1e-3) == (inf, inf)  # exp overflows to inf, not an error.


def test_fit_methods_and_predict_at_origin():
  f = fit.fit_rl(D_RL, fit.predict("rl", 0.5, 0.15, D_RL))
  assert f.predict(0.0) == 0.0
  np.testing.assert_allclose(f.predict(D_RL), fit.predict("rl", 0.5, 0.15, D_RL), atol=1e-12)
  row = f.to_dict()
  assert row["form"] == "rl" and row["d_star"] == pytest.approx(math.exp(0.5 / 0.15 - 1))
  with pytest.raises(ValueError, match=">= 0"):
    f.predict(-1.0)


def test_bootstrap_intervals_cover_the_truth_at_the_nominal_rate():
  """Units (prompts) each have their own curve; the interval should cover the population mean."""
  rng = np.random.default_rng(3)
  d = D_BON[::2]
  covered, widths = [], []
  for _ in range(40):
    alpha_U = 0.6 + 0.1 * rng.normal(size=(50, 1))
    beta_U = 0.1 + 0.03 * rng.normal(size=(50, 1))
    r = d * (alpha_U - beta_U * d) + 0.05 * rng.normal(size=(50, d.size))
    boot = fit.bootstrap_fit("bon", d, r, 200, rng, level=0.9)
    lo, hi = boot.intervals["alpha"]
    covered.append(lo <= 0.6 <= hi)
    widths.append(hi - lo)
  assert 0.75 <= np.mean(covered) <= 39 / 40
  assert 0.02 < np.mean(widths) < 0.1  # About 2 * 1.645 * 0.1 / sqrt(50) = 0.047.


def test_bootstrap_result_contents_and_reproducibility():
  rng = np.random.default_rng(4)
  d_UxP = np.sort(rng.uniform(0.1, 8.0, size=(6, 12)), axis=1)  # RL: each seed its own KLs.
  r = fit.predict("rl", 0.5, 0.15, d_UxP) + 0.02 * rng.normal(size=d_UxP.shape)
  a = fit.bootstrap_fit("rl", d_UxP, r, 300, np.random.default_rng(7))
  b = fit.bootstrap_fit("rl", d_UxP, r, 300, np.random.default_rng(7))
  assert a.intervals == b.intervals
  for name, truth in (
    ("alpha", 0.5),
    ("beta", 0.15),
    ("d_star", math.exp(0.5 / 0.15 - 1)),
    ("r_star", 0.15 * math.exp(0.5 / 0.15 - 1)),
  ):
    assert a.samples[name].shape == (300,)
    lo, hi = a.intervals[name]
    assert lo <= truth <= hi, name
  assert a.peak_fraction == 1.0
  assert a.fit.n_points == 12
  with pytest.raises(ValueError, match="units"):
    fit.bootstrap_fit("rl", d_UxP[0], r[:1], 10, rng)
  with pytest.raises(ValueError, match="Generator"):
    fit.bootstrap_fit("rl", d_UxP, r, 10, 0)
  with pytest.raises(ValueError, match="d must be"):
    fit.bootstrap_fit("rl", d_UxP[:, :3], r, 10, rng)


def test_coefficient_trend_on_published_table():
  assert fit.coefficient_trend(RM_PARAMS, ALPHA_BON).slope > 0
  assert fit.coefficient_trend(RM_PARAMS, BETA_BON).slope < 0
  trend = fit.coefficient_trend(RM_PARAMS, BETA_RL)
  assert trend.slope < -3 * trend.slope_se and trend.r2 > 0.8
  exact = fit.coefficient_trend(np.exp([1.0, 2.0, 3.0]), [1.0, 3.0, 5.0])
  assert (exact.slope, exact.intercept, exact.r2) == (
    pytest.approx(2.0),
    pytest.approx(-1.0),
    pytest.approx(1.0),
  )
  assert exact.predict(math.exp(4.0)) == pytest.approx(7.0)
  with pytest.raises(ValueError, match="two distinct sizes"):
    fit.coefficient_trend([1e6, 1e6], [0.1, 0.2])


def _law_grid():
  X, D = np.meshgrid([1e9, 2e9, 4e9, 8e9, 16e9], np.geomspace(1e2, 1e5, 7), indexing="ij")
  X, D = X.ravel(), D.ravel()
  return X, D, 2000.0 * X**-0.3 * D**-0.2 + 1.5


def test_multiplicative_law_recovers_planted_parameters():
  X, D, L = _law_grid()
  f = fit.fit_multiplicative_law(X, D, L)
  np.testing.assert_allclose([f.A, f.alpha, f.beta, f.E], [2000.0, 0.3, 0.2, 1.5], rtol=1e-5)
  np.testing.assert_allclose(f.predict(X, D), L, rtol=1e-8)
  g = fit.fit_multiplicative_law(X, D, L, method="L-BFGS-B", num_refine=2)
  np.testing.assert_allclose([g.A, g.alpha, g.beta, g.E], [2000.0, 0.3, 0.2, 1.5], rtol=1e-5)
  # Explicit starts are given in the caller's units.
  h = fit.fit_multiplicative_law(X, D, L, starts=[(1000.0, 0.5, 0.5, 1.0)])
  np.testing.assert_allclose([h.A, h.alpha, h.beta, h.E], [2000.0, 0.3, 0.2, 1.5], rtol=1e-5)


def test_multiplicative_law_extrapolates_and_huber_resists_outliers():
  X, D, L = _law_grid()
  rng = np.random.default_rng(5)
  noisy = L * np.exp(0.001 * rng.normal(size=L.shape))
  noisy[[3, 17]] *= 1.3  # Two diverged runs.
  train = X < 16e9  # Hold out the largest model, as Zhang et al. do.
  robust = fit.fit_multiplicative_law(X[train], D[train], noisy[train])
  squared = fit.fit_multiplicative_law(X[train], D[train], noisy[train], huber_delta=10.0)
  robust_err = robust.heldout_error(X[~train], D[~train], L[~train])
  squared_err = squared.heldout_error(X[~train], D[~train], L[~train])
  assert robust_err["mean_abs_rel_err"] < 0.002
  assert squared_err["mean_abs_rel_err"] > 5 * robust_err["mean_abs_rel_err"]
  assert abs(robust.alpha - 0.3) < 0.01 and abs(robust.beta - 0.2) < 0.01


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="unknown functional form"):
    fit.fit_curve("dpo", D_BON, D_BON)
  with pytest.raises(ValueError, match="same length"):
    fit.fit_bon(D_BON, D_BON[:-1])
  with pytest.raises(ValueError, match="two distinct d > 0"):
    fit.fit_bon([0.0, 1.0, 1.0], [0.0, 0.5, 0.5])
  with pytest.raises(ValueError, match="finite"):
    fit.fit_rl([0.5, 1.0, 2.0], [0.1, np.nan, 0.2])
  with pytest.raises(ValueError, match=">= 0"):
    fit.fit_bon([-1.0, 1.0, 2.0], [0.0, 0.5, 0.5])
  with pytest.raises(ValueError, match="sigma"):
    fit.fit_bon([0.5, 1.0, 2.0], [0.1, 0.2, 0.2], sigma=[1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="at least 4 points"):
    fit.fit_multiplicative_law([1.0, 2.0], [1.0, 2.0], [1.0, 2.0])
  with pytest.raises(ValueError, match="L must be"):
    fit.fit_multiplicative_law([1.0] * 4, [1.0] * 4, [1.0, 2.0, -1.0, 3.0])
  with pytest.raises(ValueError, match="method"):
    fit.fit_multiplicative_law(*_law_grid(), method="Nelder-Mead")
