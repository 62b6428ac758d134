"""The methods registry, and configs/methods.py adding every method to a finished quickstart run."""

import os
import sys

import numpy as np
import pytest

from rmscale import methods, pipeline, results
from rmscale.errors import UserError
from rmscale.scaling import fit as fit_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ("bon", "ppo", "reinforce", "remax", "rloo", "grpo", "rejection")
pytestmark = pytest.mark.xdist_group("tiny_run")  # Shares the session's tiny run (conftest.py).


def methods_config(arg="tiny,oracle"):
  sys.path.insert(0, ROOT)
  from configs import methods as methods_config_file

  return methods_config_file.get_config(arg)


def test_registry_declares_every_method():
  assert tuple(methods.REGISTRY) == ALL
  for name, m in methods.REGISTRY.items():
    assert m.name == name and m.title and m.form in fit_lib.FORMS and m.x in ("n", "iteration")
  assert methods.REGISTRY["bon"].form == "bon"
  assert all(methods.REGISTRY[n].form == "rl" for n in ALL[1:])
  # The KL study can vary the reward's KL coefficient of exactly the KL-penalised methods.
  assert {n for n, m in methods.REGISTRY.items() if m.kl_penalised} == set(ALL[1:6])


def test_sections_fill_defaults_and_reject_unknown_keys():
  c = methods_config()
  assert methods.section(c, "rloo").k == 2  # The tiny config's k: 8 prompts on 8 devices.
  assert methods.section(c, "grpo").kl_beta == methods.REGISTRY["grpo"].defaults["kl_beta"]
  with c.unlocked():
    c.optimise.rloo.baseline = 0.5
  with pytest.raises(UserError, match=r"config.optimise.rloo has unknown keys \['baseline'\]"):
    methods.section(c, "rloo")


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("rloo.k", 3, "config.optimise.rloo.k=3 does not divide optimise.rollout_batch_size"),
    (
      "grpo.k",
      4,
      "config.optimise.grpo.k=4 leaves 4 prompts per iteration, not divisible by the 8",
    ),
    ("reinforce.baseline_decay", 1.0, r"config.optimise.reinforce.baseline_decay=1.0 must be in"),
    ("rejection.keep", "worst", "config.optimise.rejection.keep='worst'"),
    ("remax.lr", 0.0, "config.optimise.remax.lr=0.0"),
  ],
)
def test_each_method_validates_its_section(key, value, message, tmp_path):
  c = methods_config()
  section, field = key.split(".")
  with c.unlocked():
    c.optimise[section][field] = value
  with pytest.raises(UserError, match=message):
    pipeline.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_every_method_runs_on_a_finished_quickstart_workdir(tiny_run, copy_run, cli):
  """The README's methods command, typed in a user's directory (relative config and workdir) on
  the tiny quickstart: only the new methods' runs train; every curve starts at the common origin
  and spends KL; all are fitted and drawn side by side."""
  os.symlink(os.path.join(ROOT, "configs"), cli.cwd / "configs")
  (cli.cwd / "runs").mkdir()
  workdir = copy_run(tiny_run[0], cli.cwd / "runs")
  ppo_records = os.path.join(workdir, "optimise", "ppo", "100k_d300_s0", "records.json")
  stamp = os.path.getmtime(ppo_records)
  # 8 updates at the tiny size: a learning rate that surely moves every method.
  lrs = [f"--config.optimise.{name}.lr=3e-3" for name in ALL[2:]]
  out = cli(
    "rmscale.main",
    "--config=configs/methods.py:tiny,oracle",
    f"--workdir=runs/{os.path.basename(workdir)}",
    "--config.optimise.proxies=('100k_d300_s0',)",
    *lrs,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "[6/7] optimise: done in" in out.stderr and "[5/7] reference: done already" in out.stderr
  with open(os.path.join(workdir, "summary.md")) as f:
    summary = f.read()
  assert os.path.getmtime(ppo_records) == stamp  # Read back, not trained again.
  records = results.read_jsonl(os.path.join(workdir, "results", "curves.jsonl"))
  assert {r["method"] for r in records} == set(ALL)
  for name in ALL[1:]:
    curve = sorted((r for r in records if r["method"] == name), key=lambda r: r["iteration"])
    assert [r["iteration"] for r in curve] == [0, 2, 4], name
    assert curve[0]["kl"] == 0.0 and curve[0]["gold"] == pytest.approx(0.0, abs=1e-12), name
    assert curve[-1]["kl"] > 0.01, name  # The policy moved away from the initial one.
    assert all(np.isfinite([r["gold"], r["proxy"], r["kl_se"]]).all() for r in curve), name
    assert (curve[0]["form"], curve[0]["x"]) == ("rl", "iteration")
  fits = results.read_jsonl(os.path.join(workdir, "results", "fits.jsonl"))
  assert {f["method"] for f in fits} == set(ALL)
  rows = results.read_jsonl(os.path.join(workdir, "results", "methods.jsonl"))
  assert {r["method"] for r in rows} == set(ALL)
  assert all(np.isfinite(r["r2_rl"]) or r["method"] == "rejection" for r in rows)
  assert os.path.getsize(os.path.join(workdir, "plots", "methods.png")) > 1000
  assert "| rloo | 100k_d300_s0 |" in summary and "| rejection | 100k_d300_s0 |" in summary


def test_a_run_directory_refuses_other_settings(tiny_run, copy_run, tmp_path):
  workdir = copy_run(tiny_run[0], tmp_path)
  c = methods_config()
  with c.unlocked():
    c.optimise.methods = ("ppo",)
    c.optimise.ppo.clip_eps = 0.3
  with pytest.raises(UserError, match=r"optimise/ppo/100k_d300_s0 was run with other settings"):
    pipeline.run(c, workdir)
