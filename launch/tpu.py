"""Cloud TPU VM pods: create, install rmscale on every worker, run on all workers, re-run after
preemption, delete. Every step is a ``gcloud compute tpus tpu-vm ...`` command; ``--dry_run`` prints
them exactly instead of running them.

    python -m launch.tpu launch --name=overopt --zone=us-central2-b --accelerator=v4-32 --spot \
        --dry_run -- --config=configs/overopt.py:rm=85m,data=90k --workdir=/mnt/shared/overopt/rm85m

Everything after ``--`` is passed to ``python3 -m rmscale.main`` on every worker (with
``--distributed=on``: all workers join one JAX job). The workdir must be storage that every worker
sees and that outlives the pod, given as an absolute path (a Filestore/NFS mount, or a bucket mounted
with gcsfuse, set up with ``--tpu_setup``) or a ``gs://`` URL; a relative or ``~`` one is refused:
checkpoints are written there, so after a preemption ``launch`` re-creates the pod and the run
resumes from its last checkpoint (finished stages are skipped).

Sub-commands: ``create``, ``install``, ``run``, ``delete``, ``state``, and ``launch`` (create if
needed, install, run; on failure, if the pod was preempted, re-create and run again).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from launch.common import Job, rmscale_job, run_commands, worker_path
from rmscale import errors
from rmscale.errors import UserError

GCLOUD = ("gcloud", "compute", "tpus", "tpu-vm")
REMOTE_DIR = (
  "rmscale"  # Relative to the login user's home on each worker; replaced on every install.
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# States in which the pod's VMs are gone for good (re-create), or will not run our command.
GONE_STATES = ("PREEMPTED", "TERMINATED", "NOT_FOUND")


@dataclasses.dataclass(frozen=True)
class Pod:
  name: str
  zone: str
  accelerator: str  # e.g. v4-32, v5litepod-256, v6e-64
  version: str = "tpu-ubuntu2204-base"  # TPU VM software image.
  project: str | None = None
  spot: bool = False  # Spot capacity: cheap, can be preempted at any time.
  python: str = "python3"  # Interpreter on the workers.
  setup: str | None = (
    None  # Shell run on every worker before installing (the user's own, e.g. a mount).
  )

  def __post_init__(self):
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
      raise UserError(
        f"TPU name {self.name!r} must be lower-case letters, digits and '-', start with a "
        "letter, end with a letter or digit, at most 63 characters"
      )

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def create(self) -> list[str]:
    return [
      *GCLOUD,
      "create",
      self.name,
      *self._where(),
      f"--accelerator-type={self.accelerator}",
      f"--version={self.version}",
      *(["--spot"] if self.spot else []),
    ]

  def delete(self) -> list[str]:
    return [*GCLOUD, "delete", self.name, *self._where(), "--quiet"]

  def describe_state(self) -> list[str]:
    return [*GCLOUD, "describe", self.name, *self._where(), "--format=value(state)"]

  def ssh(self, remote: str) -> list[str]:
    """``remote`` runs under the login shell of every worker at once; gcloud waits for all of them."""
    return [*GCLOUD, "ssh", self.name, *self._where(), "--worker=all", f"--command={remote}"]

  def tarball(self) -> str:
    return f"/tmp/rmscale-{self.name}.tar.gz"

  def install(self) -> list[list[str]]:
    """Ships the committed tree (``git archive HEAD``) to every worker and pip-installs it with jax[tpu]."""
    unpack = (
      f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf rmscale.tar.gz -C {REMOTE_DIR} && "
      f'cd {REMOTE_DIR} && {shlex.quote(self.python)} -m pip install -q -e ".[tpu]"'
    )
    if self.setup:
      unpack = f"{self.setup} && {unpack}"
    return [
      ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={self.tarball()}", "HEAD"],
      [
        *GCLOUD,
        "scp",
        self.tarball(),
        f"{self.name}:rmscale.tar.gz",
        *self._where(),
        "--worker=all",
      ],
      self.ssh(unpack),
    ]

  def run(self, job: Job) -> list[str]:
    return self.ssh(f"cd {REMOTE_DIR} && {job.script()}")


def main_job(name: str, python: str, main_args: Sequence[str], prelude=()) -> Job:
  """``python -m rmscale.main ARGS --distributed=on`` on every worker; the workdir must be absolute
  (storage every worker mounts) or a ``gs://`` URL, as a relative one would live in each worker's
  copy of the code, which each install replaces."""
  workdirs = [a.split("=", 1)[1] for a in main_args if a.startswith("--workdir=")]
  if not workdirs:
    raise UserError(
      "give --workdir=/absolute/path on storage shared by all workers and kept after the pod "
      "is deleted, or --workdir=gs://bucket/path"
    )
  for workdir in workdirs:
    worker_path(workdir, "--workdir")
  return rmscale_job(name, python, main_args, prelude)


def _call(argv: list[str]) -> int:
  return subprocess.run(argv, check=False).returncode


def _capture(argv: list[str]) -> tuple[int, str, str]:
  p = subprocess.run(argv, capture_output=True, text=True, check=False)
  return p.returncode, p.stdout, p.stderr


def pod_state(pod: Pod, capture: Callable[[list[str]], tuple[int, str, str]] = _capture) -> str:
  """READY, CREATING, PREEMPTED, ... or NOT_FOUND; any other gcloud failure raises."""
  rc, out, err = capture(pod.describe_state())
  if rc == 0:
    return out.strip() or "UNKNOWN"
  if "NOT_FOUND" in err or "not found" in err.lower():
    return "NOT_FOUND"
  raise RuntimeError(
    f"`{shlex.join(pod.describe_state())}` failed (exit {rc}): {err.strip()[-2000:]}"
  )


def launch(
  pod: Pod,
  job: Job,
  *,
  max_attempts: int = 10,
  delete_after: bool = False,
  call: Callable[[list[str]], int] = _call,
  state: Callable[[Pod], str] = pod_state,
  sleep: Callable[[float], None] = time.sleep,
  log=print,
  max_waits: int = 120,
) -> int:
  """Runs ``job`` on ``pod`` until it succeeds, (re-)creating the pod when it is missing or preempted.

  The code is installed once per pod (and on the first pass, as it may have changed). A failure on
  a pod that is still there is the program's own: its exit code is returned, not retried.
  """
  creations, waits, installed = 0, 0, False
  while True:
    s = state(pod)
    if s in GONE_STATES:
      if creations == max_attempts:
        log(f"[tpu] {pod.name} is {s} and {max_attempts} creations were tried: giving up")
        return 1
      creations += 1
      if s != "NOT_FOUND":
        log(f"[tpu] {pod.name} is {s}: deleting it before re-creating")
        call(pod.delete())
      log(
        f"[tpu] creating {pod.name} ({pod.accelerator}), creation {creations} of at most {max_attempts}"
      )
      if call(pod.create()):
        sleep(60)  # Capacity may be short (spot): wait, then look again.
      installed = False
      continue
    if s != "READY":
      waits += 1
      if waits > max_waits:
        log(f"[tpu] {pod.name} stayed {s}: giving up")
        return 1
      sleep(30)
      continue
    if not installed:
      rc = run_commands(pod.install(), dry_run=False, runner=call)
      if rc:
        if state(pod) in GONE_STATES:
          continue
        return rc
      installed = True
    log(f"[tpu] running {job.name} on every worker of {pod.name}")
    rc = call(pod.run(job))
    if rc == 0:
      if delete_after:
        call(pod.delete())
      return 0
    after = state(pod)
    if after not in GONE_STATES:
      log(
        f"[tpu] {job.name} failed with exit code {rc} on a {after} pod: not a preemption, giving up"
      )
      return rc
    log(
      f"[tpu] {pod.name} was {after} during the run: re-creating; the run resumes from its checkpoint"
    )


def launch_plan(pod: Pod, job: Job, max_attempts: int = 10, delete_after: bool = False) -> str:
  """What ``launch`` runs, as the exact commands with the loop around them in comments."""
  q = shlex.join
  lines = [
    f"# launch {job.name} on {pod.name}: state = `{q(pod.describe_state())}`",
    "# if the pod is NOT_FOUND (or PREEMPTED/TERMINATED: first " + q(pod.delete()) + "):",
    q(pod.create()),
    "# on every new pod (and on the first pass):",
    *[q(c) for c in pod.install()],
    q(pod.run(job)),
    f"# if the run fails and the pod was preempted: back to the top (at most {max_attempts} creations); "
    "the run resumes from its checkpoint",
  ]
  if delete_after:
    lines.append("# once the run succeeds:")
    lines.append(q(pod.delete()))
  return "\n".join(lines)


def add_pod_arguments(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("Cloud TPU")
  g.add_argument("--zone", help="e.g. us-central2-b")
  g.add_argument("--accelerator", help="accelerator type, e.g. v4-32, v5litepod-256")
  g.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version")
  g.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  g.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  g.add_argument("--tpu_python", default="python3", help="interpreter on the workers")
  g.add_argument(
    "--tpu_setup",
    default=None,
    help="your shell command run on every worker before installing, "
    "e.g. mounting the shared workdir",
  )


def pod_from_args(args, name: str) -> Pod:
  missing = [f"--{k}" for k in ("zone", "accelerator") if not getattr(args, k)]
  if missing:
    raise UserError(f"the TPU target needs {', '.join(missing)}")
  return Pod(
    name=name,
    zone=args.zone,
    accelerator=args.accelerator,
    version=args.version,
    project=args.project,
    spot=args.spot,
    python=args.tpu_python,
    setup=args.tpu_setup,
  )


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  main_args = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(
    prog="python -m launch.tpu", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("command", choices=("create", "install", "run", "delete", "state", "launch"))
  parser.add_argument("--name", required=True, help="TPU pod name (also the job name)")
  parser.add_argument(
    "--dry_run", action="store_true", help="print the exact commands, run nothing"
  )
  parser.add_argument(
    "--max_attempts", type=int, default=10, help="launch: pod (re-)creations at most"
  )
  parser.add_argument(
    "--delete_after", action="store_true", help="launch: delete the pod once the run succeeds"
  )
  add_pod_arguments(parser)
  parser.add_argument("--debug", action="store_true", help="show the traceback of input errors")
  args = parser.parse_args(argv)
  with errors.reported(args.debug):  # A bad pod name or workdir: one line, exit 2.
    pod = pod_from_args(args, args.name)
    job = main_job(args.name, pod.python, main_args) if args.command in ("run", "launch") else None
  if args.command == "state":
    print(shlex.join(pod.describe_state()) if args.dry_run else pod_state(pod))
    return 0
  if args.command == "launch" and not args.dry_run:
    return launch(pod, job, max_attempts=args.max_attempts, delete_after=args.delete_after)
  if args.command == "launch":
    print(launch_plan(pod, job, args.max_attempts, args.delete_after))
    return 0
  commands = {
    "create": lambda: [pod.create()],
    "install": pod.install,
    "run": lambda: [pod.run(job)],
    "delete": lambda: [pod.delete()],
  }[args.command]()
  return run_commands(commands, args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
