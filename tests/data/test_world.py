"""The offline world: determinism, prompt count, hand-computed utilities, token/text parity, and the
property the whole experiment rests on: a shortcut proxy is over-optimised by best-of-n."""

import jax
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import gammaln

from rmscale.data.world import PROMPT_RE, World, WorldConfig, token_features

PROMPT = "write about ocean using bright in 4 words"


@pytest.fixture(scope="module")
def world():
  return World(WorldConfig())


@pytest.fixture(scope="module")
def sft(world):
  ex = world.sft_examples(np.random.default_rng(0), 20_000)
  ex["utility"] = world.utility(ex["prompt_ids"], ex["response_ids"], ex["response_mask"])
  feats = token_features(world.tables, ex["prompt_ids"], ex["response_ids"], ex["response_mask"])
  ex.update({k: np.asarray(v) for k, v in feats.items()})
  return ex


def _utility(world, prompt, response):
  """Token-path utility of one text pair (response right-padded to a longer buffer)."""
  tok = world.tokenizer
  p, _ = tok.encode_batch([prompt], world.prompt_len, padding_side="left")
  r, m = tok.encode_batch([response], world.response_len + 4, padding_side="right", add_bos=False)
  return float(world.utility(p, r, m)[0])


@pytest.mark.parametrize(
  "response, expected",
  [
    ("wave tide bright shore . <eos>", 1 + 1 + 2 + 0.5),  # The perfect answer.
    ("wave tide bright shore .", 1 + 1 + 2),  # Never emitted EOS: cut off, so not well formed.
    ("wave desk bright the . <eos>", 0.5 + 1 + 2 + 0.5),  # One of two content words off topic.
    ("wave the tide <eos>", 1 + 0 + 2 * 3 / 4),  # No keyword, 3 of 4 words, no full stop.
    # 8 words for 4 requested: length 2*(1 - 1.5*4/4); keyword twice: 1 - 0.6; one repeat: -0.5.
    ("wave wave bright bright the coral ship , fish ! <eos>", 1 + 0.4 - 1 - 0.5 + 0.5),
    ("<eos> wave tide bright shore .", 0.0),  # Empty: nothing before EOS.
    ("write wave bright shore . <eos> wave wave", 2 / 3 + 1 + 2 + 0.5),  # Prompt word is junk;
    #                                                   text after EOS is ignored.
  ],
)
def test_hand_computed_utilities(world, response, expected):
  assert world.utility_text(PROMPT, response) == pytest.approx(expected, abs=1e-12)
  assert _utility(world, PROMPT, response) == pytest.approx(expected, abs=1e-6)


def test_length_is_non_monotonic_and_keyword_repetition_hurts(world):
  ocean = world.topics[0]

  def answer(n_words, keywords=1):
    words = ["bright"] * keywords + list(ocean[1:]) + ["the"] * 20
    return " ".join(words[:n_words]) + " . <eos>"

  prompt = "write about ocean using bright in 8 words"
  by_length = [world.utility_text(prompt, answer(n)) for n in range(1, 21)]
  assert np.all(np.diff(by_length[:8]) > 0)  # Up to the request, each word helps ...
  assert np.all(np.diff(by_length[7:]) < 0)  # ... past it, each word hurts.
  assert by_length[19] < by_length[0]  # Rambling to 20 words is worse than a single word.
  by_keywords = [world.utility_text(prompt, answer(8, c)) for c in range(6)]
  assert by_keywords[1] > by_keywords[0]
  assert np.all(np.diff(by_keywords[1:]) < 0)
  assert by_keywords[4] < by_keywords[0]  # Stuffing the keyword is worse than leaving it out.


def test_deterministic_given_seed(world):
  again = World(WorldConfig())
  assert [again.prompt(i) for i in range(50)] == [world.prompt(i) for i in range(50)]
  a, b = (w.sft_examples(np.random.default_rng(7), 64) for w in (world, again))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = world.sft_examples(np.random.default_rng(8), 64)
  assert not np.array_equal(a["response_ids"], c["response_ids"])
  other = World(WorldConfig(seed=1))
  assert [other.prompt(i) for i in range(50)] != [world.prompt(i) for i in range(50)]


def test_over_100k_distinct_prompts_and_their_tokens(world):
  n = world.num_prompts
  assert n == 12 * 16 * 48 * 13 >= 100_000
  batch = world.prompt_batch(np.arange(n))
  assert len(np.unique(batch["ids"], axis=0)) == n  # The seeded permutation is a bijection.
  for i in [0, 1, 12345, n - 1]:
    text = world.prompt(i)
    assert PROMPT_RE.match(text)
    assert world.tokenizer.decode(batch["ids"][i]) == "<bos> " + text
  # Attributes are recoverable from the tokens.
  at = world.attributes(np.arange(0, n, 97))
  no_response = np.zeros((len(at["topic"]), 1), np.int32)
  feats = token_features(world.tables, batch["ids"][::97], no_response, no_response)
  np.testing.assert_array_equal(np.asarray(feats["topic"]), at["topic"])
  keyword_ids = [world.tokenizer.index[world.keywords[i]] for i in at["keyword"]]
  np.testing.assert_array_equal(np.asarray(feats["keyword"]), keyword_ids)
  np.testing.assert_array_equal(np.asarray(feats["request"]), at["request"])
  assert world.tokenizer.vocab_size == 291 and world.prompt_len == 9
  train = world.sample_prompts(np.random.default_rng(0), 1000, "train")["index"]
  evals = world.sample_prompts(np.random.default_rng(0), 1000, "eval")["index"]
  assert train.max() < world.num_train_prompts <= evals.min()
  with pytest.raises(ValueError, match="split"):
    world.sample_prompts(np.random.default_rng(0), 2, "test")
  with pytest.raises(ValueError, match="prompt indices"):
    world.prompt(n)


def test_token_and_text_utility_agree(world, sft):
  rng = np.random.default_rng(1)
  # Writer samples, plus adversarial junk: any token anywhere (specials, prompt words, pads inside
  # the mask, EOS mid-way), random masks, and left-padded prompts with extra pad columns.
  B, R = 1500, world.response_len
  junk_ids = rng.integers(0, world.tokenizer.vocab_size, (B, R)).astype(np.int32)
  junk_ids[rng.random((B, R)) < 0.1] = 2
  junk_mask = rng.random((B, R)) < 0.9
  prompts = world.sample_prompts(rng, B)["ids"]
  cases = [
    (sft["prompt_ids"][:B], sft["response_ids"][:B], sft["response_mask"][:B]),
    (np.pad(prompts, ((0, 0), (3, 0))), junk_ids, junk_mask),
  ]
  for prompt_ids, response_ids, response_mask in cases:
    u = world.utility(prompt_ids, response_ids, response_mask)
    feats = {
      k: np.asarray(v)
      for k, v in token_features(world.tables, prompt_ids, response_ids, response_mask).items()
    }
    for b, (p, r) in enumerate(world.texts(prompt_ids, response_ids, response_mask)):
      expected = world.text_features(p, r)
      assert {k: int(v[b]) for k, v in feats.items()} == expected, (p, r)
      assert abs(world.utility_text(p, r) - u[b]) < 1e-5, (p, r)
  jitted = jax.jit(world.utility_fn())(*cases[1])
  np.testing.assert_array_equal(np.asarray(jitted), world.utility(*cases[1]))


def test_malformed_prompts(world):
  r, m = world.tokenizer.encode_batch(["wave . <eos>"], 4, "right", add_bos=False)
  p, _ = world.tokenizer.encode_batch(["write about ocean in 4 words"], 9)  # No keyword.
  assert np.isnan(world.utility(p, r, m)[0])
  with pytest.raises(ValueError, match="not a world prompt"):
    world.utility_text("write about ocean in 4 words", "wave . <eos>")
  with pytest.raises(ValueError, match="num_topics"):
    WorldConfig(num_topics=17)
  with pytest.raises(ValueError, match="max_response_len"):
    WorldConfig(max_response_len=10)


def test_writer_samples_are_readable_and_well_shaped(world, sft):
  vocab_words = set(world.tokenizer.vocab[3:])
  for prompt, response in world.texts(
    sft["prompt_ids"][:300], sft["response_ids"][:300], sft["response_mask"][:300]
  ):
    assert PROMPT_RE.match(prompt)
    words = response.split()
    assert words[-1] == "<eos>" and set(words[:-1]) <= vocab_words
  mask = sft["response_mask"]
  assert mask.shape[1] == 24 and np.all(np.diff(mask.astype(int), axis=1) <= 0)  # Prefix masks.
  assert np.all(sft["response_ids"][np.arange(len(mask)), mask.sum(1) - 1] == 2)  # Ends in EOS.
  over = np.mean(sft["words"] > sft["request"])
  assert 0.01 < over < 0.06  # The writer mostly undershoots; rambles are rare.


def test_spurious_correlates_in_the_sft_corpus(sft):
  u, n, k, c = sft["utility"], sft["words"], sft["request"], sft["keyword_count"]
  # Within the writer's samples, longer and more-keyword answers look better ...
  assert np.corrcoef(n, u)[0, 1] > 0.1
  assert np.corrcoef(c, u)[0, 1] > 0.3
  # ... but at the extremes the utility falls.
  assert u[n > k].mean() < u[n == k].mean() - 1.0
  assert u[c >= 2].mean() < u[c == 1].mean() - 0.4


def _expected_best_of_n(score_PxN, gold_PxN, n):
  """Unbiased best-of-n (Nakano et al. App. I), written independently of rmscale.bon."""
  N = score_PxN.shape[1]
  gold_sorted = np.take_along_axis(gold_PxN, np.argsort(score_PxN, axis=1), axis=1)
  i = np.arange(1, N + 1)
  log_w = (
    gammaln(np.maximum(i, n))
    - gammaln(n)
    - gammaln(np.maximum(i - n + 1, 1))
    - gammaln(N + 1)
    + gammaln(n + 1)
    + gammaln(N - n + 1)
  )
  return float((gold_sorted @ np.where(i >= n, np.exp(log_w), 0.0)).mean())


def test_shortcut_proxy_is_overoptimised_by_best_of_n(world):
  """A linear length + keyword-count proxy fitted on 2k writer comparisons: best-of-n by it gains
  true utility at small n, then loses it (below the n=1 level by n=1000); best-of-n by the utility
  itself keeps rising. This is the Goodhart effect the quickstart must reproduce with real RMs."""
  rng = np.random.default_rng(0)

  def features(prompts, responses):
    f = token_features(world.tables, prompts["ids"], responses["ids"], responses["mask"])
    x = np.stack([np.asarray(f["words"]), np.asarray(f["keyword_count"])], 1).astype(float)
    return x, world.utility(prompts["ids"], responses["ids"], responses["mask"])

  prompts = world.sample_prompts(rng, 2000)
  xa, ua = features(prompts, world.sample_responses(rng, prompts["index"]))
  xb, ub = features(prompts, world.sample_responses(rng, prompts["index"]))
  keep = ua != ub
  dx, y = (xa - xb)[keep], np.sign(ua - ub)[keep]
  theta = minimize(lambda t: np.mean(np.logaddexp(0, -y * (dx @ t))), np.zeros(2)).x
  assert np.all(theta > 0)  # The shortcut: longer and more keyword look better.

  P, N = 100, 1000
  prompts = world.sample_prompts(rng, P, "eval")
  repeated = world.prompt_batch(np.repeat(prompts["index"], N))
  x, gold = features(repeated, world.sample_responses(rng, repeated["index"]))
  tie_break = 1e-6 * rng.random((2, P, N))  # Best-of-n picks uniformly among tied scores.
  proxy, gold = (x @ theta).reshape(P, N) + tie_break[0], gold.reshape(P, N)
  ns = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
  by_proxy = np.array([_expected_best_of_n(proxy, gold, n) for n in ns])
  by_gold = np.array([_expected_best_of_n(gold + tie_break[1], gold, n) for n in ns])
  peak = int(np.argmax(by_proxy))
  assert 0 < peak < len(ns) - 2 and by_proxy[peak] > by_proxy[0] + 0.3
  assert by_proxy[-1] < by_proxy[0] - 0.3
  assert np.all(np.diff(by_gold) > 0) and by_gold[-1] > by_proxy[peak] + 0.5


def test_writer_repeats_earlier_words_and_misremembers_keywords():
  base = dict(p_keyword=1.0, p_keyword_extra=0.0, p_filler=0.0, focus_low=1.0, p_ramble=1.0)
  rng = np.random.default_rng(0)
  for p_wrong in (0.0, 1.0):
    w = World(WorldConfig(p_wrong_keyword=p_wrong, p_repeat=0.5, **base))
    prompts = w.sample_prompts(rng, 2000)
    resp = w.sample_responses(rng, prompts["index"])
    f = {
      k: np.asarray(v)
      for k, v in token_features(w.tables, prompts["ids"], resp["ids"], resp["mask"]).items()
    }
    kw_tokens = np.isin(resp["ids"], w._keyword_ids) & resp["mask"]
    right = (resp["ids"] == prompts["ids"][:, 5:6]) & resp["mask"]  # Slot 5 holds the keyword.
    assert kw_tokens.any(1).all()  # p_keyword=1: every response carries a keyword token ...
    assert (right.any(1) == (p_wrong == 0.0)).all()  # ... the prompt's own, or always another.
    assert np.array_equal(f["keyword_count"] > 0, right.any(1))
  # Repeats reach back past the previous content word, as a sampled policy's do.
  tokens = [[t for t, m in zip(r, mk) if m] for r, mk in zip(resp["ids"], resp["mask"])]
  gaps = [
    i - max(j for j in range(i) if row[j] == row[i])
    for row in tokens
    for i in range(len(row))
    if row[i] in w._topic_word_ids and row[i] in row[:i]
  ]
  assert f["repeats"].sum() > 500 and np.mean(np.array(gaps) > 1) > 0.3
