"""Test set-up: 8 fake CPU devices so mesh tests run anywhere; fp32 matmuls for tight parity.

Also the session's shared experiment (``tiny_run``), a hand-written sweep (``synthetic_sweep``) and
``cli``, which runs a command-line tool from a scratch directory with its own ``HOME``.
"""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CLI:
  """Runs ``python -m MODULE ARGS`` as a user types it: in ``cwd`` (a fresh directory, not the
  repository) with ``HOME`` at ``home``, so relative and ``~`` path arguments land under them."""

  def __init__(self, root):
    self.cwd, self.home = root / "work", root / "home"
    self.cwd.mkdir()
    self.home.mkdir()

  def __call__(self, module: str, *args: str, path: str | None = None, timeout: float = 300):
    """The finished process (output captured as text); ``path`` goes before the inherited PATH."""
    env = {
      **os.environ,
      "HOME": str(self.home),
      "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }
    if path:
      env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=self.cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
    )


@pytest.fixture
def cli(tmp_path) -> CLI:
  """A ``CLI`` in ``tmp_path/work`` with ``HOME`` at ``tmp_path/home``."""
  return CLI(tmp_path)


def write_sweep_file(path) -> None:
  """A sweep file of two oracle-gold runs over configs/overopt.py, named by its absolute path (so it
  loads from any working directory): cheap runs for the launchers' tests."""
  spec = dict(
    name="s",
    config=os.path.join(ROOT, "configs", "overopt.py"),
    arg={"runlocal": True},
    overrides={"stages": "gold", "gold.kind": "oracle"},
    grid={"config.gold.p_ramble": [0.1, 0.2]},
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"def get_sweep(arg=None):\n  return {spec!r}\n")


@pytest.fixture(scope="session")
def sweep_file():
  """``sweep_file(path)`` writes `write_sweep_file`'s sweep to ``path``."""
  return write_sweep_file


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The ``tiny,oracle`` quickstart, run once per test session: ``(workdir, summary)``.

  Under pytest-xdist every worker process has its own session fixtures, so the run lives in the
  directory the workers share (the parent of each worker's basetemp) behind a file lock: the first
  worker to need it computes it, the others wait and read it. (Modules using it also carry
  ``xdist_group("tiny_run")`` for ``--dist loadgroup``, which pytest 9.2 + xdist 3.8 silently ignore:
  pytest-dev/pytest-xdist#1386.) Read-only: a test that changes a workdir works on a copy
  (the ``copy_run`` fixture).
  """
  import fcntl

  from rmscale import atomic, pipeline

  sys.path.insert(0, ROOT)
  from configs import quickstart

  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent
  workdir, done = shared / "tiny_run", shared / "tiny_run.summary.md"
  with open(shared / "tiny_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      summary = pipeline.run(quickstart.get_config("tiny,oracle"), str(workdir))
      atomic.write(str(done), lambda f: f.write(summary.encode()))
  return str(workdir), done.read_text()


def _copy_run(workdir: str, dest) -> str:
  dest = os.path.join(str(dest), "run")
  shutil.copytree(workdir, dest, symlinks=True)
  return dest


@pytest.fixture(scope="session")
def copy_run():
  """``copy_run(workdir, dest_dir) -> path``: a private copy of a finished workdir (symlinks kept)."""
  return _copy_run


# A sweep root as launch.sweep lays it out (<root>/<run>/results/...; <root>/shared has no results),
# written by hand from exact laws: alpha and beta linear in ln(RM params), per-prompt scores that
# average exactly to the law. Fits recover the laws and the trend extrapolates without error.
SWEEP_SIZES = {"100k": 100_000, "400k": 400_000, "1.6m": 1_600_000, "6.4m": 6_400_000}
SWEEP_LAWS = {  # Method -> (its functional form, alpha and beta against ln(RM params / 1e5)).
  "bon": ("bon", lambda x: (0.4 + 0.1 * x, 0.30 - 0.04 * x)),
  "ppo": ("rl", lambda x: (0.5 + 0.05 * x, 0.4 - 0.03 * x)),
}
SWEEP_PROMPTS = 6


def sweep_law(method: str, rm_params: int) -> tuple[float, float]:
  return SWEEP_LAWS[method][1](math.log(rm_params / 100_000))


def write_sweep(root: str, data_size: int = 1000) -> str:
  from rmscale import bon, results
  from rmscale.scaling import fit

  os.makedirs(os.path.join(root, "shared", "policy_init"), exist_ok=True)
  # Prompt-to-prompt variation in both terms of the laws, zero mean: the prompt average is the law itself.
  offsets_U = np.linspace(-1.0, 1.0, SWEEP_PROMPTS)
  offsets2_U = np.roll(offsets_U, 2)
  ns = bon.geometric_ns(256, 8)
  for size, params in SWEEP_SIZES.items():
    run = os.path.join(root, f"rm-{size}")
    name = f"{size}_d{data_size}_s0"
    meta = dict(rm_size=size, rm_params=params, data_size=data_size, seed=0, name=name)
    bon_d = np.sqrt(bon.kl_bon(ns))
    rl_d = np.linspace(0.0, 2.5, 6)
    recs = []
    for method, d in (("bon", bon_d), ("ppo", rl_d)):
      form = SWEEP_LAWS[method][0]
      gold = fit.predict(form, *sweep_law(method, params), d)
      units_UxD = (
        gold[None] + 0.3 * offsets_U[:, None] * d[None] + 0.1 * offsets2_U[:, None] * d[None] ** 2
      )
      x = "n" if method == "bon" else "iteration"
      for i, (di, g) in enumerate(zip(d, gold)):
        recs.append(
          {
            **meta,
            "method": method,
            "form": form,
            "x": x,
            x: int(ns[i]) if method == "bon" else i,
            "proxy_name": name,
            "kl": float(di * di),
            "d": float(di),
            "gold": float(g),
            "gold_se": float(units_UxD[:, i].std(ddof=1) / np.sqrt(SWEEP_PROMPTS)),
            "proxy": float(2 * di),
            "gold_per_prompt": units_UxD[:, i].tolist(),
          }
        )
    results.write_jsonl(os.path.join(run, "results", "curves.jsonl"), recs)
    results.write_jsonl(
      os.path.join(run, "results", "proxies.jsonl"),
      [{**meta, "val_loss": 0.6, "val_accuracy": 0.7}],
    )
  return root


@pytest.fixture(scope="session")
def synthetic_sweep(tmp_path_factory) -> str:
  return write_sweep(str(tmp_path_factory.mktemp("sweep")))
