"""The whole tiny pipeline, SIGKILLed at random moments and resumed, ends as if never interrupted.

`python -m rmscale.main --config=configs/quickstart.py:tiny,oracle` runs once uninterrupted (workdir
A) and once into workdir B, where it is SIGKILLed (its whole process group) once in each of four
stages and started again on the same workdir, until a last start runs it to the end. Each kill
exercises one way of resuming:

- policy_init, mid-SFT: its one checkpoint is at the end, so the training restarts;
- label, mid-sampling: a single-shot stage, redone (reference is one too, and is not killed, to keep
  the test within about four minutes);
- proxies, after one proxy finished: finished proxies are skipped, the interrupted one is redone;
- optimise, between a PPO run's first committed checkpoint and its records.json: the run is restored from
  orbax (state, training history, evaluations) and finished in a new process. That window is only
  0.15-0.25 s (PPO iterations of the tiny models are fast; compiling them is what takes the time), so
  the process is run in 10 ms slices, stopped with SIGSTOP between them, while the test looks for
  the checkpoint.

The kill moments come from a seeded numpy Generator: a fraction of the unit's wall time in run A
(the stage; one proxy), or for optimise up to 30 ms of run time, counted from an event the killed process
reports or writes (a resumed process skips finished stages and JAX takes seconds to import, so a
delay from process start would not say what it hits).

This proves what README.md promises ("a killed run resumes where it stopped"): every artefact of B
reads back (each JSONL parses, each npz loads, each orbax checkpoint directory restores, holding
only committed steps) and equals A's exactly: every file under results/, every npz array, every
stage marker but its wall time, proxies/*/metrics.json, optimise/*/*/records.json, plots, summary.md but
its workdir line, and every array of every checkpoint step (train states and saved parameters),
the policy's and the proxies' parameters also through `common.load_params`, the reader the stages
use. provenance.jsonl has one record per invocation; logs/ and tensorboard/ are per invocation and
not compared. Both runs use the same environment (one CPU device, no XLA_FLAGS), hence the same
numerics.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from rmscale import pipeline, provenance, results
from rmscale.checkpoint import Checkpointer
from rmscale.parallel import mesh as mesh_lib
from rmscale.stages import common, roles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "quickstart.py") + ":tiny,oracle"
SEED = 0  # Seeds the kill moments.
RUN_TIMEOUT = 300.0  # Seconds for one process (about 60-90 s uninterrupted on a loaded 2-core CPU).
SLICE = 0.01  # Seconds a stepped process runs between two looks at its workdir.
NOT_COMPARED = ("logs", "tensorboard", provenance.FILE)  # One log / event file per invocation.
ORBAX_DIRS = ("ckpt", "params")  # Compared by restoring them, not by their bytes.
_STAGE_LINE = re.compile(r"\] (\w+): starting")


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one kill is aimed: in ``stage``, a seeded delay after an anchor: the stage's start line,
  or (``anchor``, a glob under the workdir) the first new file matching it."""

  stage: str
  anchor: str | None
  what: str  # The anchor in words.
  stepped: bool = False  # Run in SLICE steps from the stage's start (a window too short to poll).


TARGETS = (
  Target("policy_init", None, "policy_init started"),
  Target("label", None, "label started"),
  Target("proxies", "proxies/*/metrics.json", "a proxy finished"),
  Target("optimise", "optimise/*/*/ckpt/[0-9]*", "a PPO checkpoint was committed", stepped=True),
)


def _tiny_config():
  sys.path.insert(0, ROOT)
  from configs import quickstart

  return quickstart.get_config("tiny,oracle")


def _env() -> dict:
  """os.environ without XLA_FLAGS (tests/conftest.py sets 8 fake devices): one CPU device."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _matches(workdir: str, pattern: str) -> set[str]:
  """Committed files or checkpoint steps matching ``pattern`` (not orbax's or atomic's temporaries)."""
  return {p for p in glob.glob(os.path.join(workdir, pattern)) if "tmp" not in os.path.basename(p)}


class Run:
  """One `python -m rmscale.main` process in its own process group; a thread reads its terminal
  (stderr: one line when a stage starts and when it ends) and notes when each stage starts."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.start = time.monotonic()
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "rmscale.main", f"--config={CONFIG}", f"--workdir={workdir}"],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,  # Universal newlines: tqdm's carriage returns end lines too.
      start_new_session=True,
    )
    self.lines: list[str] = []
    self.started: dict[str, float] = {}  # Stage -> when its start line was read (monotonic).
    self._cond = threading.Condition()
    self._eof = False
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line.rstrip("\n"))
        m = _STAGE_LINE.search(line)
        if m:
          self.started[m.group(1)] = time.monotonic()
        self._cond.notify_all()
    with self._cond:
      self._eof = True
      self._cond.notify_all()

  def _signal(self, sig: int) -> None:
    try:
      os.killpg(self.proc.pid, sig)
    except ProcessLookupError:  # Ended and reaped.
      pass

  def wait_for(self, event, timeout: float, what: str):
    """Polls ``event()`` until it returns something truthy (returned), or None once the process
    has ended without it."""
    deadline = time.monotonic() + timeout
    with self._cond:
      while True:
        found = event()
        if found:
          return found
        if self._eof:
          return None
        if time.monotonic() > deadline:
          self.kill()
          raise AssertionError(f"no {what} in {timeout:.0f} s:\n{self.tail()}")
        self._cond.wait(0.05)

  def step_until(self, event, timeout: float, what: str, steps: int | None = None):
    """Runs the process SLICE seconds at a time, stopped (SIGSTOP) between slices, until ``event()``
    is truthy (or for ``steps`` slices); returns it with the process stopped, or None once the
    process has ended without it."""
    deadline = time.monotonic() + timeout
    for _ in itertools.repeat(None) if steps is None else range(steps):
      self._signal(signal.SIGCONT)
      time.sleep(SLICE)
      self._signal(signal.SIGSTOP)
      found = event()
      if found:
        return found
      if self.proc.poll() is not None:
        return None
      if time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f"no {what} in {timeout:.0f} s:\n{self.tail()}")
    return None

  def first_started(self, stages: tuple[str, ...]) -> tuple[str, float] | None:
    hits = sorted((t, s) for s, t in self.started.items() if s in stages)
    return (hits[0][1], hits[0][0]) if hits else None

  def kill(self) -> int:
    """SIGKILLs the process group (stopped or not); returns the exit status (-9 unless it had
    ended already)."""
    self._signal(signal.SIGKILL)
    rc = self.proc.wait()
    self._reader.join(10)
    return rc

  def finish(self, timeout: float) -> int:
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"run did not finish in {timeout:.0f} s:\n{self.tail()}") from None
    self._reader.join(10)
    return rc

  def resumes(self) -> list[str]:
    """The terminal's 'resumed at step' lines: training runs continued from a checkpoint."""
    return [line.split("] ", 1)[-1].strip() for line in self.lines if "resumed at step" in line]

  def tail(self, n: int = 30) -> str:
    return "\n".join(line for line in self.lines[-n:] if line.strip())


@dataclasses.dataclass
class Kill:
  target: str  # Stage the kill was drawn for.
  anchor: str  # The event the delay counts from.
  delay: float  # Seconds after the anchor (of run time when stepped).
  after_start: float  # Wall seconds from process start to the kill.
  hit: str  # First stage without a marker after the kill: the one it interrupted.
  resumes: list[str]  # Checkpoint resumes the killed process had reported.

  def __str__(self) -> str:
    return (
      f"{self.after_start:.1f} s after start, {self.delay:.3f} s after {self.anchor} "
      f"(drawn for {self.target}), interrupted {self.hit}"
      + (f"; that process had {'; '.join(self.resumes)}" if self.resumes else "")
    )


def _first_unfinished(workdir: str) -> str:
  for stage in pipeline.ORDER:
    if not os.path.exists(os.path.join(workdir, "stages", f"{stage}.json")):
      return stage
  return "(none: all stages done)"


def _delays(reference: str) -> list[float]:
  """One seeded delay per target: a fraction of run A's wall time of the stage (of one proxy), for
  optimise up to 30 ms (3 slices) of run time."""
  marker = lambda s: results.read_json(os.path.join(reference, "stages", f"{s}.json"))  # noqa: E731
  unit = {
    "policy_init": marker("policy_init")["seconds"],
    "label": marker("label")["seconds"],
    "proxies": marker("proxies")["seconds"] / marker("proxies")["num_proxies"],
    "optimise": 3 * SLICE,
  }
  rng = np.random.default_rng(SEED)
  return [float(rng.uniform(0.1, 0.75)) * unit[t.stage] for t in TARGETS]


def _kill_once(run: Run, target: Target, delay: float) -> Kill | None:
  """Kills ``run`` ``delay`` after the target's anchor; None if it ended first (nothing left)."""
  workdir = run.workdir
  # The target stage or, if an earlier kill landed past it, the first later one that starts.
  later = pipeline.ORDER[pipeline.ORDER.index(target.stage) :]
  started = run.wait_for(lambda: run.first_started(later), RUN_TIMEOUT, f"start of {later}")
  if started is None:
    return None
  stage, when = started
  anchor = f"{stage} started"
  if stage == target.stage and target.anchor:
    before = _matches(workdir, target.anchor)
    new = lambda: bool(_matches(workdir, target.anchor) - before) and time.monotonic()  # noqa: E731
    if target.stepped:
      when = run.step_until(new, RUN_TIMEOUT, target.what)
      if when is not None:
        run.step_until(lambda: False, RUN_TIMEOUT, "", steps=round(delay / SLICE))
    else:
      when = run.wait_for(new, RUN_TIMEOUT, target.what)
    if when is None:
      return None
    anchor = target.what
  if not target.stepped:
    time.sleep(max(0.0, when + delay - time.monotonic()))
  after_start = time.monotonic() - run.start
  rc = run.kill()
  if rc == 0:
    return None
  assert rc == -signal.SIGKILL, f"exit status {rc}:\n{run.tail()}"
  return Kill(target.stage, anchor, delay, after_start, _first_unfinished(workdir), run.resumes())


def _kill_and_resume(workdir: str, delays: list[float]) -> tuple[list[Kill], list[Run]]:
  """Runs the pipeline into ``workdir``, killing it once per target, then runs it to the end."""
  kills, runs = [], []
  try:
    for target, delay in zip(TARGETS, delays):
      runs.append(Run(workdir))
      kill = _kill_once(runs[-1], target, delay)
      if kill is None:  # It ended before the kill: nothing left to kill.
        assert runs[-1].finish(RUN_TIMEOUT) == 0, runs[-1].tail()
        break
      kills.append(kill)
    final = Run(workdir)
    runs.append(final)
    rc = final.finish(RUN_TIMEOUT)
  finally:
    for run in runs:  # After a failed assertion: none left behind, running or stopped.
      if run.proc.poll() is None:
        run.kill()
  kills_text = "; ".join(map(str, kills))
  assert rc == 0, f"the last resume failed (kills: {kills_text}):\n{final.tail()}"
  return kills, runs


def _files(workdir: str) -> tuple[set[str], set[str], set[str]]:
  """(plain files, orbax directories, leftover temporary files) under ``workdir``, relative."""
  files, orbax, temps = set(), set(), set()
  for dirpath, dirnames, filenames in os.walk(workdir):
    rel = os.path.relpath(dirpath, workdir)
    rel = "" if rel == "." else rel
    if rel == "":
      dirnames[:] = [d for d in dirnames if d not in NOT_COMPARED]
      filenames = [f for f in filenames if f not in NOT_COMPARED]
    for d in [d for d in dirnames if d in ORBAX_DIRS]:
      orbax.add(os.path.join(rel, d))
      dirnames.remove(d)
    for f in filenames:
      # atomic.write's temporary file, left by a kill mid-write; the target itself is whole.
      (temps if f.startswith(".") and f.endswith(".tmp") else files).add(os.path.join(rel, f))
  return files, orbax, temps


def _canonical_json(obj) -> str:
  return json.dumps(obj, sort_keys=True)  # NaN compares equal to NaN as text.


def _arrays_differ(a: dict, b: dict) -> list[str]:
  """Names of arrays (or 'keys') that differ between two name -> array dicts."""
  if a.keys() != b.keys():
    return [f"keys {sorted(a)} != {sorted(b)}"]
  out = []
  for k in sorted(a):
    x, y = np.asarray(a[k]), np.asarray(b[k])
    if (
      x.dtype != y.dtype
      or x.shape != y.shape
      or not np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")
    ):
      out.append(k)
  return out


def _compare_file(rel: str, a: str, b: str) -> str | None:
  """What differs between ``a/rel`` and ``b/rel`` (None if nothing); reading either may raise."""
  pa, pb = os.path.join(a, rel), os.path.join(b, rel)
  if rel.endswith(".jsonl"):
    results.read_jsonl(pa), results.read_jsonl(pb)  # Read back: every record parses.
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
      return None if fa.read() == fb.read() else "bytes differ"
  if rel.endswith(".json"):
    ja, jb = results.read_json(pa), results.read_json(pb)
    if rel.startswith("stages" + os.sep):
      ja.pop("seconds"), jb.pop("seconds")  # Wall time.
    return None if _canonical_json(ja) == _canonical_json(jb) else "JSON differs"
  if rel.endswith(".npz"):  # np.savez stamps zip members with the time: compare the arrays.
    diff = _arrays_differ(results.read_npz(pa), results.read_npz(pb))
    return f"arrays differ: {diff}" if diff else None
  if rel == "summary.md":
    return None if _summary(pa)[0] == _summary(pb)[0] else "text differs"
  with open(pa, "rb") as fa, open(pb, "rb") as fb:
    return None if fa.read() == fb.read() else "bytes differ"


def _summary(path: str) -> tuple[str, str]:
  """summary.md as (the experiment's part without the workdir line, the provenance section)."""
  with open(path, encoding="utf-8") as f:
    body, _, prov = f.read().partition("## Provenance")
  return "\n".join(x for x in body.split("\n") if not x.startswith("workdir: ")), prov


def _restore_all(path: str) -> dict[int, tuple[dict, dict]]:
  """Every committed step of an orbax directory, with rmscale's Checkpointer (arrays as saved)."""
  with Checkpointer(path) as ckpt:
    out = {}
    for step in ckpt.all_steps():
      state, meta = ckpt.restore(step=step)
      out[step] = (jax.tree.map(np.asarray, state), meta)
  return out


def _compare_orbax(rel: str, a: str, b: str) -> list[str]:
  diffs = []
  # Only committed steps are left: a save torn by a kill is cleaned up when its run resumes.
  for root in (a, b):
    entries = sorted(os.listdir(os.path.join(root, rel)))
    if not entries or not all(e.isdigit() for e in entries):
      diffs.append(f"{rel} in {root}: not only committed steps: {entries}")
  ra, rb = _restore_all(os.path.join(a, rel)), _restore_all(os.path.join(b, rel))
  if ra.keys() != rb.keys():
    return diffs + [f"{rel}: steps {sorted(ra)} != {sorted(rb)}"]
  for step in ra:
    (sa, ma), (sb, mb) = ra[step], rb[step]
    if jax.tree.structure(sa) != jax.tree.structure(sb):
      diffs.append(f"{rel}/{step}: state structure differs")
      continue
    flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(sa)}
    flat_b = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(sb)}
    differ = _arrays_differ(flat_a, flat_b)
    if differ:
      diffs.append(f"{rel}/{step}: state arrays differ: {differ[:8]}")
    if _canonical_json(ma) != _canonical_json(mb):
      diffs.append(f"{rel}/{step}: meta (history, evals) differs")
  return diffs


def _compare_params_as_stages_load_them(a: str, b: str) -> list[str]:
  """The policy's and every proxy's parameters through `common.load_params` (onto this process's
  devices, as a stage restores them), for both workdirs."""
  config = _tiny_config()
  ctxs = [
    common.Context(
      config=config,
      workdir=w,
      mesh=mesh_lib.make_mesh(dict(config.mesh)),
      rules=mesh_lib.rules_from_config(config.rules),
      world=pipeline.make_world(config),
    )
    for w in (a, b)
  ]  # No make_context: it would open a TensorBoard writer in the workdirs.
  models = [("policy_init", config.policy.size, "policy")] + [
    (os.path.join("proxies", r["name"]), r["rm_size"], "rm")
    for r in results.read_jsonl(os.path.join(a, "results", "proxies.jsonl"))
  ]
  diffs = []
  for name, size, role in models:
    cfg = roles.model_config(ctxs[0], size, role)
    pa, pb = (common.load_params(ctx, ctx.path(name, "params"), cfg) for ctx in ctxs)
    flat = [
      {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(p)}
      for p in (pa, pb)
    ]
    differ = _arrays_differ(*flat)
    if differ:
      diffs.append(f"{name}/params via load_params: {differ[:8]}")
  return diffs


def _identities(workdir: str) -> set[str]:
  """The code/package/device identity of each invocation (provenance.IDENTITY)."""
  records = results.read_jsonl(os.path.join(workdir, provenance.FILE))
  return {_canonical_json([r.get(k) for k in provenance.IDENTITY]) for r in records}


def _compare_workdirs(a: str, b: str) -> list[str]:
  files_a, orbax_a, temps_a = _files(a)
  files_b, orbax_b, _ = _files(b)
  diffs = []
  assert not temps_a, f"temporary files in the uninterrupted run: {sorted(temps_a)}"
  for what, x, y in (("files", files_a, files_b), ("checkpoint dirs", orbax_a, orbax_b)):
    if x != y:
      diffs.append(f"{what} only in A: {sorted(x - y)}, only in B: {sorted(y - x)}")
  for rel in sorted(files_a & files_b):
    try:
      d = _compare_file(rel, a, b)
    except Exception as e:  # Unreadable: that is the finding.
      d = f"does not read back: {type(e).__name__}: {e}"
    if d:
      diffs.append(f"{rel}: {d}")
  # summary.md's provenance section shows the latest invocation's commit: equal when every
  # invocation ran the same code (not so if the checkout was committed to during the test).
  if (
    len(_identities(a) | _identities(b)) == 1
    and _summary(os.path.join(a, "summary.md"))[1] != _summary(os.path.join(b, "summary.md"))[1]
  ):
    diffs.append("summary.md: provenance section differs")
  for rel in sorted(orbax_a & orbax_b):
    try:
      diffs += _compare_orbax(rel, a, b)
    except Exception as e:
      diffs.append(f"{rel}: does not restore: {type(e).__name__}: {e}")
  return diffs + _compare_params_as_stages_load_them(a, b)


@pytest.mark.slow
def test_killed_and_resumed_pipeline_ends_identical_to_an_uninterrupted_run(tmp_path):
  t0 = time.monotonic()
  ref, killed = str(tmp_path / "A"), str(tmp_path / "B")
  reference = Run(ref)
  assert reference.finish(RUN_TIMEOUT) == 0, reference.tail()
  assert not reference.resumes()
  delays = _delays(ref)
  t_ref = time.monotonic() - t0

  kills, runs = _kill_and_resume(killed, delays)
  t_killed = time.monotonic() - t0 - t_ref
  resumes = [line for run in runs for line in run.resumes()]
  report = (
    f"reference run {t_ref:.0f} s; killed run {t_killed:.0f} s over "
    f"{len(runs)} starts; kills (seed {SEED}):\n  "
    + "\n  ".join(f"{i}. {k}" for i, k in enumerate(kills, 1))
    + f"\n  checkpoint resumes: {resumes}"
    + f"\n  temporary files left by kills (not compared): {sorted(_files(killed)[2])}"
  )
  assert len(kills) == len(TARGETS), report
  assert len({k.hit for k in kills}) >= 3, f"kills landed in too few stages:\n{report}"
  # Not vacuous: at least one training run continued from an orbax checkpoint (the optimise kill).
  assert any("optimise/" in line for line in resumes), report

  diffs = _compare_workdirs(ref, killed)
  assert not diffs, (
    "resumed run differs from the uninterrupted one:\n  " + "\n  ".join(diffs) + f"\n{report}"
  )
  # One provenance record per invocation.
  assert len(results.read_jsonl(os.path.join(ref, provenance.FILE))) == 1
  assert len(results.read_jsonl(os.path.join(killed, provenance.FILE))) == len(runs), report
  print(f"\n{report}\ncompared in {time.monotonic() - t0 - t_ref - t_killed:.0f} s")
