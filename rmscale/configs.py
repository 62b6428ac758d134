"""Config helpers: ``get_config(arg)`` argument parsing and start-up validation of experiment configs."""

from __future__ import annotations

import ast

import ml_collections


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
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    if not _:
      parsed = True
    else:
      try:
        parsed = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        parsed = value
    out[key] = type(defaults[key])(parsed) if defaults[key] is not None else parsed
  return out
