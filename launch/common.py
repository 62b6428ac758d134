"""What the launchers share: jobs as argv lists, safe shell quoting, running or printing commands,
and linking a sweep's shared stages into a run's workdir.

Commands are built as argv lists and only ever turned into shell text with ``shlex.join``, so a
config value is always one shell word: it can never end a command or start another.

    python -m launch.common link --shared=runs/sweep/shared --workdir=runs/sweep/rm-85m \
        --stages=policy_init,gold,label
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

from rmscale import atomic, errors, fs
from rmscale.errors import UserError

# The artefact directory of each stage that a sweep can share (pipeline stage name -> workdir entry).
SHAREABLE_STAGES = ("policy_init", "gold", "label")


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a multi-process program: ``prelude`` commands run once per host before ``main``,
  which every process of the job runs (TPU: every worker; SLURM: every task)."""

  name: str
  main: tuple[str, ...]
  prelude: tuple[tuple[str, ...], ...] = ()

  def script(self) -> str:
    """The job as one line of shell, each argv quoted: ``a && b && main``."""
    return " && ".join(shlex.join(c) for c in (*self.prelude, self.main))


def rmscale_job(name: str, python: str, main_args: Sequence[str], prelude=()) -> Job:
  """``python -m rmscale.main ARGS --distributed=on``: every process of the job joins one JAX job."""
  if not main_args:
    raise UserError(
      "no arguments for rmscale.main: give them after '--', e.g. -- --config=... --workdir=..."
    )
  return Job(
    name, (python, "-m", "rmscale.main", *main_args, "--distributed=on"), tuple(map(tuple, prelude))
  )


def worker_path(path: str, flag: str) -> str:
  """``path`` unchanged if it means the same on the remote workers that use it: an absolute path (on
  storage they all mount) or a URL (``gs://...``). A relative or ``~`` path would name a directory
  of this machine, or a different one on each worker, so it is an error naming ``flag``."""
  if fs.is_remote(path) or os.path.isabs(path):
    return path
  raise UserError(
    f"{flag}={path!r} must be an absolute path on storage shared by all workers (e.g. a "
    "Filestore/NFS mount) or a gs:// URL: a relative or ~ path names a directory of this machine"
  )


def check_name(name: str, what: str = "name") -> str:
  """Names become pod names, job names and directories: lower-case letters, digits, '-', '.', '_'."""
  if not name or not all(ch.isalnum() or ch in "-._" for ch in name) or name[0] in "-.":
    raise UserError(
      f"{what} {name!r} must be letters, digits, '-', '.' or '_' and not start with '-' or '.'"
    )
  return name


def run_commands(
  commands: Sequence[Sequence[str]],
  dry_run: bool,
  *,
  out=None,
  runner: Callable[[list[str]], int] | None = None,
) -> int:
  """Prints (dry run) or runs each argv in turn; stops at the first failure and returns its code."""
  out = out or sys.stdout
  for argv in commands:
    if dry_run:
      print(shlex.join(argv), file=out)
      continue
    rc = (runner or (lambda a: subprocess.run(a, check=False).returncode))(list(argv))
    if rc:
      return rc
  return 0


def write_json_atomic(path: str, obj) -> None:
  atomic.write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _replace_symlink(target: str, link: str) -> None:
  """Points ``link`` at ``target`` atomically (several hosts may do this at once)."""
  tmp = f"{link}.tmp-{os.getpid()}"
  if os.path.lexists(tmp):
    os.unlink(tmp)
  os.symlink(target, tmp)
  os.replace(tmp, link)


class WorkdirConflict(UserError, FileExistsError):
  """A run's workdir holds its own copy of a stage that should be linked to the shared one."""


def link_shared(shared: str, workdir: str, stages: Sequence[str]) -> None:
  """Makes ``workdir`` see the finished ``stages`` of ``shared``: a relative symlink to each stage's
  artefact directory and a copy of its done-marker, so the pipeline skips the stage and later stages
  read the shared artefacts. Idempotent; safe to run on every host of a job at once.
  """
  unknown = [s for s in stages if s not in SHAREABLE_STAGES]
  if unknown:
    raise UserError(f"stages {unknown} cannot be shared; shareable: {SHAREABLE_STAGES}")
  for stage in stages:
    marker = os.path.join(shared, "stages", f"{stage}.json")
    if not os.path.exists(marker):
      raise fs.MissingFileError(f"shared stage {stage!r} has not finished: no {marker}")
    link = os.path.join(workdir, stage)
    if os.path.exists(link) and not os.path.islink(link):
      raise WorkdirConflict(
        f"{link} exists and is not a link to the shared stage; remove it or use another workdir"
      )
    os.makedirs(workdir, exist_ok=True)
    _replace_symlink(os.path.relpath(os.path.join(shared, stage), workdir), link)
    dest = os.path.join(workdir, "stages", f"{stage}.json")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.copyfile(marker, tmp)
    os.replace(tmp, dest)


def link_command(python: str, shared: str, workdir: str, stages: Sequence[str]) -> tuple[str, ...]:
  return (
    python,
    "-m",
    "launch.common",
    "link",
    f"--shared={shared}",
    f"--workdir={workdir}",
    f"--stages={','.join(stages)}",
  )


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m launch.common", description=__doc__.split("\n\n")[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)
  link = sub.add_parser("link", help="link a sweep's shared stages into a run's workdir")
  link.add_argument("--shared", required=True, help="workdir of the shared run")
  link.add_argument("--workdir", required=True, help="workdir of the run")
  link.add_argument(
    "--stages", required=True, help="comma-separated stages, e.g. policy_init,gold,label"
  )
  link.add_argument("--debug", action="store_true", help="show the traceback of input errors")
  args = parser.parse_args(argv)
  try:
    shared, workdir = fs.resolve(args.shared), fs.resolve(args.workdir)
  except ValueError as e:
    parser.error(f"--shared/--workdir: {e}")
  with errors.reported(args.debug):  # An unfinished shared stage: one line, exit 2.
    link_shared(shared, workdir, [s for s in args.stages.split(",") if s])
  return 0


if __name__ == "__main__":
  sys.exit(main())
