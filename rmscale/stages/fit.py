"""Stage ``fit``: functional forms per proxy, coefficient trends in RM size, plots and summary.md."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from rmscale import checks, curves, fs, methods, provenance, results, rng
from rmscale.scaling import fit as fit_lib
from rmscale.scaling import plots
from rmscale.stages import common, proxies

RESULTS = ("results", "fits.jsonl")
_log = logging.getLogger(__name__)
KEYS = ("rm_size", "rm_params", "data_size", "seed", "name")


def validate(config, devices: int) -> None:
  del devices
  checks.count(config, "fit.num_bootstrap", minimum=0)


def fit_curves(records: list[dict], num_boot: int, seed: int) -> list[dict]:
  """One row per curve (method, run): coefficients, peak, fit quality and bootstrap intervals.

  Each curve is fitted with its method's form (``rmscale.methods``). A curve the form cannot be
  fitted to (e.g. fewer than two distinct KL > 0) gets a row with ``fitted=False`` and the reason
  instead of coefficients; the other curves are fitted as usual.
  """
  rows = []
  boot_rng = rng.numpy(seed, "fit", "bootstrap")
  per_unit = curves.per_prompt(records)
  for (method, name), recs in curves.group(records).items():
    form = methods.get(method).form
    d = np.sqrt([r["kl"] for r in recs])
    gold = np.array([r["gold"] for r in recs])
    row = {"method": method, **{k: recs[0][k] for k in KEYS}}
    try:
      f = fit_lib.fit_curve(form, d, gold)
    except fit_lib.FitError as e:
      _log.warning("%s curve of %s not fitted: %s", method, name, e)
      rows.append({**row, "fitted": False, "reason": str(e), "n_points": len(recs)})
      continue
    row.update(fitted=True, **f.to_dict())
    units = per_unit.get((method, name))
    if units is not None and num_boot:
      boot = fit_lib.bootstrap_fit(form, d, units, num_boot, boot_rng)
      for coef, (lo, hi) in boot.intervals.items():
        row[f"{coef}_lo"], row[f"{coef}_hi"] = lo, hi
    rows.append(row)
  return rows


def fitted_rows(rows: list[dict]) -> list[dict]:
  """The rows of curves that were fitted (rows of fits.jsonl written before ``fitted`` existed are)."""
  return [r for r in rows if r.get("fitted", True)]


def trends(rows: list[dict]) -> list[dict]:
  """alpha and beta against log RM size, per method and data size (needs >= 2 sizes)."""
  out = []
  groups = defaultdict(list)
  for r in rows:
    groups[(r["method"], r["data_size"])].append(r)
  for (method, data_size), rs in sorted(groups.items()):
    if len({r["rm_params"] for r in rs}) < 2:
      continue
    for coef in ("alpha", "beta"):
      t = fit_lib.coefficient_trend([r["rm_params"] for r in rs], [r[coef] for r in rs])
      out.append(
        {
          "method": method,
          "data_size": data_size,
          "coef": coef,
          "slope_per_efold": t.slope,
          "slope_se": t.slope_se,
          "r2": t.r2,
        }
      )
  return out


def _fmt(x, spec=".3f") -> str:
  return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def summary_markdown(
  ctx: common.Context,
  stage_info: dict,
  rm_records,
  fit_rows,
  trend_rows,
  method_rows=(),
  study=(),
  study_rows=(),
) -> str:
  lines = ["# rmscale experiment summary", "", f"workdir: `{ctx.workdir}`", ""]
  gold = stage_info.get("gold", {})
  lab = stage_info.get("label", {})
  lines += ["## Gold RM", "", f"- kind: {gold.get('kind', ctx.config.gold.kind)}"]
  if "heldout_accuracy" in gold:
    # A checkpoint gold (kind 'hf') is measured on the dataset's human labels, not the utility.
    against = (
      "the dataset's human labels" if gold.get("kind") == "hf" else "human-utility comparisons"
    )
    lines.append(f"- held-out accuracy on {against}: {gold['heldout_accuracy']:.3f}")
  if "gold_utility_agreement" in lab:
    lines.append(
      f"- agreement with the human utility on policy-sample pairs: {lab['gold_utility_agreement']:.3f}"
    )
  lines += [
    "",
    "## Proxy reward models",
    "",
    "| proxy | non-emb params | comparisons | seed | val loss | val acc |",
    "|---|---|---|---|---|---|",
  ]
  for r in sorted(rm_records, key=lambda r: (r["data_size"], r["rm_params"], r["seed"])):
    lines.append(
      f"| {r['rm_size']} | {r['rm_params']:,} | {r['data_size']:,} | {r['seed']} | "
      f"{r['val_loss']:.4f} | {r['val_accuracy']:.3f} |"
    )
  lines += [
    "",
    "## Fitted functional forms (gold score vs d = sqrt(KL))",
    "",
    "BoN: R = d(alpha - beta d); RL: R = d(alpha - beta log d). Intervals: 95% bootstrap over prompts.",
    "",
    "| method | proxy | comparisons | alpha | beta | d* | R* | r2 |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in fit_rows:
    if not r.get("fitted", True):
      lines.append(
        f"| {r['method']} | {r['rm_size']} | {r['data_size']:,} | not fitted: {r['reason']} "
        "| | | | |"
      )
      continue
    ci = lambda k: (
      f" [{_fmt(r.get(k + '_lo'))}, {_fmt(r.get(k + '_hi'))}]" if k + "_lo" in r else ""
    )  # noqa: E731
    lines.append(
      f"| {r['method']} | {r['rm_size']} | {r['data_size']:,} | {_fmt(r['alpha'])}{ci('alpha')} | "
      f"{_fmt(r['beta'])}{ci('beta')} | {_fmt(r['d_star'])} | {_fmt(r['r_star'])} | {_fmt(r['r2'])} |"
    )
  if method_rows:
    lines += [
      "",
      "## Methods side by side (gold peak, the KL spent on it, and which form fits)",
      "",
      "Peak: the highest evaluated gold (+- its standard error over prompts) and its KL in nats. "
      "r2 of each form fitted to the curve: the law that describes the method has the higher r2.",
      "",
      "| method | run | peak gold | KL at peak | final gold | max KL | r2 BoN form | r2 RL form |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(method_rows, key=lambda r: (r["rm_params"], r["name"], r["method"])):
      lines.append(
        f"| {r['method']} | {r['name']} | {r['peak_gold']:+.3f} +- {_fmt(r['peak_gold_se'])} | "
        f"{r['peak_kl']:.2f} | {r['final_gold']:+.3f} | {r['max_kl']:.2f} | "
        f"{_fmt(r['r2_bon'])} | {_fmt(r['r2_rl'])} |"
      )
  if trend_rows:
    lines += [
      "",
      "## Coefficients vs RM size (slope per e-fold of parameters)",
      "",
      "| method | comparisons | coefficient | slope | se | r2 |",
      "|---|---|---|---|---|---|",
    ]
    for t in trend_rows:
      lines.append(
        f"| {t['method']} | {t['data_size']:,} | {t['coef']} | {t['slope_per_efold']:+.4f} | "
        f"{_fmt(t['slope_se'], '.4f')} | {_fmt(t['r2'])} |"
      )
  if study:
    lines += [
      "",
      f"## KL-penalty study ({study[0]['method']} against one proxy, fixed KL coefficients)",
      "",
      "Does the penalty move the gold-vs-KL frontier, or only stop optimisation earlier?",
      "",
      "| kl_coef | final KL (nats) | final gold | peak gold (iteration) | alpha_RL | beta_RL |",
      "|---|---|---|---|---|---|",
    ]
    fits_by_name = {r["name"]: r for r in study_rows}
    for name in sorted(
      {r["name"] for r in study}, key=lambda n: min(r["kl_coef"] for r in study if r["name"] == n)
    ):
      recs = sorted((r for r in study if r["name"] == name), key=lambda r: r["iteration"])
      best = max(recs, key=lambda r: r["gold"])
      f = fits_by_name.get(name, {})
      lines.append(
        f"| {recs[0]['kl_coef']:g} | {recs[-1]['kl']:.2f} | {recs[-1]['gold']:+.3f} | "
        f"{best['gold']:+.3f} ({best['iteration']}) | {_fmt(f.get('alpha'))} | {_fmt(f.get('beta'))} |"
      )
  lines += [
    "",
    "Plots: `plots/score_vs_sqrt_kl.png`, `plots/methods.png`, `plots/coefficients_vs_size.png`, "
    "`plots/rm_validation.png`, `plots/gold_vs_proxy.png`"
    + (", `plots/kl_penalty.png`" if study else "")
    + ".",
    "",
  ]
  return "\n".join(lines)


def _read_optional(ctx: common.Context, parts: tuple) -> list[dict]:
  path = ctx.path(*parts)
  return results.read_jsonl(path) if fs.exists(path) else []


def method_rows(records: list[dict]) -> list[dict]:
  """Per curve: its empirical gold peak, the KL spent to reach it, and how well each form fits it
  (r2 of the best-of-n and of the RL form), so a reader sees which law describes which method."""
  rows = []
  for (method, name), recs in curves.group(records).items():
    best = max(recs, key=lambda r: r["gold"])
    d = np.sqrt([r["kl"] for r in recs])
    gold = np.array([r["gold"] for r in recs])
    row = {
      "method": method,
      "name": name,
      "rm_params": recs[0]["rm_params"],
      "peak_gold": best["gold"],
      "peak_gold_se": best.get("gold_se", float("nan")),
      "peak_kl": best["kl"],
      "final_gold": recs[-1]["gold"],
      "max_kl": recs[-1]["kl"],
    }
    for form in fit_lib.FORMS:
      try:
        row[f"r2_{form}"] = fit_lib.fit_curve(form, d, gold).r2
      except fit_lib.FitError:
        row[f"r2_{form}"] = float("nan")
    rows.append(row)
  return rows


def run(ctx: common.Context) -> dict:
  records = curves.load(ctx.workdir)
  study = curves.load(ctx.workdir, curves.STUDY_FILE)
  rm_records = proxies.load(ctx)
  num_boot, seed = ctx.config.fit.num_bootstrap, ctx.config.seed
  fit_rows = fit_curves(records, num_boot, seed)
  study_rows = fit_curves(study, num_boot, seed)
  titles = methods.titles()
  if study:
    results.write_jsonl(ctx.path("results", "kl_study_fits.jsonl"), study_rows)
    plots.plot_score_vs_sqrt_kl(
      study,
      fitted_rows(study_rows),
      ctx.path("plots", "kl_penalty.png"),
      colour_by="kl_coef",
      titles=titles,
    )
  fitted = fitted_rows(fit_rows)
  trend_rows = trends(fitted)
  by_method = method_rows(records)
  results.write_jsonl(ctx.path(*RESULTS), fit_rows)
  results.write_jsonl(ctx.path("results", "trends.jsonl"), trend_rows)
  results.write_jsonl(ctx.path("results", "methods.jsonl"), by_method)
  plots.plot_score_vs_sqrt_kl(
    records, fitted, ctx.path("plots", "score_vs_sqrt_kl.png"), titles=titles
  )
  plots.plot_methods(records, fitted, ctx.path("plots", "methods.png"), titles=titles)
  plots.plot_gold_vs_proxy(records, ctx.path("plots", "gold_vs_proxy.png"), titles=titles)
  plots.plot_rm_validation(rm_records, ctx.path("plots", "rm_validation.png"))
  if len({r["rm_params"] for r in fitted}) > 1:
    plots.plot_coefficients_vs_size(
      fitted, ctx.path("plots", "coefficients_vs_size.png"), titles=titles
    )
  # From the stages' markers, so a fit run on its own (`--config.stages=fit`) describes the whole run.
  info = {}
  for name in ("gold", "label"):
    marker = ctx.path("stages", f"{name}.json")
    if fs.exists(marker):
      info[name] = results.read_json(marker)
  text = summary_markdown(ctx, info, rm_records, fit_rows, trend_rows, by_method, study, study_rows)
  text += "\n".join(["", *provenance.markdown(_read_optional(ctx, (provenance.FILE,)))])
  results.write_text(ctx.path("summary.md"), text)
  missing = len(fit_rows) - len(fitted)
  headline = f"{len(fitted)} curves fitted" + (f", {missing} not fitted" if missing else "")
  return {"num_fits": len(fitted), "num_not_fitted": missing, "headline": headline}
