"""The experiment end to end in its seconds-scale form: stages, skipping, resume, determinism, errors."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from rmscale import pipeline, results
from rmscale.stages import gold, label, proxies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  sys.path.insert(0, ROOT)
  from configs import quickstart

  c = quickstart.get_config("tiny,oracle")
  with c.unlocked():
    for k, v in overrides.items():
      *path, field = k.split(".")
      node = c
      for part in path:
        node = node[part]
      node[field] = v
  return c


pytestmark = pytest.mark.xdist_group(
  "tiny_run"
)  # Shares the session's tiny run (tests/conftest.py).


@pytest.fixture(scope="module")
def finished(tiny_run, copy_run, tmp_path_factory):
  # A private copy of the session's run: these tests delete markers and rerun stages.
  workdir, summary = tiny_run
  return copy_run(workdir, tmp_path_factory.mktemp("qs")), summary


def test_all_stages_write_their_artefacts(finished):
  workdir, summary = finished
  for stage in pipeline.ORDER:
    assert os.path.exists(os.path.join(workdir, "stages", f"{stage}.json")), stage
  records = results.read_jsonl(os.path.join(workdir, "results", "curves.jsonl"))
  assert {r["method"] for r in records} == {"bon", "ppo"}  # config.optimise.methods
  bon = [r for r in records if r["method"] == "bon"]
  names = {r["name"] for r in bon}
  assert names == {"100k_d300_s0", "200k_d300_s0"}  # The tiny config's optimise.proxies.
  n1 = [r for r in bon if r["n"] == 1]
  # n = 1 is the initial policy: recentred gold and utility are 0 there by construction.
  np.testing.assert_allclose([r["gold"] for r in n1], 0.0, atol=1e-9)
  np.testing.assert_allclose([r["kl"] for r in n1], 0.0, atol=1e-12)
  for name in names:
    curve = sorted((r for r in bon if r["name"] == name), key=lambda r: r["n"])
    proxy = [r["proxy"] for r in curve]
    assert all(b >= a - 1e-9 for a, b in zip(proxy, proxy[1:]))  # BoN never lowers the proxy score.
  ppo = [r for r in records if r["method"] == "ppo"]
  assert {r["name"] for r in ppo} == names
  for name in ("100k_d300_s0", "200k_d300_s0"):
    curve = sorted((r for r in ppo if r["name"] == name), key=lambda r: r["iteration"])
    assert [r["iteration"] for r in curve] == [0, 2, 4]
    assert curve[0]["kl"] < 1e-3  # Iteration 0 evaluates the initial policy: no KL spent yet.
    assert curve[-1]["kl"] > curve[0]["kl"]
    # Every curve starts at the reference: the initial policy on the same evaluation prompts, its
    # per-prompt scores those of best-of-n at n = 1 (the mean of each prompt's N samples).
    origin = next(r for r in bon if r["name"] == name and r["n"] == 1)
    assert (curve[0]["gold"], curve[0]["proxy"]) == pytest.approx((0.0, 0.0), abs=1e-12)
    np.testing.assert_allclose(curve[0]["gold_per_prompt"], origin["gold_per_prompt"], atol=1e-12)
    assert len(curve[0]["gold_per_prompt"]) == 16
  study = results.read_jsonl(os.path.join(workdir, "results", "kl_study.jsonl"))
  assert {r["kl_coef"] for r in study} == {0.0, 0.1}
  # The study's runs share compiled programs; the penalty must still reach the rewards.
  last = {r["kl_coef"]: r for r in study if r["iteration"] == 4}
  assert last[0.1]["kl"] != last[0.0]["kl"] and last[0.1]["proxy"] != last[0.0]["proxy"]
  fits = results.read_jsonl(os.path.join(workdir, "results", "fits.jsonl"))
  assert sorted(f["method"] for f in fits) == ["bon"] * 2 + ["ppo"] * 2
  assert {(f["method"], f["form"]) for f in fits} == {("bon", "bon"), ("ppo", "rl")}
  assert all(np.isfinite(f["alpha"]) for f in fits)
  for png in (
    "methods",
    "score_vs_sqrt_kl",
    "gold_vs_proxy",
    "rm_validation",
    "coefficients_vs_size",
    "kl_penalty",
  ):
    assert os.path.getsize(os.path.join(workdir, "plots", f"{png}.png")) > 1000
  assert "Proxy reward models" in summary and "Methods side by side" in summary
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_finished_stages_are_skipped(finished, monkeypatch):
  workdir, _ = finished
  before = {
    f: os.path.getmtime(os.path.join(workdir, "results", f))
    for f in os.listdir(os.path.join(workdir, "results"))
  }

  def boom(ctx):
    raise AssertionError("a finished stage ran again")

  patched = {
    k: types.SimpleNamespace(
      run=boom, validate=m.validate, fingerprint=getattr(m, "fingerprint", None)
    )
    for k, m in pipeline.STAGES.items()
  }
  for k, m in patched.items():
    if m.fingerprint is None:
      del m.fingerprint
  monkeypatch.setattr(pipeline, "STAGES", patched)
  pipeline.run(tiny_config(), workdir)
  after = {f: os.path.getmtime(os.path.join(workdir, "results", f)) for f in before}
  assert before == after


def test_changed_methods_rerun_optimise_and_fit_reusing_finished_runs(finished, tmp_path, copy_run):
  """The optimise stage's marker holds its config's fingerprint: other methods rerun it (and fit),
  and runs already done are read back, not trained again."""
  workdir = copy_run(finished[0], tmp_path)
  ppo_run = os.path.join(workdir, "optimise", "ppo", "100k_d300_s0", "records.json")
  cached = os.path.getmtime(ppo_run)
  pipeline.run(tiny_config(**{"optimise.methods": ("ppo",)}), workdir)
  records = results.read_jsonl(os.path.join(workdir, "results", "curves.jsonl"))
  assert {r["method"] for r in records} == {"ppo"}
  fits = results.read_jsonl(os.path.join(workdir, "results", "fits.jsonl"))
  assert {f["method"] for f in fits} == {"ppo"}  # fit ran again after optimise.
  assert os.path.getmtime(ppo_run) == cached  # Read back, not retrained.
  stamp = os.path.getmtime(os.path.join(workdir, "stages", "optimise.json"))
  pipeline.run(tiny_config(**{"optimise.methods": ("ppo",)}), workdir)  # Same config: skipped.
  assert os.path.getmtime(os.path.join(workdir, "stages", "optimise.json")) == stamp


def test_rerunning_fit_alone_keeps_the_whole_summary(finished):
  workdir, summary = finished
  os.remove(os.path.join(workdir, "stages", "fit.json"))
  # Earlier stages' markers (gold accuracy, label agreement) still reach the summary.
  rerun = pipeline.run(tiny_config(stages="fit"), workdir)
  assert "agreement with the human utility on policy-sample pairs: 1.000" in rerun
  assert rerun.split("\n")[3:] == summary.split("\n")[3:]  # All but the workdir line.


def test_killed_proxies_stage_resumes_to_the_same_result(finished):
  workdir, _ = finished
  before = proxies.load(pipeline.make_context(tiny_config(), workdir))
  # As if killed after the last checkpoint of one proxy but before its metrics and the stage marker.
  os.remove(os.path.join(workdir, "stages", "proxies.json"))
  os.remove(os.path.join(workdir, "proxies", before[0]["name"], "metrics.json"))
  ctx = pipeline.make_context(tiny_config(), workdir)
  proxies.run(ctx)
  after = proxies.load(ctx)
  assert [r["val_loss"] for r in after] == [r["val_loss"] for r in before]


def test_labels_are_deterministic(finished, tmp_path):
  workdir, _ = finished
  # Re-label into a second workdir that reuses the trained policy.
  os.makedirs(tmp_path / "policy_init")
  os.symlink(os.path.join(workdir, "policy_init", "params"), tmp_path / "policy_init" / "params")
  ctx = pipeline.make_context(tiny_config(), str(tmp_path))
  label.run(ctx)
  a = results.read_npz(os.path.join(workdir, *label.PATH))
  b = results.read_npz(os.path.join(str(tmp_path), *label.PATH))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Oracle gold labels: the chosen response really has the higher utility.
  assert (a["gold_chosen"] >= a["gold_rejected"]).all()


def test_gold_comparisons_are_decided_by_the_utility(tmp_path):
  ctx = pipeline.make_context(tiny_config(), str(tmp_path))
  data = gold.human_comparisons(ctx, 500, split="eval")
  P = ctx.prompt_len
  utility = lambda s, m: ctx.world.utility(s[:, :P], s[:, P:], m[:, P:])  # noqa: E731
  chosen = utility(data["chosen"], data["chosen_mask"])
  rejected = utility(data["rejected"], data["rejected_mask"])
  # Exactly n pairs, none tied: ties (about 2% of raw pairs) carry no preference.
  assert len(chosen) == 500 and (chosen > rejected).all()
  np.testing.assert_array_equal(data["chosen"][:, :P], data["rejected"][:, :P])  # Same prompt.


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      {"policy.batch_size": 7},
      "config.policy.batch_size=7 is not divisible by the 8 data-parallel",
    ),
    ({"stages": "policy_init,rl_typo"}, "unknown stages"),
    ({"stages": "gold,policy_init"}, "must follow the order"),
    ({"proxies.data_sizes": [100, 10**6]}, "config.proxies.data_sizes has 1000000"),
    ({"policy.size": "huge"}, "config.policy.size='huge' is not a known size"),
    ({"mesh": dict(data=3)}, "needs 3 devices"),
    ({"label.noise": 0.7}, "config.label.noise"),
    ({"optimise.proxies": ("12m_d1_s0",)}, "config.optimise.proxies names"),
    (
      {"optimise.minibatch_size": 12},
      "config.optimise.minibatch_size=12 is not divisible by the 8",
    ),
    (
      {"optimise.minibatch_size": 48},
      "config.optimise.minibatch_size=48 does not divide optimise.rollout_batch_size",
    ),
    ({"optimise.methods": ("bon", "dpo_typo")}, "config.optimise.methods.*names 'dpo_typo'"),
    ({"optimise.ppo.clip_epsilon": 0.1}, "config.optimise.ppo has unknown keys"),
    ({"optimise.ppo.clip_eps": -0.1}, "config.optimise.ppo.clip_eps=-0.1"),
  ],
)
def test_config_errors_name_the_key(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    pipeline.run(tiny_config(**overrides), str(tmp_path))
  assert not os.listdir(tmp_path)  # Nothing is written before the config is known to be good.


def test_cli_rejects_unknown_override(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "rmscale.main",
      "--config=configs/quickstart.py:tiny",
      f"--workdir={tmp_path}",
      "--config.policy.sizes=12m",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode != 0
  assert "'sizes'" in out.stderr and 'Did you mean "size"' in out.stderr


def test_cli_rejects_unknown_config_argument(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "rmscale.main",
      "--config=configs/quickstart.py:tiny,fast",
      f"--workdir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode != 0 and "unknown config argument 'fast'" in out.stderr


def test_an_unfittable_curve_is_reported_and_every_other_curve_fitted(
  synthetic_sweep, copy_run, tmp_path
):
  # A hand-written run (tests/conftest.py) whose PPO curve has one distinct KL > 0, as PPO gives
  # when its KL estimates are clamped at 0: two coefficients cannot be fitted to it.
  run = copy_run(os.path.join(synthetic_sweep, "rm-400k"), tmp_path)
  path = os.path.join(run, "results", "curves.jsonl")
  recs = results.read_jsonl(path)
  ppo = [r for r in recs if r["method"] == "ppo"]
  last = max(r["iteration"] for r in ppo)
  for r in ppo:
    r["kl"] = 0.0204 if r["iteration"] == last else 0.0
    r["d"] = float(np.sqrt(r["kl"]))
  results.write_jsonl(path, recs)

  summary = pipeline.run(tiny_config(stages="fit"), run)

  fits = {f["method"]: f for f in results.read_jsonl(os.path.join(run, "results", "fits.jsonl"))}
  assert fits["ppo"]["fitted"] is False and "alpha" not in fits["ppo"]
  assert fits["ppo"]["reason"].startswith("need at least two distinct d > 0")
  assert fits["ppo"]["n_points"] == len(ppo)
  assert fits["bon"]["fitted"] is True  # The other curve is fitted, to its exact law.
  law = (0.4 + 0.1 * np.log(4.0), 0.30 - 0.04 * np.log(4.0))  # conftest's SWEEP_LAWS at 400k
  assert (fits["bon"]["alpha"], fits["bon"]["beta"]) == pytest.approx(law, abs=1e-9)
  assert "| ppo | 400k | 1,000 | not fitted: need at least two distinct d > 0" in summary
  assert os.path.getsize(os.path.join(run, "plots", "score_vs_sqrt_kl.png")) > 1000
  assert results.read_json(os.path.join(run, "stages", "fit.json"))["num_not_fitted"] == 1
