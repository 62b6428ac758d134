"""Named random streams: deterministic, independent by name, and ints used as they are."""

import hashlib

import jax
import numpy as np
import pytest

from rmscale import rng


def test_words_hash_names_and_keep_ints():
  expected = int.from_bytes(hashlib.blake2b(b"label", digest_size=4).digest(), "little")
  assert rng.word("label") == expected
  assert rng.word(7) == 7 and rng.word(2**32 + 5) == 5 and rng.word(np.int64(3)) == 3
  assert rng.words(1, "label", 4) == [1, expected, 4]
  for bad in (True, 1.5, None, b"x"):
    with pytest.raises(TypeError, match="stream names are strings or ints"):
      rng.word(bad)


def test_streams_are_deterministic_and_differ_by_name_and_seed():
  a = rng.numpy(0, "label", "prompts").integers(1 << 30, size=4)
  np.testing.assert_array_equal(a, rng.numpy(0, "label", "prompts").integers(1 << 30, size=4))
  for other in (rng.numpy(0, "label", "noise"), rng.numpy(1, "label", "prompts")):
    assert not np.array_equal(a, other.integers(1 << 30, size=4))
  # The generator is numpy's on the words, so a stream can be recreated outside rmscale.
  direct = np.random.default_rng(rng.words(0, "label", "prompts")).integers(1 << 30, size=4)
  np.testing.assert_array_equal(a, direct)
  assert 0 <= rng.integer(0, "gold", "train") < 2**31
  assert rng.integer(0, "gold", "train") != rng.integer(0, "proxies", "25k_d1000_s0")


def test_keys_fold_in_each_name():
  k = rng.key(3, "optimise", 5)
  manual = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), rng.word("optimise")), 5)
  np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(manual))
  assert not np.array_equal(
    jax.random.key_data(rng.key(3, "optimise", 5)), jax.random.key_data(rng.key(3, "optimise", 6))
  )
