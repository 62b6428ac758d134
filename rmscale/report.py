"""What the Colab notebooks call, so that they hold no logic of their own.

- the runtime: which accelerator JAX sees, and the quickstart config for given settings;
- the world, shown: prompts and the human writer's responses with their human utility;
- results from one workdir or every workdir under a sweep root, local or remote (``gs://...`` through
  ``etils.epath``, which uses TensorFlow's gfile or gcsfs), with per-prompt scores for bootstraps;
- over-optimised samples: prompts where best-of-n or an optimised policy (PPO, RLOO, ...) against a
  proxy wrote a worse answer (by the true utility) than the initial policy did, side by side with it;
- figures: fitted curves with bootstrap bands, and an extrapolated law against a held-out RM.

Displayed proxy and gold scores are relative to the initial policy (proxy shifted to mean 0; gold
to mean 0 and unit variance over the reference samples, as on the plots); utility is in its own
units (a perfect answer scores 4.5 with the default world).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
from typing import Mapping, Sequence

import numpy as np

from rmscale import curves, fs, methods, results
from rmscale.methods.iterative import EVAL_SAMPLES
from rmscale.scaling import analysis
from rmscale.stages.reference import SAMPLES

RESULT_KINDS = ("proxies", "curves", "kl_study", "fits", "trends", "methods")
PLOTS = (
  (
    "methods",
    "Every method side by side: gold against sqrt(KL), one panel per proxy, with each method's "
    "fitted functional form (thin lines).",
  ),
  (
    "score_vs_sqrt_kl",
    "Gold (solid) and proxy (dashed) score against sqrt(KL), one panel per method, one colour per "
    "proxy size, with the fitted functional forms (thin lines).",
  ),
  (
    "gold_vs_proxy",
    "Gold against proxy score along each curve: where it bends over, optimising the proxy "
    "no longer buys gold score.",
  ),
  (
    "coefficients_vs_size",
    "Fitted alpha and beta against proxy RM size (bootstrap intervals, dotted trend in log size).",
  ),
  ("kl_penalty", "The KL study: one method against one proxy with several fixed KL coefficients."),
  (
    "rm_validation",
    "Proxy validation loss and accuracy against RM size, per number of comparisons.",
  ),
)


# --- Runtime and config.


@dataclasses.dataclass(frozen=True)
class Runtime:
  platform: str  # 'tpu' | 'gpu' | 'cpu'
  num_devices: int
  device_kind: str

  def describe(self) -> str:
    name = {"tpu": "TPU", "gpu": "GPU", "cpu": "CPU"}[self.platform]
    advice = (
      "the full quickstart takes minutes on a CPU runtime; 'tiny' settings take seconds"
      if self.platform == "cpu"
      else "the full quickstart runs on the accelerator"
    )
    return f"Found {self.num_devices} {name} device(s) ({self.device_kind}): {advice}."


def runtime(devices=None) -> Runtime:
  """The accelerator JAX runs on (CUDA and ROCm both count as GPU)."""
  import jax

  devices = jax.devices() if devices is None else devices
  if not devices:
    raise ValueError("no JAX devices")
  platform = {"cuda": "gpu", "rocm": "gpu"}.get(devices[0].platform, devices[0].platform)
  if platform not in ("tpu", "gpu", "cpu"):
    raise ValueError(f"unknown JAX platform {devices[0].platform!r}")
  kinds = sorted({d.device_kind for d in devices})
  return Runtime(platform=platform, num_devices=len(devices), device_kind=", ".join(kinds))


def repo_root() -> str:
  """The checkout rmscale was installed from (configs/ ships with the repository, not the package)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.isfile(os.path.join(root, "configs", "quickstart.py")):
    raise FileNotFoundError(
      f"no configs/quickstart.py next to the installed package ({root}); install rmscale from a clone "
      "(git clone https://github.com/rmscale/rmscale && pip install -e rmscale)"
    )
  return root


def quickstart_config(settings: str = ""):
  """``configs/quickstart.py``'s config for ``settings`` ('' is the full quickstart, e.g. 'tiny,oracle')."""
  path = os.path.join(repo_root(), "configs", "quickstart.py")
  spec = importlib.util.spec_from_file_location("_rmscale_quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(settings or None)


# --- Tables.


def _cell(value, floatfmt: str) -> str:
  if isinstance(value, (float, np.floating)):
    return format(float(value), floatfmt)
  return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
  rows: Sequence[Mapping], columns: Sequence[str] | None = None, floatfmt: str = ".2f"
) -> str:
  """A markdown table of dict rows (columns default to the first row's keys)."""
  if not rows:
    raise ValueError("markdown_table: no rows")
  columns = list(columns or rows[0])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    missing = [c for c in columns if c not in r]
    if missing:
      raise ValueError(f"markdown_table: row lacks columns {missing}: {dict(r)}")
    lines.append("| " + " | ".join(_cell(r[c], floatfmt) for c in columns) + " |")
  return "\n".join(lines)


# --- The world.


def world_tour(world, n: int = 6, seed: int = 0) -> list[dict]:
  """``n`` training prompts with the human writer's responses, their features and human utility."""
  ex = world.sft_examples(np.random.default_rng(seed), n)
  utility = world.utility(ex["prompt_ids"], ex["response_ids"], ex["response_mask"])
  rows = []
  for (prompt, response), u in zip(
    world.texts(ex["prompt_ids"], ex["response_ids"], ex["response_mask"]), utility
  ):
    f = world.text_features(prompt, response)
    rows.append(
      {
        "prompt": prompt,
        "response": response,
        "words": f["words"],
        "requested": f["request"],
        "keyword uses": f["keyword_count"],
        "repeats": f["repeats"],
        "utility": float(u),
      }
    )
  return rows


# --- Loading results: one workdir, or every workdir under a sweep root; local or remote.


def _path(path):
  """An ``etils.epath.Path`` (local, gs://, ...), as the pipeline's ``fs`` helpers use."""
  return fs.as_path(path)


def _exists(p) -> bool:
  try:
    return fs.exists(p)
  except ImportError as e:  # fs names the path and the missing backend (gcsfs or tensorflow).
    raise ImportError(
      f"{e}; on Colab also authenticate (google.colab.auth.authenticate_user())"
    ) from None


def find_workdirs(root: str) -> dict[str, str]:
  """``{run name: workdir}``: ``{'': root}`` for one workdir, else every ``<root>/<run>`` with results."""
  p = _path(root)
  if not _exists(p):
    raise FileNotFoundError(f"no such workdir or sweep root: {root}")
  if _exists(p / "results"):
    return {"": str(p)}
  runs = {}
  if p.is_dir():
    runs = {
      c.name: str(c)
      for c in sorted(p.iterdir(), key=lambda c: c.name)
      if c.is_dir() and _exists(c / "results")
    }
  if not runs:
    raise ValueError(
      f"{root} is neither a workdir (no results/) nor a sweep root (no <run>/results/)"
    )
  return runs


def _read_jsonl(p) -> list[dict]:
  return results.read_jsonl(str(p))


def _read_npz(p, keep=lambda key: True) -> dict[str, np.ndarray]:
  return results.read_npz(str(p), keep)  # Remote: one read; local: only the kept arrays.


@dataclasses.dataclass
class Results:
  """Result records of one workdir or a sweep.

  In a sweep each record gains ``run`` and its ``name`` becomes ``<run>/<name>``, so curves of
  different runs stay apart. ``per_prompt[(method, name)]`` is the [prompts, points] gold score of a
  curve in increasing KL (from the records' ``gold_per_prompt``, which is moved there).
  """

  root: str
  runs: dict[str, str]
  records: dict[str, list[dict]]
  per_prompt: dict[tuple[str, str], np.ndarray]

  def curves(self, names: Sequence[str] | None = None) -> list[analysis.Curve]:
    """The curves of the methods ``names`` (default: all; the KL study apart: ``study_curves``)."""
    records = [r for r in self.records["curves"] if names is None or r["method"] in names]
    return analysis.curves(records, self.per_prompt)

  def study_curves(self) -> list[analysis.Curve]:
    return analysis.curves(self.records["kl_study"], self.per_prompt)

  def describe(self) -> str:
    """Markdown: what was loaded (runs, curves per method, RM sizes and data sizes)."""
    where = (
      f"{len(self.runs)} runs under `{self.root}`" if any(self.runs) else f"workdir `{self.root}`"
    )
    lines = [f"Loaded {where}:", ""]
    groups = [
      (m.title, [r for r in self.records["curves"] if r["method"] == name])
      for name, m in methods.REGISTRY.items()
    ]
    for title, recs in groups + [("KL-penalty study", self.records["kl_study"])]:
      if recs:
        sizes = sorted({(r["rm_params"], r.get("rm_size", "")) for r in recs})
        data = sorted({r["data_size"] for r in recs})
        boot = sum(key in self.per_prompt for key in {(r["method"], r["name"]) for r in recs})
        lines.append(
          f"- {title}: {len({r['name'] for r in recs})} curves ({boot} with per-prompt scores), "
          f"RM sizes {', '.join(s or f'{p:,}' for p, s in sizes)}; "
          f"comparisons {', '.join(f'{d:,}' for d in data)}"
        )
    return "\n".join(lines)


def load_results(root: str, *, per_prompt: bool = True) -> Results:
  """Reads ``results/*.jsonl`` (and, with ``per_prompt``, the per-prompt gold scores) of every run."""
  runs = find_workdirs(root)
  records = {k: [] for k in RESULT_KINDS}
  units: dict[tuple[str, str], np.ndarray] = {}
  for run, workdir in runs.items():
    w = _path(workdir)
    for kind in RESULT_KINDS:
      f = w / "results" / f"{kind}.jsonl"
      loaded = _read_jsonl(f) if _exists(f) else []
      if run:
        loaded = [
          {**r, "run": run, **({"name": f"{run}/{r['name']}"} if "name" in r else {})}
          for r in loaded
        ]
      if per_prompt and kind in ("curves", "kl_study"):
        units.update(curves.per_prompt(loaded))
      for r in loaded:
        r.pop("gold_per_prompt", None)
      records[kind] += loaded
  if not records["curves"]:
    raise ValueError(f"{root}: no optimisation curves yet (results/curves.jsonl)")
  return Results(root=str(root), runs=runs, records=records, per_prompt=units)


# --- Over-optimised samples.


def smallest_proxy(proxy_records: Sequence[Mapping], names: Sequence[str] | None = None) -> str:
  """The proxy most prone to over-optimisation: fewest parameters, then fewest comparisons, then seed."""
  recs = [r for r in proxy_records if names is None or r["name"] in names]
  if not recs:
    raise ValueError(f"no proxy records{'' if names is None else f' among {list(names)}'}")
  return min(recs, key=lambda r: (r["rm_params"], r["data_size"], r.get("seed", 0)))["name"]


def reference(samples: Mapping[str, np.ndarray]) -> curves.Reference:
  """The initial policy's score statistics (the recentring origin of every curve)."""
  return curves.Reference.from_samples(samples)


def _proxy_index(samples, proxy_name: str) -> int:
  names = [str(n) for n in samples["proxy_names"]]
  if proxy_name not in names:
    raise ValueError(f"proxy {proxy_name!r} did not score the reference samples; known: {names}")
  return names.index(proxy_name)


def bon_pairs(samples: Mapping[str, np.ndarray], proxy_name: str) -> tuple[dict, dict]:
  """(initial, best-of-N) per prompt: the first of the N initial-policy samples (a fair draw) and the
  sample the proxy ranks highest among all N, each with tokens and raw utility, gold and proxy."""
  k = _proxy_index(samples, proxy_name)
  proxy_PxN = samples["proxy"][k]
  P = proxy_PxN.shape[0]
  rows = np.arange(P)
  best_P = np.argmax(proxy_PxN, axis=1)

  def pick(idx_P):
    return {
      "prompt_ids": samples["prompt_ids"],
      "response_ids": samples["response_ids"][rows, idx_P],
      "response_mask": samples["response_mask"][rows, idx_P],
      "utility": samples["utility"][rows, idx_P],
      "gold": samples["gold"][rows, idx_P],
      "proxy": proxy_PxN[rows, idx_P],
    }

  return pick(np.zeros(P, np.int64)), pick(best_P)


def load_reference_samples(workdir: str) -> dict[str, np.ndarray]:
  """The initial policy's samples on the evaluation prompts (``reference/samples.npz``)."""
  p = _path(workdir).joinpath(*SAMPLES)
  if not _exists(p):
    raise FileNotFoundError(f"no reference samples at {p}; run the reference stage")
  return _read_npz(p)


def load_eval_samples(workdir: str, method: str, run_name: str) -> tuple[dict, dict]:
  """The initial and final policies' evaluation samples of one run of an iterative method
  (``optimise/<method>/<run>/*_samples.npz``)."""
  out = []
  for which in ("initial", "final"):
    p = _path(workdir) / "optimise" / method / run_name / EVAL_SAMPLES[which]
    if not _exists(p):
      raise FileNotFoundError(f"no {which} evaluation samples at {p}; run the optimise stage")
    out.append(_read_npz(p))
  return out[0], out[1]


def overoptimised(
  initial: Mapping,
  final: Mapping,
  world,
  reference: curves.Reference,
  proxy_name: str,
  *,
  k: int = 4,
  min_drop: float = 0.0,
) -> list[dict]:
  """Up to ``k`` prompts where the optimised sample has lower utility than the initial one, worst first.

  ``initial`` and ``final`` hold one sample per prompt row (same prompts, same order): prompt_ids,
  response_ids, response_mask and raw utility, gold and proxy scores. Rows show texts side by side
  with utility (raw), proxy and gold (relative to ``reference``: the proxy ``proxy_name``'s mean
  and the gold's mean and spread under the initial policy).
  """
  proxy_mean = reference.proxy[proxy_name]
  if not np.array_equal(initial["prompt_ids"], final["prompt_ids"]):
    raise ValueError("initial and final samples are for different prompts; pair them row by row")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  drop = np.asarray(initial["utility"], np.float64) - np.asarray(final["utility"], np.float64)
  order = [i for i in np.argsort(-drop, kind="stable") if drop[i] > min_drop][:k]
  texts = {}
  for name, s in (("initial", initial), ("optimised", final)):
    texts[name] = world.texts(
      s["prompt_ids"][order], s["response_ids"][order], s["response_mask"][order]
    )
  rows = []
  for j, i in enumerate(order):
    row = {"prompt": texts["initial"][j][0], "utility lost": float(drop[i])}
    for name, s in (("initial", initial), ("optimised", final)):
      row[f"{name} response"] = texts[name][j][1]
      row[f"{name} u/proxy/gold"] = (
        f"{float(s['utility'][i]):.2f} / {float(s['proxy'][i]) - proxy_mean:+.2f}"
        f" / {float(reference.gold_scores(s['gold'][i])):+.2f}"
      )
    rows.append(row)
  return rows


OVEROPTIMISED_COLUMNS = (
  "prompt",
  "initial response",
  "initial u/proxy/gold",
  "optimised response",
  "optimised u/proxy/gold",
  "utility lost",
)
FIT_COLUMNS = (
  "method",
  "name",
  "alpha",
  "alpha_lo",
  "alpha_hi",
  "beta",
  "beta_lo",
  "beta_hi",
  "d_star",
  "r_star",
  "r2",
)


def examples_markdown(rows: Sequence[Mapping]) -> str:
  """The side-by-side table of `overoptimised` rows, or a sentence when no prompt lost utility."""
  if not rows:
    return "_No prompt where the optimised sample has lower utility than the initial one._"
  return markdown_table(rows, OVEROPTIMISED_COLUMNS)


def bon_overoptimised(
  workdir: str, world, *, proxy_name: str | None = None, k: int = 4
) -> tuple[str, list[dict]]:
  """Best-of-N by the smallest, least-data proxy (unless named) against the initial policy's samples."""
  samples = load_reference_samples(workdir)
  names = [str(n) for n in samples["proxy_names"]]
  if proxy_name is None:
    proxy_name = smallest_proxy(_read_jsonl(_path(workdir) / "results" / "proxies.jsonl"), names)
  initial, best = bon_pairs(samples, proxy_name)
  return proxy_name, overoptimised(initial, best, world, reference(samples), proxy_name, k=k)


def run_overoptimised(
  workdir: str, world, *, method: str = "ppo", run_name: str | None = None, k: int = 4
) -> tuple[str, list[dict]]:
  """The final policy of one run of ``method`` against the initial policy on the same evaluation
  prompts, for the run against the smallest, least-data proxy (unless named)."""
  recs = [
    r
    for r in _read_jsonl(_path(workdir).joinpath(*curves.FILE))
    if r["method"] == method and "iteration" in r
  ]
  if not recs:
    raise ValueError(f"{workdir}: no curves of method {method!r} in results/curves.jsonl")
  if run_name is None:
    run_name = smallest_proxy(recs, sorted({r["name"] for r in recs}))
  proxy_name = next(r["proxy_name"] for r in recs if r["name"] == run_name)
  initial, final = load_eval_samples(workdir, method, run_name)
  ref = reference(load_reference_samples(workdir))
  return run_name, overoptimised(initial, final, world, ref, proxy_name, k=k)


def plot_files(workdir: str) -> list[tuple[str, str]]:
  """(path, caption) of the experiment's plots that exist, in reading order."""
  out = []
  for stem, caption in PLOTS:
    p = _path(workdir) / "plots" / f"{stem}.png"
    if _exists(p):
      out.append((str(p), caption))
  return out


# --- Figures (matplotlib Figure objects, no pyplot state; `image` turns one into a notebook image).


def image(fig):
  """An ``IPython.display.Image`` of a Figure (PNG), for a notebook cell to show."""
  from IPython.display import Image

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  return Image(data=buf.getvalue(), format="png")


def _colours(values):
  import matplotlib

  values = sorted(set(values))
  cmap = matplotlib.colormaps["viridis"]
  return {v: cmap(0.85 * i / max(len(values) - 1, 1)) for i, v in enumerate(values)}


def _curve_label(meta: Mapping) -> str:
  size = meta.get("rm_size") or f"{meta.get('rm_params', 0):,}"
  return f"{size}, {meta['data_size']:,} comparisons" if "data_size" in meta else str(size)


def plot_bands(fitted: Sequence[analysis.FittedCurve]):
  """Measured gold (points, +-1 SE), fitted law (line) and bootstrap band (shaded), one panel per method;
  one colour per (RM size, data size), dark = small."""
  from matplotlib.figure import Figure

  if not fitted:
    raise ValueError("plot_bands: no fitted curves")
  present = {f.curve.method for f in fitted}
  names = [m for m in methods.REGISTRY if m in present] + sorted(present - set(methods.REGISTRY))
  key = lambda f: (f.curve.meta.get("rm_params", 0), f.curve.meta.get("data_size", 0))  # noqa: E731
  colours = _colours(key(f) for f in fitted)
  cols = min(len(names), 4)
  rows = -(-len(names) // cols)
  fig = Figure(figsize=(5.2 * cols, 4.0 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[len(names) :]:
    ax.set_visible(False)
  laws = {"bon": "R = d(alpha - beta d)", "rl": "R = d(alpha - beta log d)"}
  for ax, method in zip(axes, names):
    labelled = set()
    for f in sorted((f for f in fitted if f.curve.method == method), key=key):
      c, colour, label = f.curve, colours[key(f)], _curve_label(f.curve.meta)
      ax.errorbar(c.d, c.gold, yerr=np.nan_to_num(c.gold_se), fmt="o", ms=3, color=colour, lw=0.8)
      ax.plot(
        f.d_grid, f.centre, "-", color=colour, lw=1.5, label=None if label in labelled else label
      )
      labelled.add(label)
      if f.lo is not None:
        ax.fill_between(f.d_grid, f.lo, f.hi, color=colour, alpha=0.15, lw=0)
    ax.axhline(0.0, color="0.7", lw=0.6, zorder=0)
    title = methods.REGISTRY[method].title if method in methods.REGISTRY else method
    form = next(f.curve.form for f in fitted if f.curve.method == method)
    ax.set_title(f"{title}: {laws[form]}")
    ax.set_xlabel("d = sqrt(KL) [sqrt nats]")
    ax.set_ylabel(f"gold score (fit, {int(round(100 * fitted[0].level))}% bootstrap band)")
    ax.legend(fontsize="small")
  return fig


def plot_extrapolation(
  ex: analysis.Extrapolation, rows: Sequence[Mapping], curves: Sequence[analysis.Curve]
):
  """alpha and beta vs RM size with the trend carried to the held-out size (prediction +-2 SE against
  the actual fit), and the held-out curve with the predicted and the fitted law."""
  from matplotlib.figure import Figure
  from rmscale.scaling import fit as fit_lib

  rows = [
    r
    for r in rows
    if r["method"] == ex.method and (ex.data_size is None or r["data_size"] == ex.data_size)
  ]
  train = [r for r in rows if r["rm_params"] < ex.heldout_params]
  fig = Figure(figsize=(14.0, 4.0), layout="constrained")
  axes = fig.subplots(1, 3)
  for ax, coef in zip(axes, ("alpha", "beta")):
    x = np.array([r["rm_params"] for r in train], np.float64)
    ax.plot(x, [r[coef] for r in train], "o", color="C0", label="fitted (trend data)")
    trend = fit_lib.coefficient_trend(x, [r[coef] for r in train])
    xs = np.geomspace(x.min(), ex.heldout_params, 50)
    ax.plot(xs, trend.predict(xs), ":", color="C0", label="trend in log size")
    se = ex.predicted[f"{coef}_se"]
    ax.errorbar(
      [ex.heldout_params],
      [ex.predicted[coef]],
      yerr=[2 * se] if np.isfinite(se) else None,
      fmt="s",
      mfc="none",
      color="C3",
      capsize=3,
      label="predicted (+-2 SE)",
    )
    ax.plot([ex.heldout_params], [ex.actual[coef]], "*", ms=11, color="C2", label="held-out fit")
    ax.set_xscale("log")
    ax.set_xlabel("RM parameters")
    ax.set_ylabel(coef)
    ax.set_title(f"{coef} ({ex.method})")
    ax.legend(fontsize="small")
  ax = axes[2]
  held = [c for c in curves if c.method == ex.method and c.name in ex.heldout_names]
  d_max = max(float(c.d.max()) for c in held)
  d = np.linspace(0.0, d_max, 100)
  for c in held:
    ax.plot(c.d, c.gold, "o", ms=3, color="C2")
  ax.plot(
    d,
    fit_lib.predict(ex.form, ex.actual["alpha"], ex.actual["beta"], d),
    "-",
    color="C2",
    label=f"held-out fit (RMSE {ex.rmse_fitted:.3f})",
  )
  ax.plot(
    d,
    fit_lib.predict(ex.form, ex.predicted["alpha"], ex.predicted["beta"], d),
    "--",
    color="C3",
    label=f"extrapolated law (RMSE {ex.rmse_predicted:.3f})",
  )
  ax.axhline(0.0, color="0.7", lw=0.6, zorder=0)
  ax.set_xlabel("d = sqrt(KL) [sqrt nats]")
  ax.set_ylabel("gold score")
  ax.set_title(f"held-out RM: {ex.heldout_params:,} parameters")
  ax.legend(fontsize="small")
  return fig
