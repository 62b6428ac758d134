"""Where a run's figures came from: code version, packages, device and CPU, seed.

Every invocation of `pipeline.run` appends one record to ``<workdir>/provenance.jsonl``, so a workdir
resumed under other code or packages says so; summary.md shows the latest record.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys

import jax

FILE = "provenance.jsonl"
# The distributions whose versions can change a figure; the rest of the lock follows from these.
PACKAGES = (
  "rmscale",
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "chex",
  "ml-collections",
  "numpy",
  "scipy",
  "transformers",
  "tensorflow-datasets",
)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields that make two invocations' figures incomparable when they differ.
IDENTITY = ("git_commit", "git_dirty", "packages", "device_kind", "num_devices")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def cpu_model() -> str:
  """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(
      ("git", "-C", _REPO, *args), capture_output=True, text=True, timeout=10, check=True
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def git_state() -> dict:
  """The commit of the checkout rmscale is imported from, and whether tracked files differ from it;
  None for both when rmscale is not imported from a git checkout (e.g. a wheel)."""
  if not os.path.exists(os.path.join(_REPO, ".git")):
    return {"git_commit": None, "git_dirty": None}
  commit = _git("rev-parse", "HEAD")
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def collect(seed: int, stages: list[str]) -> dict:
  device = jax.devices()[0]
  return {
    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "seed": seed,
    "stages": stages,
    **git_state(),
    "packages": package_versions(),
    "python": sys.version.split()[0],
    "platform": platform.platform(),
    "device_kind": device.device_kind,
    "device_platform": device.platform,
    "num_devices": jax.device_count(),
    "num_processes": jax.process_count(),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
  }


def markdown(records: list[dict]) -> list[str]:
  """summary.md's provenance lines: the latest invocation, and a warning when invocations differ."""
  if not records:
    return []
  r = records[-1]
  commit = r["git_commit"] or "not a git checkout"
  if r["git_dirty"]:
    commit += " (with uncommitted changes)"
  pkgs = ", ".join(f"{k} {v}" for k, v in r["packages"].items() if v is not None)
  lines = [
    "## Provenance",
    "",
    f"- seed: {r['seed']}; code: {commit}",
    f"- device: {r['num_devices']} x {r['device_kind']} ({r['device_platform']}); "
    f"CPU: {r['cpu']} ({r['cpu_count']} cores); Python {r['python']} on {r['platform']}",
    f"- packages: {pkgs}",
  ]
  identities = {tuple(str(x.get(k)) for k in IDENTITY) for x in records}
  if len(identities) > 1:
    lines.append(
      f"- warning: this workdir was written by {len(records)} invocations under "
      f"{len(identities)} different code/package/device combinations (see provenance.jsonl); "
      "compare its stages with care"
    )
  return lines + [""]
