"""The notebooks' helpers: loading results, over-optimised examples, bands, extrapolation (rmscale/report.py,
rmscale/scaling/analysis.py), and the PPO evaluation samples the rl stage saves for them."""

import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from rmscale import curves, report, results, rng
from rmscale.methods import iterative
from rmscale.data.world import World
from rmscale.scaling import analysis
from rmscale.scaling import fit as fit_lib
from rmscale.stages import fit as fit_stage

SIZES = {
  "100k": 100_000,
  "400k": 400_000,
  "1.6m": 1_600_000,
  "6.4m": 6_400_000,
}  # = conftest.SWEEP_SIZES


@pytest.fixture(scope="module")
def world():
  return World()


def test_markdown_table_exact():
  rows = [{"a": "x|y", "b": 1.23456, "c": 3}, {"a": "two\nlines", "b": -0.5, "c": 4}]
  assert report.markdown_table(rows, ["a", "b"], ".1f") == (
    "| a | b |\n|---|---|\n| x\\|y | 1.2 |\n| two lines | -0.5 |"
  )
  with pytest.raises(ValueError, match=r"lacks columns \['d'\]"):
    report.markdown_table(rows, ["a", "d"])
  with pytest.raises(ValueError, match="no rows"):
    report.markdown_table([])


def test_runtime_sees_the_fake_cpu_devices():
  rt = report.runtime()
  assert (rt.platform, rt.num_devices) == ("cpu", jax.device_count()) == ("cpu", 8)
  assert rt.describe().startswith("Found 8 CPU device(s)")


def test_quickstart_config_follows_settings():
  c = report.quickstart_config("tiny,oracle")
  N = c.reference.samples_per_prompt
  assert (c.gold.kind, N, c.proxies.sizes) == ("oracle", 16, ("100k", "200k"))
  full = report.quickstart_config("")
  assert full.gold.kind == "trained" and full.reference.samples_per_prompt > N  # Not the tiny one.
  with pytest.raises(ValueError, match="unknown config argument 'huge'"):
    report.quickstart_config("huge")


def test_world_tour_utility_matches_the_text_reading(world):
  rows = report.world_tour(world, n=12, seed=3)
  assert len(rows) == 12
  for r in rows:
    # world.utility (jitted, from tokens) against utility_text (plain Python, from the shown text).
    assert r["utility"] == pytest.approx(world.utility_text(r["prompt"], r["response"]), abs=1e-5)
    assert f"in {r['requested']} words" in r["prompt"]
  assert report.world_tour(world, n=12, seed=3) == rows  # Seeded.


def _samples(world):
  """Best-of-n samples for 3 prompts x 4 samples with hand-set scores; tokens from the world's writer."""
  ex = world.sft_examples(np.random.default_rng(0), 12)
  P, N = 3, 4
  utility = np.array([[3.0, 2.0, 1.0, 0.5], [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 1.0]])
  proxy = np.array(
    [  # Two proxies; the first prefers sample 3, 3 and 1 of the three prompts.
      [[0.0, 1.0, 2.0, 5.0], [0.0, 0.0, 0.0, 9.0], [0.0, 4.0, 1.0, 1.0]],
      [[9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    ]
  )
  gold = utility * 2.0
  return dict(
    prompt_ids=ex["prompt_ids"][::N],
    response_ids=ex["response_ids"].reshape(P, N, -1),
    response_mask=ex["response_mask"].reshape(P, N, -1),
    utility=utility,
    gold=gold,
    proxy=proxy,
    proxy_names=np.array(["small", "big"]),
  )


def test_bon_pairs_pick_the_proxys_favourite(world):
  s = _samples(world)
  initial, best = report.bon_pairs(s, "small")
  np.testing.assert_array_equal(initial["utility"], [3.0, 1.0, 2.0])  # Sample 0 of each prompt.
  np.testing.assert_array_equal(best["utility"], [0.5, 4.0, 2.0])  # Samples 3, 3, 1.
  np.testing.assert_array_equal(best["proxy"], [5.0, 9.0, 4.0])
  np.testing.assert_array_equal(best["response_ids"][2], s["response_ids"][2, 1])
  ref = report.reference(s)
  assert ref.proxy["small"] == pytest.approx(23.0 / 12)
  assert ref.gold == pytest.approx((s["gold"].mean(), s["gold"].std()))
  with pytest.raises(ValueError, match="proxy 'nope' did not score"):
    report.bon_pairs(s, "nope")


def test_overoptimised_rows_worst_first(world):
  s = _samples(world)
  initial, best = report.bon_pairs(s, "small")
  reference = curves.Reference(gold=(1.0, 2.0), utility=(0.0, 1.0), proxy={"small": 1.0})
  rows = report.overoptimised(initial, best, world, reference, "small", k=4)
  # Utility lost: 3 - 0.5 = 2.5 (prompt 0), 1 - 4 = -3 (gained), 2 - 2 = 0 (not strictly lost).
  assert [r["utility lost"] for r in rows] == [2.5]
  r = rows[0]
  texts = world.texts(s["prompt_ids"], s["response_ids"][:, 0], s["response_mask"][:, 0])
  assert (r["prompt"], r["initial response"]) == texts[0]
  assert (
    r["optimised response"]
    == world.texts(s["prompt_ids"][:1], s["response_ids"][0, 3:], s["response_mask"][0, 3:])[0][1]
  )
  # utility raw; proxy - 1; (gold - 1) / 2 with gold = 2 utility.
  assert r["initial u/proxy/gold"] == "3.00 / -1.00 / +2.50"
  assert r["optimised u/proxy/gold"] == "0.50 / +4.00 / +0.00"
  assert len(report.overoptimised(initial, best, world, reference, "small", min_drop=-10.0)) == 3
  assert report.overoptimised(initial, best, world, reference, "small", min_drop=2.5) == []
  assert "No prompt" in report.examples_markdown([])
  with pytest.raises(ValueError, match="different prompts"):
    report.overoptimised(
      initial, {**best, "prompt_ids": best["prompt_ids"][::-1]}, world, reference, "small"
    )


def test_smallest_proxy_orders_by_size_then_data():
  recs = [
    dict(name="b", rm_params=200, data_size=10, seed=0),
    dict(name="a", rm_params=100, data_size=90, seed=0),
    dict(name="c", rm_params=100, data_size=10, seed=1),
    dict(name="d", rm_params=100, data_size=10, seed=0),
  ]
  assert report.smallest_proxy(recs) == "d"
  assert report.smallest_proxy(recs, ["a", "b"]) == "a"
  with pytest.raises(ValueError, match="no proxy records"):
    report.smallest_proxy(recs, ["zz"])


def test_eval_samples_round_trip(tmp_path):
  P = 9
  tokens = np.arange(4 * 12).reshape(4, 12)
  mask = tokens % 5 != 0
  s = {
    "tokens": tokens,
    "mask": mask,
    "response_mask": mask[:, P:],
    "score": np.arange(4.0),
    "kl": np.ones(4),
  }
  for which in ("initial", "final"):
    iterative.save_eval_samples(
      str(tmp_path / "optimise" / "ppo" / "run" / iterative.EVAL_SAMPLES[which]),
      s,
      P,
      np.full(4, 2.0),
      np.full(4, 3.0),
    )
  initial, final = report.load_eval_samples(str(tmp_path), "ppo", "run")
  np.testing.assert_array_equal(final["prompt_ids"], tokens[:, :P])
  np.testing.assert_array_equal(final["response_ids"], tokens[:, P:])
  np.testing.assert_array_equal(final["prompt_mask"], mask[:, :P])
  np.testing.assert_array_equal(initial["proxy"], np.arange(4.0))
  assert (final["gold"] == 2.0).all() and (final["utility"] == 3.0).all()
  with pytest.raises(FileNotFoundError, match="run the optimise stage"):
    report.load_eval_samples(str(tmp_path), "ppo", "other")


def test_load_results_from_a_sweep_root(synthetic_sweep):
  res = report.load_results(synthetic_sweep)
  assert sorted(res.runs) == sorted(f"rm-{s}" for s in SIZES)  # shared/ has no results: not a run.
  names = {r["name"] for r in res.records["curves"]}
  assert names == {f"rm-{s}/{s}_d1000_s0" for s in SIZES}
  assert all(r["run"] == r["name"].split("/")[0] for r in res.records["curves"])
  assert all("gold_per_prompt" not in r for r in res.records["curves"])  # Moved to per_prompt.
  assert {k: v.shape for k, v in res.per_prompt.items()} == {
    **{("bon", n): (6, 8) for n in names},
    **{("ppo", n): (6, 6) for n in names},
  }
  assert len(res.curves(["ppo"])) == 4
  curves = res.curves()
  assert len(curves) == 8 and all(np.all(np.diff(c.d) > 0) for c in curves)
  # Per-prompt scores average to the curve's gold (same points, same order).
  for c in curves:
    np.testing.assert_allclose(c.gold_per_prompt.mean(0), c.gold, atol=1e-12)
  assert res.describe().splitlines() == [
    f"Loaded 4 runs under `{synthetic_sweep}`:",
    "",
    "- Best-of-n: 4 curves (4 with per-prompt scores), RM sizes 100k, 400k, 1.6m, 6.4m; comparisons 1,000",
    "- PPO: 4 curves (4 with per-prompt scores), RM sizes 100k, 400k, 1.6m, 6.4m; comparisons 1,000",
  ]


def test_load_results_from_one_workdir(synthetic_sweep):
  one = report.load_results(os.path.join(synthetic_sweep, "rm-400k"))
  assert one.runs == {"": os.path.join(synthetic_sweep, "rm-400k")}
  assert {r["name"] for r in one.records["curves"]} == {"400k_d1000_s0"}
  assert ("bon", "400k_d1000_s0") in one.per_prompt and "run" not in one.records["curves"][0]
  assert not report.load_results(
    os.path.join(synthetic_sweep, "rm-400k"), per_prompt=False
  ).per_prompt


def test_load_results_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such workdir or sweep root"):
    report.load_results(str(tmp_path / "missing"))
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  with pytest.raises(ValueError, match="neither a workdir"):
    report.load_results(str(tmp_path / "empty"))
  results.write_jsonl(str(tmp_path / "w" / "results" / "proxies.jsonl"), [{"name": "x"}])
  with pytest.raises(ValueError, match="no optimisation curves yet"):
    report.load_results(str(tmp_path / "w"))


@pytest.mark.skipif(
  any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")),
  reason="a GCS backend is installed: the error path needs neither",
)
def test_gcs_path_without_a_backend_fails_clearly():
  with pytest.raises(ImportError, match="cannot read gs://.*gcsfs"):
    report.load_results("gs://rmscale-no-such-bucket/run")


def test_fit_rows_match_the_fit_stage(synthetic_sweep):
  """Refitting from loaded results reproduces the fit stage's coefficients and bootstrap intervals."""
  workdir = os.path.join(synthetic_sweep, "rm-1.6m")
  res = report.load_results(workdir)
  expected = fit_stage.fit_curves(curves.load(workdir), num_boot=30, seed=7)
  got = [f.row() for f in analysis.fit_all(res.curves(), 30, rng.numpy(7, "fit", "bootstrap"))]
  assert len(got) == len(expected) == 2
  for g, e in zip(got, expected):
    assert (g["method"], g["name"]) == (e["method"], e["name"])
    for k in ("alpha", "beta", "d_star", "r_star", "alpha_lo", "alpha_hi", "beta_lo", "beta_hi"):
      assert g[k] == pytest.approx(e[k], rel=1e-12), k
  # The synthetic curves are exact laws: the fit recovers them.
  for g in got:
    a, b = (
      (0.4 + 0.1 * math.log(16), 0.30 - 0.04 * math.log(16))
      if g["method"] == "bon"
      else (0.5 + 0.05 * math.log(16), 0.4 - 0.03 * math.log(16))
    )
    assert (g["alpha"], g["beta"]) == pytest.approx((a, b), abs=1e-10)


def test_prediction_band_keeps_alpha_and_beta_paired():
  # BoN R = d(alpha - beta d) for the pairs (1, 1) and (3, 3): 0 and 0 at d = 1 (mixing the pairs would
  # give 1 - 3 = -2 and 3 - 1 = 2), -2 and -6 at d = 2. With two replicates the band is their envelope.
  lo, hi = analysis.prediction_band("bon", [1.0, 3.0], [1.0, 3.0], [0.0, 1.0, 2.0], level=0.9)
  np.testing.assert_allclose(lo, [0.0, 0.0, -6.0])
  np.testing.assert_allclose(hi, [0.0, 0.0, -2.0])


def test_prediction_band_order_statistics():
  # Predictions at d = 2 (beta = 0): 2 alpha = 2, 4, 6, 8, 10; at level 0.5 the tails are 0.25: index
  # floor(0.25 * 4) = 1 -> 4 (lower) and ceil(0.75 * 4) = 3 -> 8 (higher).
  lo, hi = analysis.prediction_band("bon", [1.0, 2.0, 3.0, 4.0, 5.0], np.zeros(5), [2.0], level=0.5)
  assert (lo[0], hi[0]) == (4.0, 8.0)
  with pytest.raises(ValueError, match="paired"):
    analysis.prediction_band("bon", [1.0, 2.0], [1.0], [1.0])


def test_fit_with_band_collapses_when_prompts_agree():
  d = np.array([0.0, 0.5, 1.0, 1.5])
  gold = fit_lib.predict("rl", 0.8, 0.5, d)
  same = analysis.Curve("rl", "x", {}, d, gold, np.zeros(4), gold, np.tile(gold, (5, 1)))
  f = analysis.fit_with_band(same, 20, np.random.default_rng(0), num_grid=7)
  assert (f.fit.alpha, f.fit.beta) == pytest.approx((0.8, 0.5), abs=1e-12)
  np.testing.assert_allclose(f.lo, f.centre, atol=1e-12)
  np.testing.assert_allclose(f.hi, f.centre, atol=1e-12)
  noisy = analysis.Curve(
    "rl",
    "x",
    {},
    d,
    gold,
    np.zeros(4),
    gold,
    gold + np.random.default_rng(1).normal(size=(5, 4)) * d,
  )
  g = analysis.fit_with_band(noisy, 50, np.random.default_rng(0))
  assert g.lo[0] == g.hi[0] == 0.0  # Every law passes through the origin.
  assert np.all(g.lo <= g.hi) and np.any(g.hi - g.lo > 0.1)
  none = analysis.fit_with_band(
    analysis.Curve("rl", "x", {}, d, gold, np.zeros(4), gold), 50, np.random.default_rng(0)
  )
  assert none.lo is None and "alpha_lo" not in none.row()


def test_curves_sort_by_kl_and_check_per_prompt_shapes():
  recs = [
    dict(method="rl", name="a", kl=4.0, gold=2.0),
    dict(method="rl", name="a", kl=1.0, gold=1.0),
    dict(method="bon", name="a", kl=0.0, gold=0.0),
  ]
  c = analysis.curves(recs)
  assert [(x.method, x.d.tolist(), x.gold.tolist()) for x in c] == [
    ("bon", [0.0], [0.0]),
    ("rl", [1.0, 2.0], [1.0, 2.0]),
  ]
  with pytest.raises(ValueError, match="have shape \\(3, 3\\); the curve has 2 points"):
    analysis.curves(recs, {("rl", "a"): np.zeros((3, 3))})
  with pytest.raises(ValueError, match="lacks 'gold'"):
    analysis.curves([dict(method="rl", name="a", kl=1.0)])


def test_trend_prediction_by_hand():
  # x = ln size = 0, 1, 2; y = 0, 1, 3: slope 1.5, intercept -1/6, RSS 1/6 on 1 dof.
  pred, se = analysis.trend_prediction(np.exp([0.0, 1.0, 2.0]), [0.0, 1.0, 3.0], math.exp(3.0))
  assert pred == pytest.approx(-1 / 6 + 4.5)
  assert se == pytest.approx(math.sqrt(1 / 6 * (1 / 3 + 4 / 2)))  # s^2 (1/n + (x0 - xbar)^2 / Sxx)
  pred, se = analysis.trend_prediction([10, 100], [1.0, 2.0], 1000)
  assert pred == pytest.approx(3.0) and math.isnan(se)


def _row(method, params, alpha, beta, data_size=1000):
  return dict(
    method=method, name=f"p{params}", rm_params=params, data_size=data_size, alpha=alpha, beta=beta
  )


def test_extrapolate_by_hand():
  rows = [_row("bon", 10, 1.0, 0.5), _row("bon", 100, 2.0, 0.4), _row("bon", 1000, 4.0, 0.2)]
  d = np.array([0.0, 1.0, 2.0])
  held = analysis.Curve("bon", "p1000", {}, d, d * (4.0 - 0.2 * d), np.zeros(3), d)
  ex = analysis.extrapolate(rows, [held], "bon", 1000)
  # The trend through (ln 10, 1) and (ln 100, 2) reaches 3 at ln 1000; beta: 0.5, 0.4 -> 0.3.
  assert (ex.predicted["alpha"], ex.predicted["beta"]) == pytest.approx((3.0, 0.3))
  assert (ex.predicted["d_star"], ex.predicted["r_star"]) == pytest.approx(
    (5.0, 7.5)
  )  # a/2b, a^2/4b
  assert (ex.actual["d_star"], ex.actual["r_star"]) == pytest.approx((10.0, 20.0))
  # Predicted d(3 - 0.3 d) = 0, 2.7, 4.8 against measured 0, 3.8, 7.2.
  assert ex.rmse_predicted == pytest.approx(math.sqrt((1.1**2 + 2.4**2) / 3))
  assert ex.rmse_fitted == pytest.approx(0.0, abs=1e-12)
  assert (ex.heldout_params, ex.train_params, ex.heldout_names) == (1000, (10, 100), ("p1000",))
  assert [t["quantity"] for t in ex.table()][:2] == ["alpha", "beta"]


def test_extrapolate_errors_and_skips():
  rows = [_row("bon", 10, 1.0, 0.5), _row("bon", 100, 2.0, 0.4)]
  with pytest.raises(ValueError, match=">= 3 RM sizes .* got 2"):
    analysis.extrapolate(rows, [], "bon", 1000)
  mixed = rows + [_row("bon", 1000, 4.0, 0.2, data_size=50)]
  with pytest.raises(ValueError, match="span data sizes \\[50, 1000\\]; pass data_size"):
    analysis.extrapolate(mixed, [], "bon")
  done, skipped = analysis.extrapolate_all(mixed, [])
  assert done == [] and len(skipped) == 2 and "proxies of 2 size(s) (10, 100)" in skipped[1]
  with pytest.raises(ValueError, match="no measured bon curve"):
    analysis.extrapolate(rows + [_row("bon", 1000, 4.0, 0.2)], [], "bon", 1000)


def test_extrapolation_recovers_an_exact_log_linear_sweep(synthetic_sweep):
  res = report.load_results(synthetic_sweep)
  curves = res.curves()
  rows = [f.row() for f in analysis.fit_all(curves, 0, np.random.default_rng(0))]
  done, skipped = analysis.extrapolate_all(rows, curves)
  assert skipped == [] and [e.method for e in done] == ["bon", "ppo"]
  for ex in done:
    assert ex.heldout_params == 6_400_000 and ex.train_params == (100_000, 400_000, 1_600_000)
    for coef in ("alpha", "beta"):
      assert ex.predicted[coef] == pytest.approx(ex.actual[coef], abs=1e-9)
      assert ex.predicted[f"{coef}_se"] == pytest.approx(
        0.0, abs=1e-9
      )  # The trend has no residual.
    assert ex.rmse_predicted == pytest.approx(0.0, abs=1e-9)


def test_figures_render(synthetic_sweep):
  res = report.load_results(synthetic_sweep)
  curves = res.curves()
  fitted = analysis.fit_all(curves, 10, np.random.default_rng(0))
  fig = report.plot_bands(fitted)
  assert len(fig.axes) == 2  # One panel per method.
  assert sum(len(ax.collections) for ax in fig.axes) >= 8  # A band (and error bars) per curve.
  ex = analysis.extrapolate_all([f.row() for f in fitted], curves)[0][0]
  fig = report.plot_extrapolation(ex, [f.row() for f in fitted], curves)
  assert [ax.get_ylabel() for ax in fig.axes[:3]] == ["alpha", "beta", "gold score"]
  img = report.image(fig)
  assert img.data[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no fitted curves"):
    report.plot_bands([])
