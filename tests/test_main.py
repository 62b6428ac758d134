"""`python -m rmscale.main` as a user types it: relative and ~ workdirs, a short terminal, a log file.

The README's smoke run, copied as written (`--config=configs/quickstart.py:tiny` and a relative
`--workdir`), from a working directory that is not the repository's (with `configs/` linked into it,
as a clone has it); then a stage re-run through a `~` path to the same workdir.
"""

import json
import os
import re

from rmscale import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tqdm redraws a bar with carriage returns; what a person reads is the text after the last one.
_BAR = re.compile(r"\|[^|]*\| *\d+/\d+ \[")


def _lines(out: str) -> list[str]:
  """The terminal's lines, progress-bar refreshes left out."""
  shown = [part.split("\r")[-1] for part in out.split("\n")]
  return [s for s in shown if s.strip() and not _BAR.search(s)]


def test_readme_smoke_run_as_typed(cli, monkeypatch):
  """One test, not several sharing a fixture: pytest-xdist would run a module fixture per worker."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # One CPU device, as a user has.
  cwd = cli.cwd
  os.symlink(os.path.join(ROOT, "configs"), cwd / "configs")
  (cwd / "runs").mkdir()
  os.symlink(cwd / "runs", cli.home / "runs")  # ~/runs is the same directory.

  def main(*args):
    return cli("rmscale.main", "--config=configs/quickstart.py:tiny", *args, timeout=900)

  out = main("--workdir=runs/tiny")
  assert out.returncode == 0, out.stderr[-3000:]
  workdir = cwd / "runs" / "tiny"

  # The relative workdir is the user's directory, orbax's checkpoints included.
  for stage in ("policy_init", "gold", "label", "proxies", "reference", "optimise", "fit"):
    assert (workdir / "stages" / f"{stage}.json").exists(), stage
  assert any((workdir / "policy_init" / "ckpt").iterdir())
  assert "## Fitted functional forms" in (workdir / "summary.md").read_text()

  # A short terminal: stage lines with headline figures, no library INFO logs.
  lines = _lines(out.stdout + out.stderr)
  assert len(lines) < 60, "\n".join(lines)
  stage_lines = [s for s in lines if re.search(r"\[\d/7\] \w+: (starting|done in)", s)]
  assert len(stage_lines) == 14, "\n".join(lines)
  assert re.search(r"\[2/7\] gold: done in .*: accuracy 0\.\d{3} \(BT loss", out.stderr)
  assert lines[-1].endswith(f"summary: {workdir / 'summary.md'}")
  assert "checkpoint_manager" not in out.stderr and "orbax" not in out.stderr
  log = (workdir / "logs" / "run.log").read_text()
  assert "checkpoint_manager.py" in log  # orbax's INFO records, kept in the run's log file
  assert '"heldout_accuracy"' in log  # each stage's full record, kept off the terminal

  # A stage re-run through a ~ path to the same workdir.
  out = main("--workdir=~/runs/tiny", "--config.stages=fit")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "[1/1] fit: done already, skipped: " in out.stderr
  assert not (cwd / "~").exists() and not (cwd / "runs" / "~").exists()
  records = results.read_jsonl(str(workdir / "provenance.jsonl"))
  assert [r["stages"] for r in records] == [
    ["policy_init", "gold", "label", "proxies", "reference", "optimise", "fit"],
    ["fit"],
  ]
  import jax

  assert records[-1]["packages"]["jax"] == jax.__version__
  assert records[-1]["seed"] == 0 and records[-1]["device_kind"] == "cpu"
  summary = (workdir / "summary.md").read_text()
  assert "## Provenance" in summary and f"jax {jax.__version__}" in summary
  assert json.loads((workdir / "config.json").read_text())["seed"] == 0

  # --verbosity brings the library logs back, absl-formatted.
  out = main(f"--workdir={workdir}", "--config.stages=fit", "--verbosity=0")
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"^I\d{4} .*pipeline\.py:\d+\] workdir ", out.stderr, re.M), out.stderr


def test_debug_shows_the_traceback_of_a_user_error(cli):
  args = ("--workdir=runs/x", "--config.label.noise=0.7")
  config = f"--config={ROOT}/configs/quickstart.py:tiny"
  quiet = cli("rmscale.main", config, *args)
  loud = cli("rmscale.main", config, *args, "--debug")
  message = "config.label.noise=0.7 must be in [0, 0.5)"
  assert quiet.returncode == 2 and quiet.stderr.strip() == f"error: {message}"
  assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr
  assert f"rmscale.errors.UserError: {message}" in loud.stderr
  assert not (cli.cwd / "runs").exists()  # Caught before anything was written.
