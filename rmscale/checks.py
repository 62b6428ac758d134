"""Start-up checks of config values; every error is a `UserError` naming the key as the user types it.

Each stage validates its own config section with these (``stages/<name>.py: validate``), so an
error is caught before anything is written, in the words of the command line:
``config.policy.lr=-1.0 must be a finite number > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from rmscale.errors import UserError


def value(config, key: str):
  """``config`` at the dotted ``key`` (``'policy.lr'``); a missing key is a UserError."""
  out = config
  for part in key.split("."):
    try:
      out = out[part]
    except (KeyError, AttributeError, TypeError):
      raise UserError(f"config.{key} is missing") from None
  return out


def fail(key: str, got, must: str):
  raise UserError(f"config.{key}={got!r} {must}")


def _number(key: str, x) -> float:
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    fail(key, x, "must be a number")
  return float(x)


def positive(config, key: str) -> float:
  x = value(config, key)
  if not (math.isfinite(_number(key, x)) and x > 0):
    fail(key, x, "must be a finite number > 0")
  return x


def non_negative(config, key: str) -> float:
  x = value(config, key)
  if not (math.isfinite(_number(key, x)) and x >= 0):
    fail(key, x, "must be a finite number >= 0")
  return x


def in_range(config, key: str, lo: float, hi: float, *, closed_hi: bool = False) -> float:
  """lo <= x < hi (or <= hi with ``closed_hi``)."""
  x = value(config, key)
  ok = math.isfinite(_number(key, x)) and lo <= x and (x <= hi if closed_hi else x < hi)
  if not ok:
    fail(key, x, f"must be in [{lo:g}, {hi:g}{']' if closed_hi else ')'}")
  return x


def count(config, key: str, minimum: int = 1) -> int:
  """A whole number >= ``minimum``."""
  x = value(config, key)
  if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
    fail(key, x, f"must be a whole number >= {minimum}")
  return x


def divisible(config, key: str, devices: int) -> int:
  """A batch dimension that splits evenly over the data-parallel devices."""
  x = count(config, key)
  if x % devices:
    fail(key, x, f"is not divisible by the {devices} data-parallel devices")
  return x


def one_of(config, key: str, allowed: Iterable) -> object:
  x = value(config, key)
  allowed = tuple(allowed)
  if x not in allowed:
    fail(key, x, f"must be one of {allowed}")
  return x


def model_size(config, key: str) -> str:
  """A named size from rmscale/models/sizes.py."""
  from rmscale.models import sizes

  x = value(config, key)
  if x not in sizes.SIZES:
    fail(key, x, f"is not a known size; known: {list(sizes.SIZES)}")
  return x


def optimizer(config, section: str, steps_key: str | None = "steps") -> None:
  """A training section's optimizer fields: lr, warmup_steps, weight_decay where the section has
  one, and its number of steps (``steps_key``)."""
  positive(config, f"{section}.lr")
  count(config, f"{section}.warmup_steps", minimum=0)
  if "weight_decay" in value(config, section):
    non_negative(config, f"{section}.weight_decay")
  if steps_key:
    count(config, f"{section}.{steps_key}")
