"""Sweeps: a grid (or list) of overrides over a base config, expanded into named runs with their own
workdirs, run locally N at a time or launched on Cloud TPU pods or SLURM; finished runs are skipped.

    python -m launch.sweep --config=configs/sweeps/rm_size.py --workdir_root=runs/sweep --dry_run
    python -m launch.sweep --config=configs/sweeps/rm_size.py:runlocal --workdir_root=runs/rm_size --parallel=2
    python -m launch.sweep --config=configs/sweeps/rm_size.py --workdir_root=runs/rm_size --status
    python -m launch.sweep --config=configs/sweeps/rm_size.py --workdir_root=/mnt/shared/rm_size \
        --target=tpu --zone=us-central2-b --accelerator=v4-32 --spot --parallel=4 --dry_run

A sweep file defines ``get_sweep(arg)`` returning a dict:

    name           the sweep's name (prefix of pod and job names)
    config         base config file, e.g. "configs/overopt.py"
    arg            get_config arguments shared by every run, e.g. {"data": "90k"}
    overrides      --config.<key> overrides shared by every run, e.g. {"reference.num_prompts": 512}
    grid           swept values, one run per combination: {"rm": ["3m", "12m"]}   (or:)
    runs           a list of points, e.g. [{"rm": "3m"}, {"rm": "12m", "name": "twelve"}]
    shared_stages  stages run once in <root>/shared and linked into every run, e.g.
                   "policy_init,gold,label" (one policy, gold RM and labelled set for all proxies)

In a point, a key "config.a.b" is a ``--config.a.b`` override and any other key a get_config
argument. Every run's config is built here first, so an unknown key or a bad value fails before
anything starts, and a point that would change what a shared stage computes is refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import itertools
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from launch import common, slurm, tpu
from rmscale import errors, fs
from rmscale.errors import UserError

SPEC_KEYS = ("name", "config", "arg", "overrides", "grid", "runs", "shared_stages")
# Config keys the shareable stages (policy_init, gold, label) read: a run must agree with the shared
# run on all of them, or the linked artefacts would not be the ones its config describes.
UPSTREAM_KEYS = (
  "seed",
  "world",
  "model",
  "policy",
  "pretrain",
  "gold",
  "label",
  "sampling",
  "sample_batch_size",
)


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str  # "path.py" or "path.py:k=v,k2=v2"
  # (("reference.num_prompts", 512), ...) -> --config.reference.num_prompts=512
  overrides: tuple[tuple[str, Any], ...]
  workdir: str
  stages: tuple[str, ...]  # The run config's stages; the last one's marker means "finished".
  link: tuple[str, ...] = ()  # Shared stages linked into the workdir before the run starts.

  def main_args(self) -> list[str]:
    return [
      f"--config={self.config}",
      f"--workdir={self.workdir}",
      *(f"--config.{k}={format_value(v)}" for k, v in self.overrides),
    ]

  def argv(self, python: str) -> list[str]:
    return [python, "-m", "rmscale.main", *self.main_args()]

  def marker(self, stage: str) -> str:
    return os.path.join(self.workdir, "stages", f"{stage}.json")

  def finished(self) -> bool:
    return os.path.exists(self.marker(self.stages[-1]))


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  root: str
  runs: tuple[Run, ...]
  shared: Run | None = None  # Runs the shared stages; every run links them.


def format_value(value) -> str:
  """A value as ml_collections' config flags parse it: strings raw, everything else a Python literal."""
  if isinstance(value, str):
    return value
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


def load_module(path: str):
  if not os.path.exists(path):
    raise fs.MissingFileError(f"no config file {path}")
  spec = importlib.util.spec_from_file_location(f"_rmscale_cfg_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"{path}:{e.lineno}: {e.msg}") from None
  return module


def split_config(text: str) -> tuple[str, str | None]:
  path, sep, arg = text.partition(":")
  return path, (arg if sep else None)


def build_config(config: str, overrides: Sequence[tuple[str, Any]]):
  """The run's ConfigDict, as ``rmscale.main`` will see it (overrides applied with type checks)."""
  path, arg = split_config(config)
  module = load_module(path)
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  for key, value in overrides:
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
      if part not in node:
        raise UserError(f"override config.{key}: config has no config.{'.'.join(parents[: i + 1])}")
      node = node[part]
    if leaf not in node:
      raise UserError(f"override config.{key}: config has no such field")
    if isinstance(node[leaf], list):
      raise UserError(
        f"override config.{key}: the field is a list, which ml_collections cannot override "
        "from the command line; make it a tuple in the config"
      )
    try:
      node[leaf] = tuple(value) if isinstance(value, list) else value
    except TypeError as e:
      raise UserError(f"override config.{key}={value!r}: {e}") from None
  return cfg


def _slug(value) -> str:
  if isinstance(value, (list, tuple)):
    value = "+".join(str(v) for v in value)
  return re.sub(r"[^A-Za-z0-9.+]+", "_", str(value)).strip("_") or "x"


def point_name(point: dict) -> str:
  """``{"rm": "85m", "config.proxies.seeds": (1,)}`` -> ``rm-85m_seeds-1``."""
  return "_".join(f"{k.rsplit('.', 1)[-1]}-{_slug(v)}" for k, v in point.items())


def _config_string(path: str, arg: dict) -> str:
  for k, v in arg.items():
    text = str(v)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
      raise UserError(f"get_config argument name {k!r} is not an identifier")
    if any(ch in text for ch in ",=\n\r"):
      raise UserError(
        f"get_config argument {k}={text!r} cannot contain ',', '=' or line breaks "
        "(use '+' to join lists, or a 'config.' override)"
      )
  return path + (":" + ",".join(f"{k}={v}" for k, v in arg.items()) if arg else "")


def _points(spec: dict) -> list[dict]:
  if ("grid" in spec) == ("runs" in spec):
    raise UserError(
      "a sweep needs exactly one of 'grid' (values to combine) or 'runs' (a list of points)"
    )
  if "grid" in spec:
    grid = spec["grid"]
    for k, values in grid.items():
      if not isinstance(values, (list, tuple)) or not values:
        raise UserError(f"sweep grid[{k!r}] must be a non-empty list of values")
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
  return [dict(p) for p in spec["runs"]]


def expand(spec: dict, root: str) -> Sweep:
  """The sweep's runs: names, workdirs, config strings and overrides, each config built and checked."""
  unknown = set(spec) - set(SPEC_KEYS)
  if unknown:
    raise UserError(f"sweep has unknown keys {sorted(unknown)}; known: {SPEC_KEYS}")
  for key in ("name", "config"):
    if key not in spec:
      raise UserError(f"sweep needs {key!r}")
  name = common.check_name(spec["name"], "sweep name")
  base_arg = dict(spec.get("arg", {}))
  base_overrides = dict(spec.get("overrides", {}))
  shared_stages = tuple(s for s in spec.get("shared_stages", "").split(",") if s)
  runs, names = [], set()
  for point in _points(spec):
    run_name = common.check_name(point.pop("name", None) or point_name(point), "run name")
    if run_name in names or run_name == "shared":
      raise UserError(
        f"two runs of sweep {name!r} are both named {run_name!r} (or it is reserved); "
        "give the points distinct 'name's"
      )
    names.add(run_name)
    arg = {**base_arg, **{k: v for k, v in point.items() if not k.startswith("config.")}}
    overrides = {
      **base_overrides,
      **{k[len("config.") :]: v for k, v in point.items() if k.startswith("config.")},
    }
    config = _config_string(spec["config"], arg)
    cfg = build_config(config, list(overrides.items()))
    stages = tuple(s.strip() for s in cfg.stages.split(",") if s.strip())
    runs.append(
      (
        Run(
          run_name,
          config,
          tuple(overrides.items()),
          os.path.join(root, run_name),
          stages,
          link=shared_stages,
        ),
        cfg,
      )
    )
  shared = None
  if shared_stages:
    overrides = {**base_overrides, "stages": ",".join(shared_stages)}
    config = _config_string(spec["config"], base_arg)
    shared_cfg = build_config(config, list(overrides.items()))
    shared = Run(
      "shared", config, tuple(overrides.items()), os.path.join(root, "shared"), shared_stages
    )
    for run, cfg in runs:
      missing = [s for s in shared_stages if s not in run.stages]
      if missing:
        raise UserError(f"run {run.name!r} does not run the shared stages {missing}")
      for key in UPSTREAM_KEYS:
        if _plain(cfg.get(key)) != _plain(shared_cfg.get(key)):
          raise UserError(
            f"run {run.name!r} changes config.{key}, which the shared stages "
            f"{list(shared_stages)} read; sweep it without shared_stages, or move it to 'arg'"
          )
  return Sweep(name, root, tuple(r for r, _ in runs), shared)


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def load_sweep(text: str, root: str) -> Sweep:
  path, arg = split_config(text)
  module = load_module(path)
  if not hasattr(module, "get_sweep"):
    raise UserError(f"{path} defines no get_sweep(arg)")
  return expand(module.get_sweep(arg), root)


# -- state ------------------------------------------------------------------------------------------


def _record_path(run: Run) -> str:
  return os.path.join(run.workdir, "launch.json")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def state(run: Run) -> dict:
  """``{'state': done|running|failed|partial|pending, 'stages': [...finished], 'detail': str}``."""
  from rmscale import results  # A damaged record is a UserError naming it.

  done = [s for s in run.stages if os.path.exists(run.marker(s))]
  record = {}
  if os.path.exists(_record_path(run)):
    record = results.read_json(_record_path(run))
  if run.finished():
    s = "done"
  elif (
    record.get("state") == "running"
    and record.get("host") == socket.gethostname()
    and _alive(int(record.get("pid", -1)))
  ):
    s = "running"
  elif record.get("state") == "exited" and record.get("returncode"):
    s = "failed"
  else:
    s = "partial" if done else "pending"
  detail = f"exit code {record['returncode']}" if s == "failed" else ""
  return {"state": s, "stages": done, "detail": detail}


def _fit_summary(run: Run, per_method: int = 1) -> str:
  """The run's fitted coefficients (``results/fits.jsonl``): the first ``per_method`` curves of
  every method there, in the order the fit stage wrote them, then how many more were fitted."""
  from rmscale import results

  path = os.path.join(run.workdir, "results", "fits.jsonl")
  if not os.path.exists(path):
    return ""
  shown, more = {}, 0
  for r in results.read_jsonl(path):
    if not r.get("fitted", True):  # A curve the fit stage could not fit has no coefficients.
      continue
    rows = shown.setdefault(r["method"], [])
    if len(rows) < per_method:
      rows.append(f"{r['method']} {r['name']}: alpha={r['alpha']:.3f} beta={r['beta']:.3f}")
    else:
      more += 1
  text = "  ".join(line for rows in shown.values() for line in rows)
  return text + (f"  (+{more} more)" if more else "")


def status_table(sweep: Sweep) -> str:
  runs = ([sweep.shared] if sweep.shared else []) + list(sweep.runs)
  states = [state(r) for r in runs]
  counts = {
    k: sum(s["state"] == k for s in states)
    for k in ("done", "running", "failed", "partial", "pending")
  }
  width = max(len(r.name) for r in runs)
  lines = [
    f"sweep {sweep.name} ({sweep.root}): {len(runs)} runs, "
    + ", ".join(f"{v} {k}" for k, v in counts.items()),
    f"{'run':<{width}}  {'state':<8} {'stages':<18} fits (method proxy: alpha, beta)",
  ]
  for r, s in zip(runs, states):
    stages = f"{len(s['stages'])}/{len(r.stages)}" + (f" {s['stages'][-1]}" if s["stages"] else "")
    extra = s["detail"] or _fit_summary(r)
    lines.append(f"{r.name:<{width}}  {s['state']:<8} {stages:<18} {extra}".rstrip())
  return "\n".join(lines)


# -- local ------------------------------------------------------------------------------------------


def _start(run: Run, python: str) -> subprocess.Popen:
  if run.link:
    common.link_shared(os.path.join(os.path.dirname(run.workdir), "shared"), run.workdir, run.link)
  os.makedirs(run.workdir, exist_ok=True)
  log = open(os.path.join(run.workdir, "launch.log"), "ab")
  # An argv list, no shell: nothing in a config value is ever interpreted as a command.
  proc = subprocess.Popen(run.argv(python), stdout=log, stderr=subprocess.STDOUT)
  log.close()
  common.write_json_atomic(
    _record_path(run),
    {
      "state": "running",
      "pid": proc.pid,
      "host": socket.gethostname(),
      "argv": run.argv(python),
      "started": time.time(),
    },
  )
  return proc


def _finish(run: Run, proc: subprocess.Popen) -> int:
  rc = proc.wait()
  common.write_json_atomic(
    _record_path(run), {"state": "exited", "returncode": rc, "finished": time.time()}
  )
  return rc


def run_local(sweep: Sweep, python: str, parallel: int = 1, dry_run: bool = False, out=None) -> int:
  """Runs the unfinished runs, ``parallel`` at a time (the shared run first); returns failures."""
  out = out or sys.stdout
  todo = [r for r in sweep.runs if not r.finished()]
  for r in sweep.runs:
    if r.finished():
      print(f"# {r.name}: finished, skipped", file=out)
  if dry_run:
    if sweep.shared and not sweep.shared.finished():
      print(shlex.join(sweep.shared.argv(python)), file=out)
    for r in todo:
      if r.link:
        shared = os.path.join(os.path.dirname(r.workdir), "shared")
        print(shlex.join(common.link_command(python, shared, r.workdir, r.link)), file=out)
      print(shlex.join(r.argv(python)), file=out)
    return 0
  if todo and sweep.shared and not sweep.shared.finished():
    print(f"[sweep] {sweep.shared.name}: running the shared stages first", file=out, flush=True)
    if rc := _finish(sweep.shared, _start(sweep.shared, python)):
      print(
        f"[sweep] shared stages failed (exit {rc}); see {sweep.shared.workdir}/launch.log", file=out
      )
      return len(todo)
  failures = 0
  running: dict[subprocess.Popen, Run] = {}
  queue = list(todo)
  while queue or running:
    while queue and len(running) < parallel:
      r = queue.pop(0)
      print(f"[sweep] {r.name}: started ({r.workdir}/launch.log)", file=out, flush=True)
      running[_start(r, python)] = r
    finished = [p for p in running if p.poll() is not None]
    if not finished:
      time.sleep(0.5)
    for p in finished:
      r = running.pop(p)
      rc = _finish(r, p)
      failures += bool(rc)
      print(
        f"[sweep] {r.name}: {'done' if rc == 0 else f'FAILED (exit {rc})'}", file=out, flush=True
      )
  return failures


# -- clusters ---------------------------------------------------------------------------------------


def _job(sweep: Sweep, run: Run, python: str) -> common.Job:
  prelude = []
  if run.link:
    prelude.append(
      common.link_command(python, os.path.join(sweep.root, "shared"), run.workdir, run.link)
    )
  return common.rmscale_job(f"{sweep.name}-{run.name}", python, run.main_args(), prelude)


def run_slurm(sweep: Sweep, opts: slurm.SlurmOptions, python: str, dry_run: bool, out=None) -> int:
  """One sbatch job per unfinished run; with shared stages, every run waits for the shared job."""
  out = out or sys.stdout
  dependency = None
  runs = [r for r in sweep.runs if not r.finished()]
  if runs and sweep.shared and not sweep.shared.finished():
    runs.insert(0, sweep.shared)
  for r in runs:
    job = _job(sweep, r, python)
    script = slurm.render(job, opts, os.path.join(r.workdir, "slurm"))
    path = os.path.join(r.workdir, "slurm", f"{job.name}.sbatch")
    needs = dependency if r is not sweep.shared else None
    if dry_run:
      after = r is not sweep.shared and sweep.shared in runs
      print(
        f"# ---- {path}"
        + (" (submitted with --dependency=afterok:<the shared job>)" if after else ""),
        file=out,
      )
      print(script, file=out)
      continue
    job_id = slurm.submit(script, path, dependency=needs)
    print(f"[sweep] {r.name}: submitted job {job_id}", file=out)
    if r is sweep.shared:
      dependency = job_id
  return 0


def _pod_name(sweep: Sweep, run: Run) -> str:
  name = re.sub(r"[^a-z0-9-]+", "-", f"{sweep.name}-{run.name}".lower()).strip("-")
  return ("t" + name if not name[:1].isalpha() else name)[:63].rstrip("-")


def run_tpu(sweep: Sweep, args, parallel: int, dry_run: bool, out=None) -> int:
  """One pod per unfinished run (``launch.tpu.launch``: create, install, run, re-run after preemption)."""
  out = out or sys.stdout
  common.worker_path(sweep.root, "--workdir_root")  # The workers use it as it is.
  if sweep.shared and fs.is_remote(sweep.root):
    raise UserError(
      f"--workdir_root={sweep.root}: shared stages are linked into each run with symlinks, which "
      "a bucket cannot hold; give an absolute path on storage every worker mounts"
    )
  todo = [r for r in sweep.runs if not r.finished()]
  plans = [(r, tpu.pod_from_args(args, _pod_name(sweep, r))) for r in todo]
  shared = None
  if todo and sweep.shared and not sweep.shared.finished():
    shared = (sweep.shared, tpu.pod_from_args(args, _pod_name(sweep, sweep.shared)))
  if dry_run:
    for r, pod in ([shared] if shared else []) + plans:
      print(tpu.launch_plan(pod, _job(sweep, r, pod.python), delete_after=True), file=out)
      print(file=out)
    return 0
  if shared and tpu.launch(shared[1], _job(sweep, shared[0], shared[1].python), delete_after=True):
    print("[sweep] shared stages failed", file=out)
    return len(todo)
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    codes = list(
      pool.map(
        lambda rp: tpu.launch(rp[1], _job(sweep, rp[0], rp[1].python), delete_after=True), plans
      )
    )
  return sum(bool(c) for c in codes)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m launch.sweep", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--config", required=True, help="sweep file, e.g. configs/sweeps/rm_size.py[:arg]"
  )
  parser.add_argument(
    "--workdir_root",
    required=True,
    help="each run's workdir is <root>/<run name>; for --target=tpu an absolute path on storage "
    "every worker mounts, or gs://",
  )
  parser.add_argument("--target", choices=("local", "tpu", "slurm"), default="local")
  parser.add_argument(
    "--parallel", type=int, default=1, help="runs at a time (local processes or TPU pods)"
  )
  parser.add_argument(
    "--dry_run", action="store_true", help="print the commands (or scripts), run nothing"
  )
  parser.add_argument("--status", action="store_true", help="print the state of every run and exit")
  parser.add_argument("--python", default=sys.executable, help="interpreter for local runs")
  parser.add_argument("--debug", action="store_true", help="show the traceback of input errors")
  tpu.add_pod_arguments(parser)
  slurm.add_slurm_arguments(parser)
  args = parser.parse_args(argv)
  if args.parallel < 1:
    parser.error("--parallel must be >= 1")
  with errors.reported(args.debug):  # A bad sweep file, config or root: one line, exit 2.
    path, arg = split_config(args.config)
    config = fs.resolve(path) + ("" if arg is None else f":{arg}")
    # Local and SLURM runs use the root on this machine's (shared) file system: one absolute
    # spelling of it. TPU workers use it as given, which run_tpu checks is absolute or gs://.
    root = args.workdir_root
    if args.target != "tpu":
      root = fs.resolve(root)
      if fs.is_remote(root):
        raise UserError(
          f"--workdir_root={root}: the {args.target} target writes logs and job records under "
          "the root, so it must be a file-system path (gs:// roots work with --target=tpu)"
        )
    sweep = load_sweep(config, root)
    if args.status:
      print(status_table(sweep))
      return 0
    if args.target == "local":
      failures = run_local(sweep, args.python, args.parallel, args.dry_run)
    elif args.target == "slurm":
      failures = run_slurm(sweep, slurm.options_from_args(args), args.slurm_python, args.dry_run)
    else:
      failures = run_tpu(sweep, args, args.parallel, args.dry_run)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
