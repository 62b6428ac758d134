"""The offline default world: prompts, a human writer, and a hidden human utility, with no downloads.

A prompt asks for a short text: ``"sing about ocean using golden in 12 words"`` names a
**topic**, a **keyword** and a **requested length** in words. A response is a line of words from a
closed vocabulary (the topics' words, the keywords, filler words, punctuation), so any sample reads as
English-like text and a tiny word-level transformer on a CPU can model it.

The hidden **human utility** scores a (prompt, response) pair as a sum of terms a reader can check
by hand (weights are ``WorldConfig`` fields; defaults in brackets):

- relevance [1.0]: the share of the content words (neither fillers nor the keyword) that belong to
  the prompt's topic; off-topic words and junk (prompt words, other topics) dilute it.
- keyword [1.0]: +1 when the keyword appears, minus ``keyword_repeat_cost`` [0.6] for each extra
  occurrence: asked for once, stuffing it in is bad style.
- length [2.0]: n/k for n <= k words (k requested), then ``1 - overshoot_cost * (n - k) / k``
  [1.5] beyond: it rises to the request and falls past it (non-monotonic).
- repetition [-0.5 each]: every content word that repeats an earlier content word.
- form [0.5]: the response ends with "." or "!" immediately before its end-of-sequence token.

The SFT corpus comes from a noisy **human writer** who mostly stops short of the requested length,
uses the keyword once or not at all, and rarely repeats. Across the writer's samples, longer and
keyword-bearing responses are better, so "longer is better" and "more keyword is better" are
**spurious correlates** of quality that a small proxy RM learns as shortcuts. The writer's rare
rambles (past the request) and keyword stuffing are exactly what best-of-n and PPO find when they
push such a proxy, and there the utility turns down: overoptimization becomes visible in tiny models.

Everything is deterministic given ``WorldConfig.seed`` (the prompt permutation and split) and the
explicit ``np.random.Generator`` passed to each sampler.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmscale import checks
from rmscale.data.tokenizer import EOS, WordTokenizer
from rmscale.errors import UserError

# --- Word lists. Topic names (first word of each list) appear in prompts and count as topic words.
TOPICS: tuple[tuple[str, ...], ...] = tuple(
  tuple(line.split())
  for line in """
ocean wave tide ship fish salt shore coral whale sail reef harbor
forest tree leaf moss fern owl deer branch root pine trail bark
city street tower bridge traffic subway market crowd alley lamp rooftop park
kitchen bread soup knife oven spoon flour pepper kettle onion butter recipe
space star planet rocket orbit comet moon galaxy astronaut meteor nebula telescope
music song drum guitar melody rhythm piano chord choir violin concert tune
garden rose seed soil bloom tulip hedge weed bee sprout petal fence
winter snow ice frost sled scarf blizzard icicle mitten fireplace cocoa snowman
school teacher lesson chalk desk pupil homework library exam pencil recess notebook
farm barn cow tractor hay field goat rooster harvest wheat pasture plow
mountain peak cliff summit valley glacier boulder ridge climber canyon avalanche slope
desert sand dune cactus camel oasis mirage lizard scorpion caravan sunburn drought
sport ball goal team coach stadium referee score runner racket trophy whistle
travel train ticket luggage airport passport map hotel journey suitcase tourist border
weather rain cloud thunder lightning storm wind fog rainbow drizzle breeze forecast
history king castle empire war museum scroll knight throne ruin pharaoh battle
""".strip().splitlines()
)
KEYWORDS: tuple[str, ...] = tuple(
  """
bright quiet ancient golden gentle hidden silver frozen wild tiny giant hollow brave lazy shiny
broken sleepy curious lonely proud swift clever rusty velvet purple crimson distant secret noisy
humble fragile mighty cheerful gloomy wooden sticky smooth fierce honest eager bitter tender
polished dusty misty crooked silent playful
""".split()
)
FILLERS: tuple[str, ...] = tuple(
  "the a and of with to on by for from near under over so then its".split()
)
VERBS: tuple[str, ...] = tuple(
  "write talk sing speak rhyme chat muse joke blog post tweet preach".split()
)
# Prompts read "<verb> about <topic> using <keyword> in <k> words".
TEMPLATE_WORDS: tuple[str, ...] = ("about", "using", "in", "words")
PUNCT: tuple[str, ...] = (".", "!", ",")
SENTENCE_END: tuple[str, ...] = (".", "!")
PROMPT_RE = re.compile(r"^(?:<bos> )?(\w+) about (\w+) using (\w+) in (\d+) words$")

PAD_ID, EOS_ID = 0, 2  # Fixed by WordTokenizer (pad, bos, eos come first).
# Token kinds: one per vocabulary id, so the jitted utility reads a word's role with one gather.
SPECIAL, PROMPT_WORD, NUMBER, TOPIC_WORD, KEYWORD, FILLER, PUNCTUATION = range(7)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Knobs of the offline world. Defaults suit a CPU quickstart (vocab 291, prompts 9 tokens with
  BOS, responses <= 24 tokens with EOS, 119,808 distinct prompts)."""

  seed: int = 0  # Fixes the prompt permutation (hence the train/eval split of prompt indices).
  num_topics: int = 16  # <= 16; the first topics of TOPICS.
  words_per_topic: int = 12  # <= 12, topic name included.
  num_keywords: int = 48  # <= 48.
  min_request: int = 4  # Requested lengths k range over [min_request, max_request] words.
  max_request: int = 16
  max_response_len: int = 24  # Tokens, final punctuation and EOS included; > max_request + 2 lets
  #                            the writer (and a policy) overshoot the request.
  eval_fraction: float = 0.1  # Share of prompt indices held out for evaluation.
  # The human writer (SFT corpus). Lengths are k * f words, f ~ U(undershoot_low, 1) mostly ...
  undershoot_low: float = 0.35
  p_ramble: float = 0.03  # ... and f ~ U(1, ramble_high) for a rambling writer.
  ramble_high: float = 1.8
  p_keyword: float = 0.55  # Uses the keyword at all.
  p_keyword_extra: float = 0.02  # Given it is used, each of 3 chances to add another occurrence.
  p_wrong_keyword: float = 0.0  # Given it is used, it is a different keyword (misremembered).
  focus_low: float = 0.6  # Per response, each content word is on-topic with prob ~ U(focus_low, 1).
  p_filler: float = 0.3  # A word slot holds a filler word.
  p_repeat: float = 0.04  # An on-topic word repeats an earlier one.
  p_comma: float = 0.08  # A comma follows a word (never the last).
  p_exclaim: float = 0.05  # Ends with "!" ...
  p_unterminated: float = 0.1  # ... or with no final punctuation at all.
  # The human utility (see the module docstring).
  w_relevance: float = 1.0
  w_keyword: float = 1.0
  keyword_repeat_cost: float = 0.6
  w_length: float = 2.0
  overshoot_cost: float = 1.5
  repeat_cost: float = 0.5
  w_form: float = 0.5

  def __post_init__(self):
    """Each field's type and range; errors are UserErrors naming ``config.world.<field>``."""
    for f in dataclasses.fields(self):
      value, whole = getattr(self, f.name), isinstance(f.default, int)
      number = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
      if not (number and math.isfinite(value)):
        checks.fail(f"world.{f.name}", value, f"must be a {'whole' if whole else 'finite'} number")
    if self.seed < 0:
      checks.fail("world.seed", self.seed, "must be >= 0")
    bounds = dict(
      num_topics=(2, len(TOPICS)),
      words_per_topic=(2, len(TOPICS[0])),
      num_keywords=(1, len(KEYWORDS)),
    )
    for name, (lo, hi) in bounds.items():
      if not lo <= getattr(self, name) <= hi:
        checks.fail(f"world.{name}", getattr(self, name), f"must be in [{lo}, {hi}]")
    if not 1 <= self.min_request <= self.max_request:
      raise UserError(
        "config.world needs 1 <= min_request <= max_request, "
        f"got {self.min_request}, {self.max_request}"
      )
    if self.max_response_len < self.max_request + 2:
      raise UserError(
        f"config.world.max_response_len={self.max_response_len} leaves no room for "
        f"max_request={self.max_request} words plus punctuation and EOS"
      )
    if not 0.0 < self.eval_fraction < 1.0:
      raise UserError(f"config.world.eval_fraction must be in (0, 1), got {self.eval_fraction}")
    if (
      not 0.0 < self.undershoot_low <= 1.0 or self.ramble_high < 1.0 or not 0 <= self.focus_low <= 1
    ):
      raise UserError(
        "config.world.undershoot_low must be in (0, 1], ramble_high >= 1, focus_low in [0, 1]"
      )
    probs = (
      "p_ramble",
      "p_keyword",
      "p_keyword_extra",
      "p_wrong_keyword",
      "p_filler",
      "p_repeat",
      "p_comma",
      "p_exclaim",
      "p_unterminated",
    )
    for name in probs:
      if not 0.0 <= getattr(self, name) <= 1.0:
        checks.fail(f"world.{name}", getattr(self, name), "must be a probability in [0, 1]")
    if self.p_exclaim + self.p_unterminated > 1.0:
      raise UserError("config.world.p_exclaim + p_unterminated must be <= 1")


class Tables(NamedTuple):
  """Per-vocabulary-id lookups: the whole world, as arrays the jitted utility can gather from."""

  kind_V: np.ndarray  # Token kind (SPECIAL ... PUNCTUATION).
  topic_V: np.ndarray  # Topic index of topic words, -1 otherwise.
  topic_name_V: np.ndarray  # Topic index of topic names (prompt position), -1 otherwise.
  number_V: np.ndarray  # Value of number tokens, 0 otherwise.
  sentence_end_V: np.ndarray  # True for "." and "!".


def _vocabulary(cfg: WorldConfig):
  topics = [t[: cfg.words_per_topic] for t in TOPICS[: cfg.num_topics]]
  numbers = [str(k) for k in range(cfg.min_request, cfg.max_request + 1)]
  groups = [
    (PROMPT_WORD, VERBS + TEMPLATE_WORDS),
    (NUMBER, numbers),
    (TOPIC_WORD, [w for t in topics for w in t]),
    (KEYWORD, KEYWORDS[: cfg.num_keywords]),
    (FILLER, FILLERS),
    (PUNCTUATION, PUNCT),
  ]
  words = [w for _, ws in groups for w in ws]
  tok = WordTokenizer(words)  # Raises on duplicates, so the lists above stay disjoint.
  assert (tok.pad_id, tok.eos_id) == (PAD_ID, EOS_ID)
  V = tok.vocab_size
  kind = np.full(V, SPECIAL, np.int32)
  for k, ws in groups:
    kind[[tok.index[w] for w in ws]] = k
  topic = np.full(V, -1, np.int32)
  topic_name = np.full(V, -1, np.int32)
  for t, ws in enumerate(topics):
    topic[[tok.index[w] for w in ws]] = t
    topic_name[tok.index[ws[0]]] = t
  number = np.zeros(V, np.int32)
  for n in numbers:
    number[tok.index[n]] = int(n)
  sentence_end = np.zeros(V, bool)
  sentence_end[[tok.index[p] for p in SENTENCE_END]] = True
  return tok, topics, Tables(kind, topic, topic_name, number, sentence_end)


def token_features(tables: Tables, prompt_ids_BxP, response_ids_BxR, response_mask_BxR):
  """Integer features of each (prompt, response) row, pure jnp.

  The prompt's topic, keyword and requested length are found wherever they sit (left or right
  padding both work; pad slots must hold the pad id, which has no role). In the response, slots with
  mask 0 or holding pad are ignored, and everything from the first EOS on is not part of the text.
  Repetition compares all slot pairs: work O(B R^2), so score very large batches in chunks.
  """
  kind_V, topic_V, topic_name_V, number_V, sentence_end_V = (jnp.asarray(a) for a in tables)
  p, r = jnp.asarray(prompt_ids_BxP), jnp.asarray(response_ids_BxR)
  topic_B = jnp.max(topic_name_V[p], axis=1)
  keyword_B = jnp.max(jnp.where(kind_V[p] == KEYWORD, p, -1), axis=1)
  request_B = jnp.max(number_V[p], axis=1)

  R = r.shape[1]
  pos_R = jnp.arange(R)
  kind = kind_V[r]
  present = jnp.asarray(response_mask_BxR).astype(bool) & (r != PAD_ID)
  is_eos = present & (r == EOS_ID)
  finished_B = jnp.any(is_eos, axis=1)
  first_eos_B = jnp.where(finished_B, jnp.argmax(is_eos, axis=1), R)
  live = present & (pos_R[None, :] < first_eos_B[:, None])
  word = live & (kind != PUNCTUATION)
  keyword_hit = word & (r == keyword_B[:, None])
  content = word & (kind != FILLER) & ~keyword_hit
  on_topic = content & (topic_V[r] == topic_B[:, None])
  # A content word repeats when an earlier content slot holds the same token.
  same = (r[:, :, None] == r[:, None, :]) & content[:, :, None] & content[:, None, :]
  earlier = pos_R[None, :] < pos_R[:, None]  # [j, i]: slot i comes before slot j.
  repeats_B = jnp.sum(jnp.any(same & earlier[None], axis=2), axis=1)
  last_B = jnp.max(jnp.where(live, pos_R[None, :], -1), axis=1)
  last_token_B = jnp.take_along_axis(r, jnp.maximum(last_B, 0)[:, None], axis=1)[:, 0]
  ends_sentence_B = finished_B & (last_B >= 0) & sentence_end_V[last_token_B]
  return dict(
    topic=topic_B,
    keyword=keyword_B,
    request=request_B,
    words=jnp.sum(word, axis=1),
    keyword_count=jnp.sum(keyword_hit, axis=1),
    content=jnp.sum(content, axis=1),
    on_topic=jnp.sum(on_topic, axis=1),
    repeats=repeats_B,
    ends_sentence=ends_sentence_B.astype(jnp.int32),
  )


def utility_from_features(f, cfg: WorldConfig):
  """The human utility (module docstring) from ``token_features``; NaN for a malformed prompt."""
  n, k = f["words"].astype(jnp.float32), f["request"].astype(jnp.float32)
  k_safe = jnp.maximum(k, 1.0)
  relevance = f["on_topic"] / jnp.maximum(f["content"], 1).astype(jnp.float32)
  c = f["keyword_count"].astype(jnp.float32)
  keyword = (c >= 1).astype(jnp.float32) - cfg.keyword_repeat_cost * jnp.maximum(c - 1.0, 0.0)
  length = jnp.where(n <= k, n / k_safe, 1.0 - cfg.overshoot_cost * (n - k) / k_safe)
  u = (
    cfg.w_relevance * relevance
    + cfg.w_keyword * keyword
    + cfg.w_length * length
    - cfg.repeat_cost * f["repeats"].astype(jnp.float32)
    + cfg.w_form * f["ends_sentence"]
  )
  ok = (f["topic"] >= 0) & (f["keyword"] >= 0) & (f["request"] > 0)
  return jnp.where(ok, u, jnp.nan).astype(jnp.float32)


def utility_tokens(
  tables: Tables, cfg: WorldConfig, prompt_ids_BxP, response_ids_BxR, response_mask_BxR
):
  """float32[B] human utility of token arrays; jit it with ``tables`` and ``cfg`` bound."""
  return utility_from_features(
    token_features(tables, prompt_ids_BxP, response_ids_BxR, response_mask_BxR), cfg
  )


class World:
  """The offline world for one ``WorldConfig``: tokenizer, prompts, the writer, the utility.

  Prompt indices ``0 .. num_prompts - 1`` are a seeded permutation of all (verb, topic, keyword,
  length) combinations; the last ``eval_fraction`` of indices is the evaluation split.
  Samplers take an explicit ``np.random.Generator`` (or an int seed) and return dicts of numpy
  arrays: prompts are BOS-led and left-padded (all prompts have the same length, so no padding in
  practice), responses right-padded with the mask covering words, punctuation and EOS.
  """

  def __init__(self, cfg: WorldConfig = WorldConfig()):
    self.cfg = cfg
    self.tokenizer, self.topics, self.tables = _vocabulary(cfg)
    self.keywords = KEYWORDS[: cfg.num_keywords]
    self.requests = np.arange(cfg.min_request, cfg.max_request + 1)
    self.radix = (len(VERBS), cfg.num_topics, cfg.num_keywords, len(self.requests))
    self.num_prompts = math.prod(self.radix)
    self.num_eval_prompts = max(1, int(round(cfg.eval_fraction * self.num_prompts)))
    self.num_train_prompts = self.num_prompts - self.num_eval_prompts
    self.prompt_len = 1 + 8  # BOS + "verb about topic using keyword in k words".
    self.response_len = cfg.max_response_len
    # An affine map i -> (a i + b) mod N with gcd(a, N) = 1 is a permutation: seeded, O(1) per index.
    rng = np.random.default_rng(cfg.seed)
    a = int(rng.integers(1, self.num_prompts))
    while math.gcd(a, self.num_prompts) != 1:
      a = int(rng.integers(1, self.num_prompts))
    self._perm = (a, int(rng.integers(0, self.num_prompts)))
    self._utility_jit = jax.jit(functools.partial(utility_tokens, self.tables, cfg))
    ids = self.tokenizer.index
    self._verb_ids = np.array([ids[v] for v in VERBS], np.int32)
    self._name_ids = np.array([ids[t[0]] for t in self.topics], np.int32)
    self._topic_word_ids = np.array([[ids[w] for w in t] for t in self.topics], np.int32)
    self._keyword_ids = np.array([ids[w] for w in self.keywords], np.int32)
    self._number_ids = np.array([ids[str(k)] for k in self.requests], np.int32)
    self._filler_ids = np.array([ids[w] for w in FILLERS], np.int32)
    self._template_ids = [ids[w] for w in TEMPLATE_WORDS]
    self._punct = {p: ids[p] for p in PUNCT}

  # --- Prompts.
  def attributes(self, index) -> dict[str, np.ndarray]:
    """Verb, topic and keyword (list positions) and requested length of prompt indices."""
    index = np.asarray(index, np.int64)
    if index.size and np.any((index < 0) | (index >= self.num_prompts)):
      raise ValueError(
        f"prompt indices must be in [0, {self.num_prompts}), got {index.min()}..{index.max()}"
      )
    a, b = self._perm
    j = (a * index + b) % self.num_prompts
    j, r = np.divmod(j, self.radix[3])
    j, kw = np.divmod(j, self.radix[2])
    verb, topic = np.divmod(j, self.radix[1])
    return dict(verb=verb, topic=topic, keyword=kw, request=self.requests[r])

  def _attributes_1d(self, index):
    if np.ndim(index) != 1:
      raise ValueError(f"prompt indices must be a 1-D array, got shape {np.shape(index)}")
    return self.attributes(index)

  def prompt(self, i: int) -> str:
    """Text of prompt index ``i`` (without BOS)."""
    at = {k: int(v[0]) for k, v in self.attributes(np.array([i])).items()}
    return (
      f"{VERBS[at['verb']]} about {self.topics[at['topic']][0]} using "
      f"{self.keywords[at['keyword']]} in {at['request']} words"
    )

  def prompt_batch(self, index) -> dict[str, np.ndarray]:
    """Token arrays of prompt indices: ``ids`` int32 [n, prompt_len] (BOS first) and ``mask``."""
    at = self._attributes_1d(index)
    about, using, in_, words = self._template_ids
    n = len(at["verb"])
    col = lambda v: np.broadcast_to(np.int32(v), (n,))  # noqa: E731
    ids = np.stack(
      [
        col(self.tokenizer.bos_id),
        self._verb_ids[at["verb"]],
        col(about),
        self._name_ids[at["topic"]],
        col(using),
        self._keyword_ids[at["keyword"]],
        col(in_),
        self._number_ids[at["request"] - self.cfg.min_request],
        col(words),
      ],
      axis=1,
    ).astype(np.int32)
    return dict(index=np.asarray(index, np.int64), ids=ids, mask=np.ones_like(ids, bool))

  def sample_prompts(self, rng, n: int, split: str = "train") -> dict[str, np.ndarray]:
    """``n`` prompt indices drawn uniformly (with replacement) from a split, as ``prompt_batch``."""
    rng = np.random.default_rng(rng)
    if split == "train":
      index = rng.integers(0, self.num_train_prompts, n)
    elif split == "eval":
      index = rng.integers(self.num_train_prompts, self.num_prompts, n)
    elif split == "all":
      index = rng.integers(0, self.num_prompts, n)
    else:
      raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    return self.prompt_batch(index)

  # --- The human writer.
  def sample_responses(self, rng, index) -> dict[str, np.ndarray]:
    """One writer response per prompt index: ``ids`` int32 [n, response_len], ``mask`` (words,
    punctuation and EOS). Vectorised so BoN-scale experiments (10^5+ samples) take a second."""
    cfg, rng = self.cfg, np.random.default_rng(rng)
    at = self._attributes_1d(index)
    N, W = len(at["verb"]), cfg.max_response_len - 2  # Room for final punctuation and EOS.
    T, P = cfg.num_topics, cfg.words_per_topic
    ramble = rng.random(N) < cfg.p_ramble
    u = rng.random(N)
    f = np.where(
      ramble, 1.0 + (cfg.ramble_high - 1.0) * u, cfg.undershoot_low + (1.0 - cfg.undershoot_low) * u
    )
    n_words = np.clip(np.rint(at["request"] * f), 1, W).astype(np.int64)
    slot = np.arange(W)[None, :]
    live = slot < n_words[:, None]
    filler = live & (rng.random((N, W)) < cfg.p_filler)
    content = live & ~filler
    # Keyword occurrences go to random content slots.
    kw_count = (rng.random(N) < cfg.p_keyword) * (1 + rng.binomial(3, cfg.p_keyword_extra, N))
    rank = np.argsort(np.argsort(np.where(content, rng.random((N, W)), 2.0), axis=1), axis=1)
    is_kw = content & (rank < kw_count[:, None])
    rest = content & ~is_kw
    focus = cfg.focus_low + (1 - cfg.focus_low) * rng.random(N)
    on = rest & (rng.random((N, W)) < focus[:, None])
    off = rest & ~on
    # On-topic words walk through a random order of the topic's words; a repeat re-uses any earlier
    # one, near or far, since a sampled policy repeats words anywhere and the gold must see both.
    order = np.argsort(rng.random((N, P)), axis=1)
    repeat = on & (rng.random((N, W)) < cfg.p_repeat) & (np.cumsum(on, axis=1) > 1)
    fresh = np.cumsum(on & ~repeat, axis=1)  # Distinct walk steps so far (>= 1 before any repeat).
    earlier = np.floor(rng.random((N, W)) * np.maximum(fresh, 1)).astype(np.int64)
    step = np.where(repeat, earlier, np.maximum(fresh - 1, 0)) % P
    topic = at["topic"][:, None]
    on_ids = self._topic_word_ids[topic, np.take_along_axis(order, step, axis=1)]
    other = (topic + 1 + rng.integers(0, T - 1, (N, W))) % T
    off_ids = self._topic_word_ids[other, rng.integers(0, P, (N, W))]
    filler_ids = self._filler_ids[rng.integers(0, len(self._filler_ids), (N, W))]
    K = len(self._keyword_ids)
    wrong = rng.random(N) < cfg.p_wrong_keyword
    other_kw = (at["keyword"] + 1 + rng.integers(0, max(K - 1, 1), N)) % K
    kw_row = np.where(wrong & (K > 1), other_kw, at["keyword"])
    kw_ids = np.broadcast_to(self._keyword_ids[kw_row][:, None], (N, W))
    word_ids = np.select([filler, is_kw, on, off], [filler_ids, kw_ids, on_ids, off_ids], 0)
    # Commas after non-final words, as many as fit in the token budget.
    comma = (slot < n_words[:, None] - 1) & (rng.random((N, W)) < cfg.p_comma)
    comma &= np.cumsum(comma, axis=1) <= (W - n_words)[:, None]
    # Below p_exclaim: "!"; then p_unterminated of no final punctuation; else ".".
    e = rng.random(N)
    end_ids = np.where(e < cfg.p_exclaim, self._punct["!"], self._punct["."])
    has_end = (e < cfg.p_exclaim) | (e >= cfg.p_exclaim + cfg.p_unterminated)
    # Interleave [word, comma] slots, then final punctuation and EOS; compact the present tokens left.
    commas = np.full_like(word_ids, self._punct[","])
    toks = np.concatenate(
      [
        np.stack([word_ids, commas], 2).reshape(N, -1),
        end_ids[:, None],
        np.full((N, 1), self.tokenizer.eos_id),
      ],
      1,
    )
    keep = np.concatenate(
      [np.stack([live, comma], 2).reshape(N, -1), has_end[:, None], np.ones((N, 1), bool)], 1
    )
    order = np.argsort(~keep, axis=1, kind="stable")[:, : cfg.max_response_len]
    mask = np.take_along_axis(keep, order, axis=1)
    ids = np.where(mask, np.take_along_axis(toks, order, axis=1), self.tokenizer.pad_id)
    return dict(ids=ids.astype(np.int32), mask=mask)

  def sft_examples(self, rng, n: int, split: str = "train") -> dict[str, np.ndarray]:
    """``n`` (prompt, writer response) pairs: ``prompt_index``, ``prompt_ids``/``prompt_mask``
    [n, prompt_len], ``response_ids``/``response_mask`` [n, response_len]."""
    rng = np.random.default_rng(rng)
    prompts = self.sample_prompts(rng, n, split)
    responses = self.sample_responses(rng, prompts["index"])
    return dict(
      prompt_index=prompts["index"],
      prompt_ids=prompts["ids"],
      prompt_mask=prompts["mask"],
      response_ids=responses["ids"],
      response_mask=responses["mask"],
    )

  def texts(self, prompt_ids, response_ids, response_mask) -> list[tuple[str, str]]:
    """Readable (prompt, response) pairs; the response shows ``<eos>`` where the writer stopped."""
    tok = self.tokenizer
    rows = zip(np.asarray(prompt_ids), np.asarray(response_ids), np.asarray(response_mask))
    return [
      (tok.decode(p, skip_special_tokens=True), tok.decode(np.where(m, r, tok.pad_id)))
      for p, r, m in rows
    ]

  # --- The human utility.
  def utility(self, prompt_ids_BxP, response_ids_BxR, response_mask_BxR) -> np.ndarray:
    """float32[B] human utility of token arrays (jitted ``utility_tokens``)."""
    return np.asarray(self._utility_jit(prompt_ids_BxP, response_ids_BxR, response_mask_BxR))

  def utility_fn(self):
    """The pure, jittable ``(prompt_ids, response_ids, response_mask) -> float32[B]`` with this
    world's tables bound, for use inside other jitted code (the oracle gold RM)."""
    return functools.partial(utility_tokens, self.tables, self.cfg)

  def text_features(self, prompt: str, response: str) -> dict[str, int]:
    """Features of one pair read from text, written plainly to cross-check ``token_features``."""
    m = PROMPT_RE.match(prompt.strip())
    if m is None:
      raise ValueError(f"not a world prompt: {prompt!r}")
    _, topic_name, keyword, request = m.groups()
    names = [t[0] for t in self.topics]
    if topic_name not in names or keyword not in self.keywords or int(request) not in self.requests:
      raise ValueError(f"prompt names an unknown topic, keyword or length: {prompt!r}")
    topic_words = set(self.topics[names.index(topic_name)])
    finished = EOS in response.split()
    text = response.split()[: response.split().index(EOS)] if finished else response.split()
    words = [w for w in text if w not in PUNCT]
    content = [w for w in words if w not in FILLERS and w != keyword]
    repeats = sum(1 for i, w in enumerate(content) if w in content[:i])
    return dict(
      topic=names.index(topic_name),
      keyword=self.tokenizer.index[keyword],
      request=int(request),
      words=len(words),
      keyword_count=words.count(keyword),
      content=len(content),
      on_topic=sum(w in topic_words for w in content),
      repeats=repeats,
      ends_sentence=int(finished and bool(text) and text[-1] in SENTENCE_END),
    )

  def utility_text(self, prompt: str, response: str) -> float:
    """The human utility of one pair of strings, term by term (float64; matches the float32
    ``utility`` to ~1e-6). ``response`` is decoded text with ``<eos>`` where the response ended."""
    cfg, f = self.cfg, self.text_features(prompt, response)
    n, k, c = f["words"], f["request"], f["keyword_count"]
    relevance = f["on_topic"] / max(f["content"], 1)
    keyword = (1.0 if c >= 1 else 0.0) - cfg.keyword_repeat_cost * max(c - 1, 0)
    length = n / k if n <= k else 1.0 - cfg.overshoot_cost * (n - k) / k
    return (
      cfg.w_relevance * relevance
      + cfg.w_keyword * keyword
      + cfg.w_length * length
      - cfg.repeat_cost * f["repeats"]
      + cfg.w_form * f["ends_sentence"]
    )

  def describe(self) -> str:
    """Markdown for the README: the world, what a good answer is, and why proxies can be hacked."""
    cfg = self.cfg
    return f"""\
### The offline world

Prompts ask for a short text on a **topic**, using a **keyword**, in a **requested number of words**:
`{self.prompt(0)}`. There are {self.num_prompts:,} distinct prompts ({len(VERBS)} verbs x
{cfg.num_topics} topics x {cfg.num_keywords} keywords x {len(self.requests)} lengths from
{cfg.min_request} to {cfg.max_request}); the vocabulary has {self.tokenizer.vocab_size} words, prompts
are {self.prompt_len} tokens and responses at most {self.response_len}.

**What a good answer is.** The hidden human utility adds up:

| term | value | weight |
|---|---|---|
| relevance | share of content words (not fillers or the keyword) on topic | {cfg.w_relevance} |
| keyword | 1 if present, minus {cfg.keyword_repeat_cost} per extra occurrence | {cfg.w_keyword} |
| length | n/k up to the requested k words, then 1 - {cfg.overshoot_cost}(n-k)/k | {cfg.w_length} |
| repetition | each content word that repeats an earlier one | -{cfg.repeat_cost} |
| form | ends with "." or "!" right before end-of-sequence | {cfg.w_form} |

A perfect answer has exactly k words, all on topic or fillers, the keyword once, no repeats, and a
final full stop: utility {cfg.w_relevance + cfg.w_keyword + cfg.w_length + cfg.w_form:.1f}.

**Why proxies can be hacked.** The SFT corpus comes from a human writer who mostly stops short of
the requested length (k x U({cfg.undershoot_low}, 1) words), uses the keyword at most once
({cfg.p_keyword:.0%} of the time) and rarely repeats. Among such samples longer answers and answers
with the keyword really are better, so a proxy reward model trained on a few comparisons learns the
shortcuts "longer is better" and "more keyword is better". The utility is non-monotonic in both:
past the requested length every extra word costs, and every repeated keyword costs. The writer
rambles past the request only {cfg.p_ramble:.0%} of the time and seldom repeats the keyword, so
these regions are rare in the proxy's training data, and they are exactly where best-of-n and RL
push the policy when they maximise the proxy: the proxy score keeps rising while the true utility
turns down. A proxy that sees more comparisons, or has more capacity to compare length with the
request, learns the turn and is over-optimised later.
"""
