"""Config helpers: ``get_config(arg)`` argument parsing and start-up validation of experiment configs."""

from __future__ import annotations

import ast

import ml_collections

from rmscale.errors import UserError


def parse_count(text, config: str) -> int:
  """A count argument of ``config``: ``90k`` -> 90000, ``1.5m`` -> 1500000, ``500`` -> 500."""
  text = str(text).strip().lower()
  scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
  try:
    value = float(text[:-1] if scale > 1 else text) * scale
  except ValueError:
    raise UserError(f"{config}: {text!r} is not a count such as 90k or 5000") from None
  if value <= 0 or value != int(value):
    raise UserError(f"{config}: {text!r} is not a positive whole count")
  return int(value)


def parse_list(text, every: tuple, parse) -> tuple:
  """``all`` (``every``), or ``+``-separated items through ``parse``; duplicates dropped, order kept."""
  text = str(text)
  items = every if text == "all" else [parse(t) for t in text.split("+") if t]
  return tuple(dict.fromkeys(items))


def parse_arg(arg: str | None, **defaults):
  """Parses ``'k=v,k2=v2'`` (the part after ``config.py:``) into a ConfigDict over ``defaults``.

  Values are Python literals where they parse as one (``3``, ``True``, ``'x'``), else strings; a bare
  ``k`` means ``k=True``. Unknown keys raise, naming the key and the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise UserError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    if not _:
      parsed = True
    else:
      try:
        parsed = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        parsed = value
    out[key] = type(defaults[key])(parsed) if defaults[key] is not None else parsed
  return out
