"""Best-of-n estimator against brute-force enumeration, plus the KL formula and recentring."""

import itertools
import math

import numpy as np
import pytest

from rmscale import bon


def _brute_force_bon(proxy_PxN, gold_PxN, n):
  """Average over prompts and over every n-subset of the gold score of the subset's best sample.

  Ties for the best proxy score are broken uniformly at random, i.e. the tied golds are averaged.
  """
  per_prompt = []
  for proxy_N, gold_N in zip(proxy_PxN, gold_PxN):
    vals_proxy, vals_gold = [], []
    for subset in itertools.combinations(range(len(proxy_N)), n):
      best = max(proxy_N[i] for i in subset)
      winners = [i for i in subset if proxy_N[i] == best]
      vals_proxy.append(best)
      vals_gold.append(np.mean([gold_N[i] for i in winners]))
    per_prompt.append((np.mean(vals_proxy), np.mean(vals_gold)))
  return np.mean(per_prompt, axis=0)


@pytest.mark.parametrize("tied", [False, True])
def test_matches_brute_force_enumeration(tied):
  rng = np.random.default_rng(0)
  prompts, N = 3, 7
  if tied:  # Few distinct proxy values: many ties, including for the maximum.
    proxy = rng.integers(0, 3, size=(prompts, N)).astype(float)
  else:
    proxy = rng.normal(size=(prompts, N))
  gold = rng.normal(size=(prompts, N))
  ns = np.arange(1, N + 1)
  curve = bon.unbiased_best_of_n(proxy, gold, ns)
  for k, n in enumerate(ns):
    want_proxy, want_gold = _brute_force_bon(proxy, gold, n)
    np.testing.assert_allclose(curve.proxy[k], want_proxy, rtol=0, atol=1e-10)
    np.testing.assert_allclose(curve.gold[k], want_gold, rtol=0, atol=1e-10)


def test_ends_of_the_curve():
  proxy = np.array([[0.3, 2.0, -1.0, 0.5], [5.0, 1.0, 2.0, 3.0]])
  gold = np.array([[1.0, 7.0, 3.0, 1.0], [-2.0, 4.0, 0.0, 6.0]])
  curve = bon.unbiased_best_of_n(proxy, gold, [1, 4])
  # n=1: the plain mean over everything; n=N: the gold of each prompt's top-proxy sample.
  np.testing.assert_allclose(curve.gold, [gold.mean(), (7.0 + -2.0) / 2], atol=1e-12)
  np.testing.assert_allclose(curve.proxy, [proxy.mean(), (2.0 + 5.0) / 2], atol=1e-12)
  # Two prompts: SE of the mean = |x1 - x2| / 2.
  np.testing.assert_allclose(curve.gold_se, [abs(3.0 - 2.0) / 2, abs(7.0 - -2.0) / 2], atol=1e-12)
  np.testing.assert_allclose(curve.kl, [0.0, math.log(4) - 0.75], atol=1e-15)
  np.testing.assert_allclose(curve.d, np.sqrt(curve.kl))


def test_invariant_to_sample_order_even_with_ties():
  rng = np.random.default_rng(1)
  proxy = rng.integers(0, 4, size=(5, 9)).astype(float)
  gold = rng.normal(size=(5, 9))
  perm = rng.permutation(9)
  a = bon.unbiased_best_of_n(proxy, gold, [1, 2, 5, 9])
  b = bon.unbiased_best_of_n(proxy[:, perm], gold[:, perm], [1, 2, 5, 9])
  np.testing.assert_allclose(a.gold, b.gold, atol=1e-12)
  np.testing.assert_allclose(a.gold_per_prompt, b.gold_per_prompt, atol=1e-12)


def test_gold_is_monotone_when_proxy_equals_gold():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(4, 50))
  curve = bon.unbiased_best_of_n(scores, scores, bon.geometric_ns(50, 8))
  assert np.all(np.diff(curve.gold) > 0)
  np.testing.assert_allclose(curve.gold, curve.proxy)


def test_stacked_proxies_match_one_at_a_time():
  rng = np.random.default_rng(3)
  proxies = rng.normal(size=(3, 4, 10))
  gold = rng.normal(size=(4, 10))
  stacked = bon.unbiased_best_of_n(proxies, gold, [1, 3, 10])
  assert stacked.gold.shape == (3, 3) and stacked.gold_per_prompt.shape == (3, 4, 3)
  for j in range(3):
    single = bon.unbiased_best_of_n(proxies[j], gold, [1, 3, 10])
    np.testing.assert_allclose(stacked.gold[j], single.gold, atol=1e-12)
    np.testing.assert_allclose(stacked.proxy_se[j], single.proxy_se, atol=1e-12)
  with pytest.raises(ValueError, match="single proxy"):
    stacked.records()


def test_records():
  curve = bon.unbiased_best_of_n(np.array([[0.0, 1.0]]), np.array([[2.0, 4.0]]), [1, 2])
  recs = curve.records(rm_size="12m", seed=0)
  assert [r["n"] for r in recs] == [1, 2]
  assert recs[1]["gold"] == 4.0 and recs[0]["n"] == 1 and recs[0]["rm_size"] == "12m"
  assert math.isnan(recs[0]["gold_se"])  # One prompt: no spread to measure.


def test_kl_bon_values():
  assert bon.kl_bon(1) == 0.0
  assert bon.kl_bon(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
  # The paper's scales: n=1,000 is ~6 nats, n=60,000 ~10 nats.
  assert bon.kl_bon(1000) == pytest.approx(math.log(1000) - 0.999, abs=1e-12)
  assert 9.9 < bon.kl_bon(60_000) < 10.1
  np.testing.assert_allclose(
    bon.kl_bon(np.array([1, 2, 4])), [0.0, math.log(2) - 0.5, math.log(4) - 0.75]
  )
  with pytest.raises(ValueError, match="n >= 1"):
    bon.kl_bon(0)


def test_weights_hand_values_and_normalisation():
  np.testing.assert_allclose(bon.bon_weights(4, 2), [0, 1 / 6, 2 / 6, 3 / 6], atol=1e-15)
  np.testing.assert_allclose(bon.bon_weights(5, 1), np.full(5, 0.2), atol=1e-15)
  np.testing.assert_allclose(bon.bon_weights(5, 5), [0, 0, 0, 0, 1], atol=1e-15)
  N = 40
  for n in (1, 3, 17, 40):
    exact = [math.comb(i - 1, n - 1) / math.comb(N, n) if i >= n else 0.0 for i in range(1, N + 1)]
    np.testing.assert_allclose(bon.bon_weights(N, n), exact, rtol=1e-10, atol=1e-300)
  for N, n in ((60_000, 1), (60_000, 1000), (60_000, 60_000), (2000, 1500)):
    w = bon.bon_weights(N, n)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("N,n", [(5, 0), (5, 6), (0, 0), (5, 2.5), (True, 1), (5, None), (5, "2")])
def test_weights_reject_bad_n(N, n):
  with pytest.raises(ValueError):
    bon.bon_weights(N, n)


def test_geometric_ns():
  np.testing.assert_array_equal(bon.geometric_ns(1000, 4), [1, 10, 100, 1000])
  np.testing.assert_array_equal(bon.geometric_ns(5, 10), [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(bon.geometric_ns(1, 3), [1])
  ns = bon.geometric_ns(10_000, 30)
  assert len(ns) == 30 and ns[0] == 1 and ns[-1] == 10_000
  assert np.all(np.diff(ns) > 0)
  # Crowded low end is pushed up but the top stays geometric: ratios near 10000**(1/29).
  np.testing.assert_allclose(ns[-1] / ns[-2], 10_000 ** (1 / 29), rtol=0.02)
  with pytest.raises(ValueError):
    bon.geometric_ns(10, 0)
  with pytest.raises(ValueError):
    bon.geometric_ns(10, 1)


def test_recentre():
  rng = np.random.default_rng(4)
  ref = rng.normal(3.0, 2.0, size=200)
  scores = rng.normal(5.0, 1.0, size=(4, 6))
  ref_c = bon.recentre(ref, ref)
  assert ref_c.mean() == pytest.approx(0.0, abs=1e-12)
  assert ref_c.std() == pytest.approx(1.0, abs=1e-12)
  # Invariant to any positive affine change of the RM's units.
  np.testing.assert_allclose(
    bon.recentre(7 * scores - 2, 7 * ref - 2), bon.recentre(scores, ref), atol=1e-12
  )
  shifted = bon.recentre(scores, ref, shift_only=True)
  np.testing.assert_allclose(shifted, scores - ref.mean(), atol=1e-12)
  np.testing.assert_allclose(bon.recentre(scores, ref), shifted / ref.std(), atol=1e-12)
  with pytest.raises(ValueError, match="zero variance"):
    bon.recentre(scores, np.ones(5))
  with pytest.raises(ValueError, match="empty"):
    bon.recentre(scores, [])


def test_estimator_rejects_bad_input():
  good = np.zeros((2, 3))
  with pytest.raises(ValueError, match="disagree"):
    bon.unbiased_best_of_n(np.zeros((2, 4)), good, [1])
  with pytest.raises(ValueError, match="finite"):
    bon.unbiased_best_of_n(np.array([[0.0, np.nan, 1.0]] * 2), good, [1])
  with pytest.raises(ValueError, match="n <= N"):
    bon.unbiased_best_of_n(good, good, [1, 4])
  with pytest.raises(ValueError, match="ns"):
    bon.unbiased_best_of_n(good, good, [])
  with pytest.raises(ValueError, match="prompts, N"):
    bon.unbiased_best_of_n(np.zeros(3), np.zeros(3), [1])
