"""Every alignment method on one gold-vs-KL axis: the registry, name -> ``Method``.

A method is one module defining ``METHOD`` (``rmscale.methods.base.Method``): its config section
and defaults, how one run against one proxy goes, and its gold curve's functional form. Adding a
method is adding its module and one line below; the ``optimise`` stage, ``fit``, the plots, the
summary and ``rmscale.report`` read everything else from here.
"""

from __future__ import annotations

import ml_collections

from rmscale.errors import UserError
from rmscale.methods import base, bon, policy_gradient, ppo, rejection
from rmscale.methods.base import Method, Run

REGISTRY: dict[str, Method] = {
  m.name: m
  for m in (
    bon.METHOD,
    ppo.METHOD,
    *policy_gradient.METHODS,  # reinforce, remax, rloo, grpo
    rejection.METHOD,
  )
}

__all__ = ["REGISTRY", "Method", "Run", "get", "section", "sections", "titles"]


def get(name: str) -> Method:
  if name not in REGISTRY:
    raise UserError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}")
  return REGISTRY[name]


def section(config, name: str) -> ml_collections.ConfigDict:
  """``config.optimise.<name>``: the method's defaults under the config's own keys."""
  return base.section(get(name), config.optimise.get(name))


def sections(names=None) -> dict[str, dict]:
  """Default sections of ``names`` (default: every method), for config files."""
  return {n: dict(get(n).defaults) for n in (names if names is not None else REGISTRY)}


def titles() -> dict[str, str]:
  return {n: m.title for n, m in REGISTRY.items()}
