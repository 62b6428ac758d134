"""SLURM: an ``sbatch`` script that runs rmscale as one JAX job over the allocation.

    python -m launch.slurm --name=rm85m --nodes=2 --gpus_per_node=8 --per=gpu --partition=gpu \
        --time=24:00:00 --dry_run -- --config=configs/overopt.py:rm=85m,data=90k --workdir=/shared/overopt/rm85m

``--per=gpu`` starts one process per GPU (JAX's SLURM detection gives each its ``SLURM_LOCALID``
GPU); ``--per=node`` one process per node driving all of its GPUs (``RMSCALE_LOCAL_DEVICE_IDS``
lists them, since JAX would otherwise give the single task GPU 0 only). Every process runs
``rmscale.main ... --distributed=on``; the coordinator address and process ids come from SLURM.
``--requeue`` is set: a preempted or requeued job restarts and resumes from its checkpoints.
Without ``--dry_run`` the script is written to ``<workdir>/slurm/<name>.sbatch`` and submitted. A
relative or ``~`` ``--workdir`` is made absolute against the current directory before it goes into
the script, since the job runs in this checkout (``--chdir``); it must be on storage every node sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

from launch.common import Job, check_name, rmscale_job
from rmscale import errors, fs
from rmscale.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  nodes: int = 1
  gpus_per_node: int = 8
  per: str = "gpu"  # gpu: one process per GPU; node: one process per node.
  cpus_per_task: int | None = None  # None: SLURM's default.
  partition: str | None = None
  time: str | None = None  # e.g. 24:00:00
  account: str | None = None
  setup: tuple[str, ...] = ()  # Your shell lines run first, e.g. "source ~/venv/bin/activate".
  sbatch_args: tuple[str, ...] = ()  # Extra "#SBATCH" options, e.g. "--qos=high".

  def __post_init__(self):
    if self.per not in ("gpu", "node"):
      raise UserError(f"per={self.per!r} must be 'gpu' or 'node'")
    if self.nodes < 1 or self.gpus_per_node < 1:
      raise UserError(f"nodes={self.nodes} and gpus_per_node={self.gpus_per_node} must be >= 1")

  @property
  def tasks_per_node(self) -> int:
    return self.gpus_per_node if self.per == "gpu" else 1


def render(job: Job, opts: SlurmOptions, log_dir: str) -> str:
  """The sbatch script: prelude commands once on the first node, then ``srun`` of the main command.

  It runs in this checkout (``--chdir``), which the nodes must see (a shared home or filesystem).
  """
  check_name(job.name, "job name")
  directives = [
    f"--job-name={job.name}",
    f"--nodes={opts.nodes}",
    f"--ntasks-per-node={opts.tasks_per_node}",
    f"--gpus-per-node={opts.gpus_per_node}",
    f"--output={os.path.join(log_dir, '%x-%j.out')}",
    f"--chdir={REPO_ROOT}",
    "--open-mode=append",
    "--requeue",
  ]
  if opts.cpus_per_task:
    directives.append(f"--cpus-per-task={opts.cpus_per_task}")
  for key in ("partition", "time", "account"):
    if getattr(opts, key):
      directives.append(f"--{key}={getattr(opts, key)}")
  directives += list(opts.sbatch_args)
  bad = [d for d in directives if any(ch in d for ch in "\n\r")]
  if bad:
    raise UserError(f"sbatch options cannot contain line breaks: {bad}")
  lines = (
    ["#!/bin/bash"] + [f"#SBATCH {shlex.quote(d)}" for d in directives] + ["", "set -euo pipefail"]
  )
  lines += list(opts.setup)
  if opts.per == "node":
    ids = ",".join(str(i) for i in range(opts.gpus_per_node))
    lines.append(
      f"export RMSCALE_LOCAL_DEVICE_IDS={ids}  # one process drives all GPUs of its node"
    )
  lines += [shlex.join(c) for c in job.prelude]
  lines.append(shlex.join(("srun", "--kill-on-bad-exit=1", *job.main)))
  return "\n".join(lines) + "\n"


def submit(script: str, path: str, dependency: str | None = None) -> str:
  """Writes ``script`` to ``path`` and submits it; returns the job id."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(script)
  os.replace(path + ".tmp", path)
  argv = [
    "sbatch",
    "--parsable",
    *([f"--dependency=afterok:{dependency}"] if dependency else []),
    path,
  ]
  out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
  return out.strip().split(";")[0]


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("SLURM")
  g.add_argument("--nodes", type=int, default=1)
  g.add_argument("--gpus_per_node", type=int, default=8)
  g.add_argument(
    "--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node"
  )
  g.add_argument("--cpus_per_task", type=int, default=None)
  g.add_argument("--partition", default=None)
  g.add_argument("--time", default=None, help="wall-clock limit, e.g. 24:00:00")
  g.add_argument("--account", default=None)
  g.add_argument(
    "--slurm_setup",
    action="append",
    default=[],
    help="your shell line run first (repeatable), e.g. 'source ~/venv/bin/activate'",
  )
  g.add_argument(
    "--sbatch_arg", action="append", default=[], help="extra #SBATCH option (repeatable)"
  )
  g.add_argument("--slurm_python", default="python", help="interpreter on the nodes")


def options_from_args(args) -> SlurmOptions:
  return SlurmOptions(
    nodes=args.nodes,
    gpus_per_node=args.gpus_per_node,
    per=args.per,
    cpus_per_task=args.cpus_per_task,
    partition=args.partition,
    time=args.time,
    account=args.account,
    setup=tuple(args.slurm_setup),
    sbatch_args=tuple(args.sbatch_arg),
  )


def _resolve_workdir(main_args: Sequence[str]) -> tuple[list[str], str]:
  """``main_args`` with each ``--workdir=`` resolved (``~`` expanded, a relative one made absolute
  against the current directory, where the user typed it: the job itself starts in this checkout,
  ``--chdir``), and the workdir rmscale.main will use (the last one)."""
  args, workdirs = [], []
  for arg in main_args:
    if arg.startswith("--workdir="):
      if arg == "--workdir=":
        raise UserError("--workdir= is empty: give a path on storage every node sees")
      workdir = fs.resolve(arg.split("=", 1)[1])
      if fs.is_remote(workdir):
        raise UserError(
          f"--workdir={workdir}: the job script and SLURM's logs are written under the workdir, "
          "so it must be a path on the cluster's shared file system, not a URL"
        )
      workdirs.append(workdir)
      arg = f"--workdir={workdir}"
    args.append(arg)
  if not workdirs:
    raise UserError("give --workdir=... after '--' (on storage every node sees)")
  return args, workdirs[-1]


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  main_args = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(
    prog="python -m launch.slurm", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--name", required=True, help="SLURM job name")
  parser.add_argument("--dry_run", action="store_true", help="print the script, submit nothing")
  add_slurm_arguments(parser)
  parser.add_argument("--debug", action="store_true", help="show the traceback of input errors")
  args = parser.parse_args(argv)
  with errors.reported(args.debug):  # A bad option or workdir: one line, exit 2.
    main_args, workdir = _resolve_workdir(main_args)
    job = rmscale_job(args.name, args.slurm_python, main_args)
    script = render(job, options_from_args(args), os.path.join(workdir, "slurm"))
  if args.dry_run:
    print(script, end="")
    return 0
  print(submit(script, os.path.join(workdir, "slurm", f"{args.name}.sbatch")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
