"""Stage ``optimise``: every method of ``optimise.methods`` against every proxy, one curve each.

Methods come from the registry (``rmscale.methods``); each run is resumable on its own (records and
checkpoints under ``optimise/<method>/<run>/``), so adding a method to a finished workdir runs only
the new method's runs. All curves go to ``results/curves.jsonl`` (schema: ``rmscale.curves``).

The KL study (``optimise.kl_study``) reruns one KL-penalised method against one proxy with several
fixed KL coefficients: Gao et al. find the penalty acts like early stopping rather than moving the
gold-vs-KL frontier. Its curves go to ``results/kl_study.jsonl``.
"""

from __future__ import annotations

import copy

from rmscale import checks, curves, methods, results
from rmscale.errors import UserError
from rmscale.methods import Run
from rmscale.stages import common, proxies, reference


def with_sections(config):
  """A copy of ``config`` with every configured method's section filled in from its defaults."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for name in out.optimise.methods:
      out.optimise[name] = methods.section(config, name)
  return out


def validate(config, devices: int) -> None:
  """config.optimise: registered methods, known proxies, shared batch sizes and schedule, the KL
  study, and each method's own section."""
  names = checks.value(config, "optimise.methods")
  if isinstance(names, str) or not names:
    checks.fail("optimise.methods", names, "must be a non-empty list of method names")
  for name in names:
    if name not in methods.REGISTRY:
      checks.fail(
        "optimise.methods", tuple(names), f"names {name!r}; registered: {sorted(methods.REGISTRY)}"
      )
  for key in ("rollout_batch_size", "minibatch_size"):
    checks.divisible(config, f"optimise.{key}", devices)
  o = config.optimise
  if o.rollout_batch_size % o.minibatch_size:
    checks.fail(
      "optimise.minibatch_size", o.minibatch_size, "does not divide optimise.rollout_batch_size"
    )
  for key in ("iterations", "eval_every", "log_every", "save_every"):
    checks.count(config, f"optimise.{key}")
  checks.count(config, "optimise.warmup_steps", minimum=0)
  checks.non_negative(config, "optimise.kl_coef")
  known = proxies.names(config)
  unknown = [n for n in checks.value(config, "optimise.proxies") if n not in known]
  if unknown:
    raise UserError(
      f"config.optimise.proxies names {unknown}, which are not proxies of this config: {sorted(known)}"
    )
  study = checks.value(config, "optimise.kl_study")
  if study.method:
    if study.method not in names or not methods.get(study.method).kl_penalised:
      checks.fail(
        "optimise.kl_study.method",
        study.method,
        "must be one of optimise.methods whose reward has a KL penalty",
      )
    if study.proxy not in known:
      checks.fail(
        "optimise.kl_study.proxy", study.proxy, f"is not one of the proxies {sorted(known)}"
      )
    for coef in study.coefs:
      if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
        raise UserError(f"config.optimise.kl_study.coefs has {coef!r}; coefficients must be >= 0")
  full = with_sections(config)
  for name in names:
    methods.get(name).validate(full, devices)


def fingerprint(config) -> dict:
  """What this stage's results depend on beyond earlier stages: rerun when it changes."""
  return with_sections(config).optimise.to_dict()


def run(ctx: common.Context) -> dict:
  o = ctx.config.optimise
  ref = reference.load(ctx)
  by_name = {p["name"]: p for p in proxies.load(ctx)}
  targets = [by_name[n] for n in o.proxies] if o.proxies else list(by_name.values())
  records = []
  for name in o.methods:
    method, section = methods.get(name), methods.section(ctx.config, name)
    for p in targets:
      records += method.run(method, ctx, section, Run(p, p["name"], o.kl_coef), ref)
  results.write_jsonl(ctx.path(*curves.FILE), records)
  study = []
  if o.kl_study.method:
    method = methods.get(o.kl_study.method)
    section, p = methods.section(ctx.config, method.name), by_name[o.kl_study.proxy]
    for coef in sorted({o.kl_coef, *o.kl_study.coefs}):
      name = p["name"] if coef == o.kl_coef else f"{p['name']}_kl{coef:g}"
      study += method.run(method, ctx, section, Run(p, name, coef), ref)
  results.write_jsonl(ctx.path(*curves.STUDY_FILE), study)
  return {
    "num_runs": len(o.methods) * len(targets) + len(o.kl_study.coefs) * bool(o.kl_study.method),
    "methods": list(o.methods),
    "headline": common.gold_peak_headline(records),
  }
