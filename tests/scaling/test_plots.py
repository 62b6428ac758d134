"""Each figure renders a real, non-blank PNG atomically, and refuses input it cannot draw."""

import os

import numpy as np
import pytest
from matplotlib import image as mpimg

from rmscale import bon
from rmscale.scaling import fit, plots

_SIZES = {"3m": 3e6, "85m": 85e6, "1.2b": 1.2e9}
_TABLE = {"3m": (0.490, 0.120, 0.175), "85m": (0.599, 0.106, 0.137), "1.2b": (0.653, 0.0965, 0.122)}


@pytest.fixture(scope="module")
def records():
  """Curves shaped like Gao et al. Fig. 1, from the published coefficient readings."""
  rng = np.random.default_rng(0)
  recs = []
  kl_bon = bon.kl_bon(bon.geometric_ns(1000, 12))
  for size, (a_bon, b_bon, b_rl) in _TABLE.items():
    for seed in range(2):
      for kl in kl_bon:
        gold = fit.predict("bon", a_bon, b_bon, np.sqrt(kl)) + 0.01 * rng.normal()
        recs.append(
          dict(
            method="bon",
            rm_size=size,
            rm_params=int(_SIZES[size]),
            data_size=90_000,
            seed=seed,
            kl=float(kl),
            gold=float(gold),
            gold_se=0.01,
            proxy=float(0.8 * np.sqrt(kl)),
          )
        )
      for kl in np.linspace(0.0, 60.0, 15) * (1 + 0.05 * seed):
        gold = fit.predict("rl", 0.5, b_rl, np.sqrt(kl))
        recs.append(
          dict(
            method="rl",
            rm_size=size,
            rm_params=int(_SIZES[size]),
            data_size=90_000,
            seed=seed,
            kl=float(kl),
            gold=float(gold),
            proxy=float(0.5 * np.sqrt(kl)),
          )
        )
  return recs


@pytest.fixture(scope="module")
def fit_table(records):
  rows = []
  for method in ("bon", "rl"):
    for size, params in _SIZES.items():
      pts = [r for r in records if r["method"] == method and r["rm_size"] == size]
      f = fit.fit_curve(method, np.sqrt([r["kl"] for r in pts]), [r["gold"] for r in pts])
      rows.append(dict(f.to_dict(), rm_size=size, rm_params=int(params), data_size=90_000))
  return rows


def _assert_png(path, width_in, height_in):
  """Decodes, has the figure's pixel size (110 dpi), and is not a blank canvas."""
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  img = mpimg.imread(path)
  assert img.shape[:2] == (round(height_in * 110), round(width_in * 110))
  rgb = img[..., :3].reshape(-1, 3)
  non_white = np.any(rgb < 0.95, axis=1).mean()
  assert 0.01 < non_white < 0.6  # Axes, curves and text, but mostly background.
  assert len(np.unique(rgb.round(2), axis=0)) > 20  # Several colours: the viridis lines.
  # The temp file was renamed, not left behind.
  assert [p for p in os.listdir(os.path.dirname(path)) if p.startswith(".tmp-")] == []


def test_score_vs_sqrt_kl(tmp_path, records, fit_table):
  path = plots.plot_score_vs_sqrt_kl(records, fit_table, tmp_path / "sub" / "score.png")
  _assert_png(path, 10.0, 4.0)
  one_panel = plots.plot_score_vs_sqrt_kl(
    [r for r in records if r["method"] == "rl"], None, tmp_path / "rl.png"
  )
  _assert_png(one_panel, 5.0, 4.0)


def test_methods_side_by_side(tmp_path, records, fit_table):
  """One panel per proxy (3 sizes: one row of 3), every method a colour, titles from the registry."""
  named = [dict(r, name=r["rm_size"]) for r in records if r["seed"] == 0]
  named += [
    dict(r, method="rloo", form="rl", gold=r["gold"] / 2) for r in named if r["method"] == "rl"
  ]
  fits = [dict(f, name=f["rm_size"]) for f in fit_table]
  titles = {"bon": "Best-of-n", "rl": "PPO", "rloo": "RLOO"}
  path = plots.plot_methods(named, fits, tmp_path / "methods.png", titles=titles)
  _assert_png(path, 3 * 4.6, 4.0)
  seven = [dict(r, name=f"p{i}") for i in range(7) for r in named[:20]]
  _assert_png(plots.plot_methods(seven, None, tmp_path / "seven.png"), 3 * 4.6, 3 * 4.0)


def test_score_plot_fits_are_drawn(tmp_path, records, fit_table):
  """Adding the fitted curves changes the picture (they are matched to the data curves)."""
  without = mpimg.imread(plots.plot_score_vs_sqrt_kl(records, [], tmp_path / "a.png"))
  with_fits = mpimg.imread(plots.plot_score_vs_sqrt_kl(records, fit_table, tmp_path / "b.png"))
  assert np.abs(without - with_fits).max() > 0.1


def test_coefficients_vs_size(tmp_path, fit_table):
  boot_rows = [dict(r, alpha_lo=r["alpha"] - 0.01, alpha_hi=r["alpha"] + 0.02) for r in fit_table]
  _assert_png(plots.plot_coefficients_vs_size(boot_rows, tmp_path / "coef.png"), 9.6, 4.0)
  swept = fit_table + [dict(r, data_size=8_000, alpha=r["alpha"] - 0.1) for r in fit_table]
  _assert_png(plots.plot_coefficients_vs_size(swept, tmp_path / "coef_data.png"), 9.6, 4.0)


def test_rm_validation(tmp_path):
  recs = [
    dict(
      rm_params=p,
      data_size=n,
      seed=s,
      val_loss=0.69 - 0.01 * np.log10(p) * np.log10(n) / 5 + 0.003 * s,
      val_accuracy=0.5 + 0.02 * np.log10(p) * np.log10(n) / 5,
    )
    for p in (3e6, 12e6, 85e6)
    for n in (2_000, 8_000, 90_000)
    for s in range(3)
  ]
  _assert_png(plots.plot_rm_validation(recs, tmp_path / "val.png"), 9.6, 4.0)
  only_loss = [{k: v for k, v in r.items() if k != "val_accuracy"} for r in recs]
  _assert_png(plots.plot_rm_validation(only_loss, tmp_path / "loss.png"), 4.8, 4.0)
  with pytest.raises(ValueError, match="metrics"):
    plots.plot_rm_validation([dict(rm_params=1e6, data_size=10)], tmp_path / "x.png")


def test_gold_vs_proxy(tmp_path, records):
  _assert_png(plots.plot_gold_vs_proxy(records, tmp_path / "gp.png"), 9.0, 4.0)


def test_bad_input_raises_and_writes_nothing(tmp_path, records):
  out = tmp_path / "bad.png"
  for call in (
    lambda: plots.plot_score_vs_sqrt_kl([], None, out),
    lambda: plots.plot_coefficients_vs_size([], out),
    lambda: plots.plot_rm_validation([], out),
    lambda: plots.plot_gold_vs_proxy([], out),
  ):
    with pytest.raises(ValueError, match="no records"):
      call()
  no_gold = [{k: v for k, v in r.items() if k != "gold"} for r in records]
  with pytest.raises(ValueError, match="lacks \\['gold'\\]"):
    plots.plot_score_vs_sqrt_kl(no_gold, None, out)
  with pytest.raises(ValueError, match="no functional form"):  # A fit row needs its law.
    plots.plot_score_vs_sqrt_kl(records, [dict(method="dpo", alpha=0.5, beta=0.1)], out)
  with pytest.raises(ValueError, match="method/form"):
    plots.plot_coefficients_vs_size([dict(rm_params=1e6, alpha=0.5, beta=0.1)], out)
  with pytest.raises(ValueError, match="finite numbers"):
    plots.plot_gold_vs_proxy([dict(r, rm_params="big") for r in records], out)
  assert not out.exists() and os.listdir(tmp_path) == []


def test_kl_coefficient_colours_include_zero(tmp_path):
  # The KL-penalty study colours curves by kl_coef, whose baseline is 0 (no log scale possible).
  recs = [
    dict(
      method="rl", kl_coef=c, rm_params=1e5, data_size=100, seed=0, kl=k, proxy=k, gold=k - k * k
    )
    for c in (0.0, 0.05, 0.2)
    for k in (0.0, 0.5, 1.0)
  ]
  path = plots.plot_score_vs_sqrt_kl(recs, None, tmp_path / "kl.png", colour_by="kl_coef")
  assert os.path.getsize(path) > 1000
  colours = plots._colours([0.0, 0.05, 0.2])
  assert len({tuple(c) for c in colours.values()}) == 3
