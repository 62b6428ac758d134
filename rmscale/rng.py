"""Random streams derived from the run's seed and a name, never from magic offsets.

Every random draw of an experiment (a world sample, a data order, a model init, a rollout) comes from
a stream named for its purpose, e.g. ``rng.numpy(seed, "label", "prompts")``. Names hash to 32-bit
words, so streams are independent whatever the seed, adding a stream changes no other, and a reader
sees in the code what each stream is for. Integers in a name (an iteration, a proxy's seed) are used
as they are.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

Name = str | int


def word(name: Name) -> int:
  """A name as a 32-bit word: an int as itself (mod 2^32), a string by its blake2b hash."""
  if isinstance(name, bool) or not isinstance(name, (int, str, np.integer)):
    raise TypeError(f"stream names are strings or ints, got {name!r}")
  if isinstance(name, (int, np.integer)):
    return int(name) % 2**32
  return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def words(seed: int, *names: Name) -> list[int]:
  return [word(seed), *(word(n) for n in names)]


def numpy(seed: int, *names: Name) -> np.random.Generator:
  """The numpy generator of the stream ``names`` under ``seed``."""
  return np.random.default_rng(words(seed, *names))


def integer(seed: int, *names: Name) -> int:
  """A 31-bit integer seed for APIs that take one (e.g. a data order's seed)."""
  return int(numpy(seed, *names).integers(2**31))


def key(seed: int, *names: Name) -> jax.Array:
  """The JAX key of the stream ``names`` under ``seed`` (``fold_in`` of each name's word)."""
  k = jax.random.key(word(seed))
  for n in names:
    k = jax.random.fold_in(k, word(n))
  return k
