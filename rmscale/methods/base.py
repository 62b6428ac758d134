"""What a method is: its name, its config section with defaults, how it runs against one proxy, and
the functional form its gold curve is fitted with. ``rmscale.methods`` maps names to methods."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from rmscale.errors import UserError


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a method: against ``proxy`` (a proxies-stage record), named ``name`` (the proxy's
  name, or ``<proxy>_kl<coef>`` in a KL study), with the reward's KL coefficient ``kl_coef``."""

  proxy: Mapping[str, Any]
  name: str
  kl_coef: float = 0.0


@dataclasses.dataclass(frozen=True)
class Method:
  """An alignment method measured on the gold-vs-KL axis.

  ``run(method, ctx, section, run, reference) -> records`` returns the curve of one run in the
  schema of ``rmscale.curves`` (resumable: it caches its records and checkpoints under
  ``optimise/<name>/<run>/``). ``section`` is ``config.optimise.<name>``: ``defaults`` under the
  user's keys. ``validate(config, devices)`` checks that section (the config has every method's
  section filled in, so ``checks.positive(config, "optimise.ppo.clip_eps")`` names the key a user
  would fix). ``programs(method, ctx, section, rm_size)`` returns ``[(label, batch, compiled)]``:
  the jitted programs a run against a proxy of ``rm_size`` compiles, compiled on abstract inputs
  for ``ctx.mesh`` (``rmscale.aot``'s per-device memory report reads them).
  """

  name: str
  title: str  # For plots and the summary.
  form: str  # The functional form of its gold curve (scaling.fit): 'bon' or 'rl'.
  x: str  # What indexes its curve's points: 'n' or 'iteration'.
  defaults: Mapping[str, Any]
  run: Callable[..., list[dict]]
  validate: Callable[[ml_collections.ConfigDict, int], None] = lambda config, devices: None
  programs: Callable[..., list] | None = None
  kl_penalised: bool = False  # Its reward has a KL coefficient (the KL study can vary it).


def section(method: Method, given: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """The method's config section: its defaults overridden by ``given``; unknown keys are errors."""
  out = ml_collections.ConfigDict(dict(method.defaults))
  given = dict(given or {})
  unknown = sorted(set(given) - set(method.defaults))
  if unknown:
    raise UserError(
      f"config.optimise.{method.name} has unknown keys {unknown}; known: {sorted(method.defaults)}"
    )
  for k, v in given.items():
    out[k] = v
  return out
