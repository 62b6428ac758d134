"""The curve schema: the one mean/standard-error helper, the reference recentring, the loader."""

import math

import numpy as np
import pytest

from rmscale import curves, results


def test_mean_and_se_by_hand_and_below_two_values():
  mean, se = curves.mean_and_se([1.0, 2.0, 3.0, 6.0])
  assert (mean, se) == pytest.approx((3.0, math.sqrt(14 / 3) / 2))
  mean, se = curves.mean_and_se([[1.0, 10.0], [3.0, 20.0]], axis=0)  # Over rows.
  np.testing.assert_allclose(mean, [2.0, 15.0])
  np.testing.assert_allclose(se, [1.0, 5.0])
  mean, se = curves.mean_and_se([4.0])
  assert mean == 4.0 and math.isnan(se)  # One value: no spread to measure.


def _samples():
  gold = np.array([[1.0, 3.0], [5.0, 7.0]], np.float32)  # Mean 4, std sqrt(5).
  return {
    "gold": gold,
    "utility": gold / 2,
    "proxy": np.stack([gold + 1.0, 2 * gold]).astype(np.float32),
    "proxy_names": np.array(["a", "b"]),
  }


def test_reference_recentres_and_is_every_curves_origin():
  ref = curves.Reference.from_samples(_samples())
  assert ref.gold == pytest.approx((4.0, math.sqrt(5.0)))
  assert ref.proxy == pytest.approx({"a": 5.0, "b": 8.0})
  np.testing.assert_allclose(ref.gold_scores([4.0, 4.0 + math.sqrt(5.0)]), [0.0, 1.0])
  np.testing.assert_allclose(ref.proxy_scores("b", [8.0, 10.0]), [0.0, 2.0])  # Only shifted.
  origin = curves.point(**ref.origin("a"), method="m", name="a")
  assert (origin["kl"], origin["gold"], origin["proxy"], origin["utility"]) == (0.0, 0.0, 0.0, 0.0)
  # Per prompt: each prompt's mean over its samples, recentred (prompt 0: (2 - 4) / sqrt(5)).
  np.testing.assert_allclose(origin["gold_per_prompt"], [-2 / math.sqrt(5.0), 2 / math.sqrt(5.0)])
  with pytest.raises(KeyError, match="no scores of proxy 'c'"):
    ref.proxy_scores("c", [1.0])
  flat = {**_samples(), "gold": np.ones((2, 2))}
  with pytest.raises(ValueError, match="zero variance"):
    curves.Reference.from_samples(flat)


def test_point_clamps_kl_and_keeps_per_prompt_scores():
  rec = curves.point(kl=-0.01, kl_se=0.02, proxy=[1.0, 3.0], gold=[0.0, 2.0], utility=[1.0, 1.0])
  assert rec["kl"] == 0.0 and rec["d"] == 0.0 and rec["kl_se"] == 0.02
  assert (rec["gold"], rec["gold_se"]) == pytest.approx((1.0, 1.0))
  assert rec["gold_per_prompt"] == [0.0, 2.0] and "length" not in rec


def test_load_group_and_per_prompt_order_points_by_kl(tmp_path):
  recs = [
    dict(method="ppo", name="p", kl=2.0, gold=0.5, gold_per_prompt=[0.4, 0.6]),
    dict(method="ppo", name="p", kl=0.0, gold=0.0, gold_per_prompt=[0.0, 0.0]),
    dict(method="bon", name="p", kl=1.0, gold=0.2),  # No per-prompt scores: left out below.
  ]
  results.write_jsonl(str(tmp_path / "results" / "curves.jsonl"), recs)
  loaded = curves.load(str(tmp_path))
  assert loaded == recs and curves.load(str(tmp_path / "none")) == []
  groups = curves.group(loaded)
  assert list(groups) == [("bon", "p"), ("ppo", "p")]
  assert [r["kl"] for r in groups[("ppo", "p")]] == [0.0, 2.0]
  units = curves.per_prompt(loaded)
  assert list(units) == [("ppo", "p")]
  np.testing.assert_array_equal(units[("ppo", "p")], [[0.0, 0.4], [0.0, 0.6]])
