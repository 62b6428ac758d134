"""Figures for the overoptimization experiment, drawn from plain result records.

Every function takes the flat dicts the pipeline writes to results/*.jsonl (one per point, the
schema of `rmscale.curves`: `method`, `form` ('bon' | 'rl', the functional form fitted to it),
`rm_size` label, `rm_params`, `data_size`, `seed`, `kl`, `proxy`, `gold`, optional `*_se`), so a
figure can be redrawn from the jsonl alone, in a notebook or on a laptop. Panels are titled by
`titles` (method -> title; default: the method's name). Records without `form` whose method is a
form's name ('bon', 'rl') are fitted with that form.
Figures are built on `matplotlib.figure.Figure` rather than pyplot: no global state, no GUI
backend, safe to call from any thread; PNGs are rendered by Agg and written atomically.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from rmscale import results
from rmscale.scaling import fit as fit_lib

_CHANCE = {"val_loss": math.log(2.0), "val_accuracy": 0.5}  # A coin-flip RM.
_DPI = 110


def _save_atomic(fig: Figure, path) -> str:
  """Render with Agg and write atomically, so readers never see half a PNG."""
  path = os.fspath(path)
  results.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))
  return path


def _check_records(
  records: Iterable[Mapping[str, Any]], required: Sequence[str], what: str
) -> list[Mapping[str, Any]]:
  records = list(records) if records is not None else []
  if not records:
    raise ValueError(f"{what}: no records to plot")
  for i, rec in enumerate(records):
    if not isinstance(rec, Mapping):
      raise ValueError(f"{what}: record {i} is a {type(rec).__name__}, not a dict")
    missing = [k for k in required if rec.get(k) is None]
    if missing:
      raise ValueError(f"{what}: record {i} lacks {missing}: {dict(rec)}")
  return records


def _method(rec: Mapping[str, Any]) -> str:
  return rec.get("method", rec.get("form"))


def _form(rec: Mapping[str, Any]) -> str:
  form = rec.get("form", rec.get("method"))
  if form not in fit_lib.FORMS:
    raise ValueError(f"record has no functional form in {fit_lib.FORMS}: {dict(rec)}")
  return form


def _title(titles: Mapping[str, str] | None, method: str) -> str:
  return (titles or {}).get(method, method)


def _format_count(n: float) -> str:
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= div:
      return f"{n / div:.3g}{unit}"
  return f"{n:g}"


def _numeric(value) -> float:
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, float, np.integer, np.floating))
    or not np.isfinite(value)
  ):
    raise ValueError(f"colour key values must be finite numbers, got {value!r}")
  return float(value)


def _curve_order(item):
  """Legend order: ascending colour value (small RMs first), then the rest of the key."""
  key = item[0]
  return (_numeric(key[1]), str(key[2:]))


def _colours(values: Iterable[float]) -> dict[float, Any]:
  """Viridis by log value (dark = small, green-yellow = large), by rank when some value is <= 0
  (e.g. a KL coefficient of 0); top end trimmed for legibility."""
  values = sorted(set(values), key=_numeric)
  cmap = matplotlib.colormaps["viridis"]
  if len(values) == 1:
    return {values[0]: cmap(0.35)}
  raw = np.asarray(values, dtype=np.float64)
  logs = np.log(raw) if raw.min() > 0 else np.arange(len(values), dtype=np.float64)
  span = logs.max() - logs.min()
  pos = (logs - logs.min()) / span if span > 0 else np.linspace(0, 1, len(values))
  return {v: cmap(0.85 * p) for v, p in zip(values, pos)}


def _colour_label(rec: Mapping[str, Any], colour_by: str) -> str:
  if colour_by == "rm_params":
    return str(rec.get("rm_size") or _format_count(rec["rm_params"]))
  if colour_by == "data_size":
    return f"{_format_count(rec['data_size'])} comparisons"
  return f"{colour_by}={rec[colour_by]}"


def _curves(records, colour_by: str):
  """Group records into lines: one per (method, rm_params, data_size, seed), sorted by KL."""
  groups = collections.defaultdict(list)
  for rec in records:
    key = (
      _method(rec),
      rec[colour_by],
      rec.get("rm_params"),
      rec.get("data_size"),
      rec.get("seed"),
    )
    groups[key].append(rec)
  for key in groups:
    groups[key].sort(key=lambda r: r["kl"])
  return groups


def _methods_present(records, titles: Mapping[str, str] | None) -> list[str]:
  """Methods in the records, in the order of ``titles`` (the registry's), then by name."""
  present = {_method(r) for r in records}
  order = list(titles or {})
  return sorted(present, key=lambda m: (order.index(m) if m in order else len(order), m))


def _panels(n: int, width: float = 5.0, height: float = 4.0, columns: int = 4):
  """``n`` axes in rows of at most ``columns``; unused cells of the last row are hidden."""
  rows, cols = math.ceil(n / columns), min(n, columns)
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes[:n]


def _fit_matches(row: Mapping[str, Any], rec: Mapping[str, Any]) -> bool:
  """A fit row applies to a curve when method agrees and every identifying key it carries agrees."""
  if _method(row) != _method(rec):
    return False
  return all(
    row[k] == rec.get(k)
    for k in ("rm_params", "rm_size", "data_size", "seed")
    if row.get(k) is not None
  )


def plot_score_vs_sqrt_kl(
  records, fits, path, *, colour_by: str = "rm_params", titles: Mapping[str, str] | None = None
) -> str:
  """Gold (solid) and proxy (dashed) score vs sqrt(KL), one panel per method (Gao et al. Fig. 1).

  Args:
    records: result records with method, kl, gold, `colour_by` (and proxy, optional *_se).
    fits: fit rows (e.g. `{**Fit.to_dict(), 'rm_params': ...}`) with method (or form), alpha,
      beta and the identifying keys they were fitted on; each is drawn as a thin light gold
      curve under every matching data curve. None or [] draws no fits.
    path: PNG to write.
    colour_by: 'rm_params' (RM-size sweep) or 'data_size' (data sweep): one colour per value on
      a log-viridis scale, dark = small.
  Returns the path written.
  """
  records = _check_records(records, ("method", "kl", "gold", colour_by), "plot_score_vs_sqrt_kl")
  fits = _check_records(fits, ("alpha", "beta"), "plot_score_vs_sqrt_kl fits") if fits else []
  for row in fits:
    _form(row)
  colours = _colours(r[colour_by] for r in records)
  methods = _methods_present(records, titles)
  fig, axes = _panels(len(methods))
  for ax, method in zip(axes, methods):
    labelled = set()
    for key, curve in sorted(_curves(records, colour_by).items(), key=_curve_order):
      if key[0] != method:
        continue
      colour = colours[key[1]]
      d = np.sqrt([r["kl"] for r in curve])
      gold = np.array([r["gold"] for r in curve], dtype=np.float64)
      label = None if key[1] in labelled else _colour_label(curve[0], colour_by)
      labelled.add(key[1])
      ax.plot(d, gold, "-", color=colour, lw=1.8, label=label)
      if all(r.get("gold_se") is not None for r in curve):
        se = np.array([r["gold_se"] for r in curve], dtype=np.float64)
        ax.fill_between(d, gold - se, gold + se, color=colour, alpha=0.15, lw=0)
      if all(r.get("proxy") is not None for r in curve):
        ax.plot(d, [r["proxy"] for r in curve], "--", color=colour, lw=1.2)
      for row in fits:
        if _fit_matches(row, curve[0]) and row.get(colour_by, key[1]) == key[1]:
          d_fit = np.linspace(0.0, d.max(), 200)
          ax.plot(
            d_fit,
            fit_lib.predict(_form(row), row["alpha"], row["beta"], d_fit),
            "-",
            color=colour,
            lw=0.8,
            alpha=0.45,
          )
    ax.axhline(0.0, color="0.7", lw=0.6, zorder=0)
    ax.set_title(_title(titles, method))
    ax.set_xlabel("sqrt(KL) [sqrt nats]")
    ax.set_ylabel("score (gold solid, proxy dashed)")
    top = ax.secondary_xaxis("top", functions=(np.square, lambda k: np.sqrt(np.clip(k, 0, None))))
    top.set_xlabel("KL [nats]")
    ax.legend(title=colour_by.replace("_", " "), fontsize="small")
  return _save_atomic(fig, path)


def _interval(row: Mapping[str, Any], name: str):
  lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
  if lo is not None and hi is not None:
    return lo, hi
  se = row.get(f"{name}_se")
  if se is not None and np.isfinite(se):
    return row[name] - se, row[name] + se
  return None


def plot_coefficients_vs_size(fit_table, path, *, titles: Mapping[str, str] | None = None) -> str:
  """alpha and beta against RM parameters (log x), one line per method (and data size if swept).

  Rows carry method (or form), rm_params, alpha, beta, optionally data_size and error bars as
  `<coef>_lo` / `<coef>_hi` (e.g. bootstrap intervals) or `<coef>_se` (drawn as +-1 SE). A dotted
  line is the least-squares trend in log size (`fit.coefficient_trend`), the paper's claim that
  coefficients move smoothly with size.
  """
  rows = _check_records(fit_table, ("rm_params", "alpha", "beta"), "plot_coefficients_vs_size")
  for i, row in enumerate(rows):
    if _method(row) is None:
      raise ValueError(f"plot_coefficients_vs_size: row {i} has no method/form: {dict(row)}")
    if not row["rm_params"] > 0:
      raise ValueError(f"plot_coefficients_vs_size: row {i} has rm_params <= 0")
  data_sizes = {r.get("data_size") for r in rows}
  lines = collections.defaultdict(list)
  for row in rows:
    lines[(_method(row), row.get("data_size") if len(data_sizes) > 1 else None)].append(row)
  markers = "osD^v<>p*h"
  styles = {
    m: (markers[i % len(markers)], f"C{i % 10}")
    for i, m in enumerate(_methods_present(rows, titles))
  }
  # With a data sweep, more data is drawn more opaque within each method's colour.
  swept = sorted(s for s in data_sizes if s is not None) if len(data_sizes) > 1 else []
  shade = {s: 0.35 + 0.65 * i / max(len(swept) - 1, 1) for i, s in enumerate(swept)}
  fig, axes = _panels(2, width=4.8)
  for ax, name in zip(axes, ("alpha", "beta")):
    for (method, data_size), line in sorted(lines.items(), key=lambda kv: str(kv[0])):
      line = sorted(line, key=lambda r: r["rm_params"])
      x = np.array([r["rm_params"] for r in line], dtype=np.float64)
      y = np.array([r[name] for r in line], dtype=np.float64)
      marker, colour = styles[method]
      label = _title(titles, method) + (f", {_format_count(data_size)}" if data_size else "")
      ax.plot(
        x, y, marker=marker, color=colour, lw=1.5, label=label, alpha=shade.get(data_size, 1.0)
      )
      bars = [_interval(r, name) for r in line]
      if all(b is not None for b in bars):
        lo, hi = np.array(bars, dtype=np.float64).T
        # Clipped: a collapsed bootstrap interval can sit a rounding error off the point estimate.
        ax.errorbar(
          x,
          y,
          yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)],
          fmt="none",
          ecolor=colour,
          elinewidth=1,
          capsize=2,
        )
      if np.unique(x).size >= 2:
        trend = fit_lib.coefficient_trend(x, y)
        xs = np.geomspace(x.min(), x.max(), 50)
        ax.plot(xs, trend.predict(xs), ":", color=colour, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("RM parameters")
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs RM size")
    ax.legend(fontsize="small")
  return _save_atomic(fig, path)


def plot_rm_validation(
  records, path, *, metrics: Sequence[str] = ("val_loss", "val_accuracy")
) -> str:
  """RM validation metrics vs RM parameters (log x), one line per training-data size.

  Each record is one trained RM (rm_params, data_size, optional seed, and any of `metrics`).
  Seeds are shown as faint dots with their mean as the line, since RMs trained on the same data
  with different seeds disagree. The chance level (log 2 loss, 50% accuracy) is a grey line.
  """
  records = _check_records(records, ("rm_params", "data_size"), "plot_rm_validation")
  present = [m for m in metrics if any(r.get(m) is not None for r in records)]
  if not present:
    raise ValueError(f"plot_rm_validation: no record has any of the metrics {tuple(metrics)}")
  colours = _colours(r["data_size"] for r in records)
  fig, axes = _panels(len(present), width=4.8)
  for ax, metric in zip(axes, present):
    by_data = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
      if r.get(metric) is not None:
        by_data[r["data_size"]][r["rm_params"]].append(float(r[metric]))
    for data_size in sorted(by_data):
      per_size = by_data[data_size]
      x = np.array(sorted(per_size), dtype=np.float64)
      for xi in x:
        ax.scatter(
          np.full(len(per_size[xi]), xi),
          per_size[xi],
          s=10,
          alpha=0.35,
          color=colours[data_size],
          lw=0,
        )
      ax.plot(
        x,
        [np.mean(per_size[xi]) for xi in x],
        "-o",
        ms=3,
        color=colours[data_size],
        label=f"{_format_count(data_size)} comparisons",
      )
    if metric in _CHANCE:
      ax.axhline(_CHANCE[metric], color="0.6", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("RM parameters")
    ax.set_ylabel(metric.replace("_", " "))
    ax.legend(fontsize="small")
  return _save_atomic(fig, path)


def plot_gold_vs_proxy(
  records, path, *, colour_by: str = "rm_params", titles: Mapping[str, str] | None = None
) -> str:
  """Gold score against proxy score along each optimisation curve, one panel per method.

  While the proxy tracks the gold the curve climbs; where it bends over, optimising the proxy
  has stopped buying gold score (the Goodhart gap). Arrow-free: KL increases along each line.
  """
  records = _check_records(
    records, ("method", "kl", "proxy", "gold", colour_by), "plot_gold_vs_proxy"
  )
  colours = _colours(r[colour_by] for r in records)
  methods = _methods_present(records, titles)
  fig, axes = _panels(len(methods), width=4.5)
  for ax, method in zip(axes, methods):
    labelled = set()
    for key, curve in sorted(_curves(records, colour_by).items(), key=_curve_order):
      if key[0] != method:
        continue
      label = None if key[1] in labelled else _colour_label(curve[0], colour_by)
      labelled.add(key[1])
      ax.plot(
        [r["proxy"] for r in curve],
        [r["gold"] for r in curve],
        "-",
        marker=".",
        color=colours[key[1]],
        lw=1.4,
        ms=3,
        label=label,
      )
    ax.axhline(0.0, color="0.7", lw=0.6, zorder=0)
    ax.set_title(_title(titles, method))
    ax.set_xlabel("proxy score")
    ax.set_ylabel("gold score")
    ax.legend(title=colour_by.replace("_", " "), fontsize="small")
  return _save_atomic(fig, path)


def plot_methods(records, fits, path, *, titles: Mapping[str, str] | None = None) -> str:
  """Every method side by side on the gold-vs-sqrt(KL) axis, one panel per proxy.

  Gold (solid, +-1 SE band) and the method's fitted form (thin) per method, in one colour per
  method, so where each method peaks and how much KL it spends to get there read off directly.
  Proxies are ordered by size, then data size; runs of a KL study are not drawn (their own plot).
  """
  records = _check_records(records, ("method", "name", "kl", "gold"), "plot_methods")
  fits = list(fits or [])
  methods = _methods_present(records, titles)
  colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
  proxies = sorted(
    {r["name"] for r in records},
    key=lambda n: next((r["rm_params"], r["data_size"], n) for r in records if r["name"] == n),
  )
  fig, axes = _panels(len(proxies), width=4.6, columns=3)
  for ax, proxy in zip(axes, proxies):
    for method in methods:
      curve = sorted(
        (r for r in records if r["name"] == proxy and _method(r) == method), key=lambda r: r["kl"]
      )
      if not curve:
        continue
      d = np.sqrt([r["kl"] for r in curve])
      gold = np.array([r["gold"] for r in curve], dtype=np.float64)
      ax.plot(
        d, gold, "-", marker=".", ms=3, color=colour[method], lw=1.6, label=_title(titles, method)
      )
      se = np.array([r.get("gold_se", np.nan) for r in curve], dtype=np.float64)
      if np.isfinite(se).all():
        ax.fill_between(d, gold - se, gold + se, color=colour[method], alpha=0.12, lw=0)
      for row in fits:
        if _method(row) == method and row.get("name") == proxy:
          d_fit = np.linspace(0.0, d.max(), 200)
          ax.plot(
            d_fit,
            fit_lib.predict(_form(row), row["alpha"], row["beta"], d_fit),
            "-",
            color=colour[method],
            lw=0.8,
            alpha=0.5,
          )
    ax.axhline(0.0, color="0.7", lw=0.6, zorder=0)
    ax.set_title(f"proxy {proxy}")
    ax.set_xlabel("sqrt(KL) [sqrt nats]")
    ax.set_ylabel("gold score")
    ax.legend(fontsize="small")
  return _save_atomic(fig, path)
