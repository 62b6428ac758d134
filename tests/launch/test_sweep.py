"""Sweeps: expansion into named runs, checks before anything starts, shared stages, skipping finished
runs, the status table, and real local runs of rmscale.main."""

import json
import os
import shutil
import socket
import sys

import pytest

from launch import common, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = ("policy_init", "gold", "label")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(ROOT)  # Sweep files name configs relative to the repository root.


def test_rm_size_sweep_expands_into_named_runs_over_shared_stages():
  s = sweep.load_sweep("configs/sweeps/rm_size.py", "/sw")
  sizes = ["3m", "12m", "25m", "42m", "85m", "300m", "680m", "1.2b", "3b"]
  assert s.name == "rm-size"
  assert [r.name for r in s.runs] == [f"rm-{x}" for x in sizes]
  assert [r.workdir for r in s.runs] == [f"/sw/rm-{x}" for x in sizes]
  assert [r.config for r in s.runs] == [f"configs/overopt.py:data=90k,rm={x}" for x in sizes]
  assert all(r.overrides == () and r.link == SHARED for r in s.runs)
  assert s.runs[0].stages == (
    "policy_init",
    "gold",
    "label",
    "proxies",
    "reference",
    "optimise",
    "fit",
  )
  assert s.shared == sweep.Run(
    "shared",
    "configs/overopt.py:data=90k",
    (("stages", "policy_init,gold,label"),),
    "/sw/shared",
    SHARED,
  )
  assert s.runs[4].argv("py") == [
    "py",
    "-m",
    "rmscale.main",
    "--config=configs/overopt.py:data=90k,rm=85m",
    "--workdir=/sw/rm-85m",
  ]


def test_data_and_seed_sweeps():
  d = sweep.load_sweep("configs/sweeps/data_size.py:runlocal", "/d")
  assert [r.name for r in d.runs] == [
    "data-2k",
    "data-4k",
    "data-8k",
    "data-16k",
    "data-32k",
    "data-64k",
    "data-90k",
  ]
  assert d.runs[0].config == "configs/overopt.py:rm=12m,runlocal=True,data=2k"
  s = sweep.load_sweep("configs/sweeps/seeds.py:num=2", "/s")
  assert [(r.name, r.config, r.overrides) for r in s.runs] == [
    ("seed-0", "configs/overopt.py:rm=85m,data=90k", (("proxies.seeds", (0,)),)),
    ("seed-1", "configs/overopt.py:rm=85m,data=90k", (("proxies.seeds", (1,)),)),
  ]
  assert s.runs[1].main_args()[-1] == "--config.proxies.seeds=(1,)"


BASE = dict(name="t", config="configs/overopt.py", arg={"runlocal": True})


@pytest.mark.parametrize(
  "spec,match",
  [
    (dict(BASE, grid={"rm": ["3m"]}, extra=1), r"unknown keys \['extra'\]"),
    (dict(BASE, grid={"rm": ["3m"]}, runs=[{}]), "exactly one of 'grid'"),
    (dict(BASE, runs=[{"rm": "3m", "name": "a"}, {"rm": "12m", "name": "a"}]), "both named 'a'"),
    (
      dict(BASE, grid={"config.proxies.nonsense": [1]}),
      "config.proxies.nonsense: config has no such field",
    ),
    (dict(BASE, grid={"config.label.noise": ["high"]}), r"config.label.noise='high'"),
    (dict(BASE, grid={"rm": ["3m,12m"]}), "cannot contain ','"),
    (
      dict(BASE, grid={"config.seed": [1, 2]}, shared_stages="policy_init,gold,label"),
      "run 'seed-1' changes config.seed, which the shared stages",
    ),
    (
      dict(
        name="t",
        config="configs/overopt.py",
        grid={"policy": ["1.2b", "3b"]},
        shared_stages="policy_init",
      ),
      "run .policy-3b. changes config.policy",
    ),
    (
      dict(name="q", config="configs/quickstart.py", grid={"config.rules": [[["batch", "data"]]]}),
      "is a list, which ml_collections cannot override",
    ),
  ],
)
def test_bad_sweeps_fail_before_anything_runs(spec, match):
  with pytest.raises(ValueError, match=match):
    sweep.expand(spec, "/x")


def test_values_are_formatted_as_config_flags_parse_them():
  assert sweep.format_value("a b") == "a b"
  assert sweep.format_value(["3m", "12m"]) == "('3m', '12m')"
  assert sweep.format_value((0,)) == "(0,)"
  assert sweep.format_value(0.5) == "0.5" and sweep.format_value(True) == "True"
  assert sweep.point_name({"rm": "1.2b", "config.proxies.seeds": (0, 1)}) == "rm-1.2b_seeds-0+1"


def _finish(workdir, stages):
  for stage in stages:
    os.makedirs(os.path.join(workdir, "stages"), exist_ok=True)
    with open(os.path.join(workdir, "stages", f"{stage}.json"), "w") as f:
      json.dump({}, f)


def test_finished_runs_are_skipped_and_the_status_table_tells_states(tmp_path, capsys):
  s = sweep.load_sweep("configs/sweeps/rm_size.py:runlocal", str(tmp_path))
  _finish(s.shared.workdir, SHARED)
  _finish(s.runs[0].workdir, s.runs[0].stages)  # rm-3m done
  _finish(s.runs[1].workdir, s.runs[1].stages[:4])  # rm-12m partial
  common.write_json_atomic(
    os.path.join(s.runs[2].workdir, "launch.json"), {"state": "exited", "returncode": 2}
  )
  common.write_json_atomic(
    os.path.join(s.runs[3].workdir, "launch.json"),
    {"state": "running", "pid": os.getpid(), "host": socket.gethostname()},
  )
  with open(os.path.join(s.runs[0].workdir, "stages", "fit.json"), "w") as f:
    json.dump({}, f)
  os.makedirs(os.path.join(s.runs[0].workdir, "results"))
  fits = [
    {"method": "bon", "name": "100k_d900_s0", "alpha": 0.61234, "beta": 0.1},
    {"method": "ppo", "name": "100k_d900_s0", "fitted": False, "reason": "one point"},
    {"method": "ppo", "name": "100k_d900_s1", "alpha": 1.5, "beta": 0.25, "fitted": True},
    {"method": "bon", "name": "100k_d900_s1", "alpha": 0.5, "beta": 0.1},
  ]
  with open(os.path.join(s.runs[0].workdir, "results", "fits.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in fits)

  assert sweep.run_local(s, "py", dry_run=True) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "# rm-3m: finished, skipped"
  assert not any("--workdir=" + s.runs[0].workdir in line for line in out[1:])
  assert not any(
    line.endswith(f"--workdir={s.shared.workdir} --config.stages=policy_init,gold,label")
    for line in out
  )
  assert out[1:3] == [
    f"py -m launch.common link --shared={tmp_path}/shared --workdir={tmp_path}/rm-12m "
    "--stages=policy_init,gold,label",
    f"py -m rmscale.main --config=configs/overopt.py:data=90k,runlocal=True,rm=12m --workdir={tmp_path}/rm-12m",
  ]
  assert len(out) == 1 + 2 * 4

  table = sweep.status_table(s).splitlines()
  assert table[0] == (
    f"sweep rm-size ({tmp_path}): 6 runs, 2 done, 1 running, 1 failed, 1 partial, 1 pending"
  )
  rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
  assert rows == {
    "shared": ["done", "3/3", "label"],
    # The first fitted curve of each method, in the file's order (the unfitted one is passed over).
    "rm-3m": ["done", "7/7", "fit", *"bon 100k_d900_s0: alpha=0.612 beta=0.100".split()]
    + [*"ppo 100k_d900_s1: alpha=1.500 beta=0.250 (+1 more)".split()],
    "rm-12m": ["partial", "4/7", "proxies"],
    "rm-25m": ["failed", "0/7", "exit", "code", "2"],
    "rm-42m": ["running", "0/7"],
    "rm-85m": ["pending", "0/7"],
  }


def test_cluster_targets_run_the_shared_job_first(tmp_path, capsys):
  root = str(tmp_path)
  args = ["--config=configs/sweeps/seeds.py:num=2", f"--workdir_root={root}", "--dry_run"]
  assert sweep.main([*args, "--target=slurm", "--nodes=2", "--gpus_per_node=8"]) == 0
  out = capsys.readouterr().out
  headers = [line for line in out.splitlines() if line.startswith("# ---- ")]
  assert headers == [
    f"# ---- {root}/shared/slurm/seeds-shared.sbatch",
    f"# ---- {root}/seed-0/slurm/seeds-seed-0.sbatch (submitted with --dependency=afterok:<the shared job>)",
    f"# ---- {root}/seed-1/slurm/seeds-seed-1.sbatch (submitted with --dependency=afterok:<the shared job>)",
  ]
  assert (
    f"python -m launch.common link --shared={root}/shared --workdir={root}/seed-1 "
    "--stages=policy_init,gold,label\nsrun --kill-on-bad-exit=1 python -m rmscale.main "
    f"--config=configs/overopt.py:rm=85m,data=90k --workdir={root}/seed-1 '--config.proxies.seeds=(1,)' "
    "--distributed=on\n"
  ) in out

  assert sweep.main([*args, "--target=tpu", "--zone=z", "--accelerator=v4-32"]) == 0
  out = capsys.readouterr().out
  assert [line.split()[2] for line in out.splitlines() if line.startswith("# launch ")] == [
    "seeds-shared",
    "seeds-seed-0",
    "seeds-seed-1",
  ]
  assert (
    f"'--command=cd rmscale && python3 -m launch.common link --shared={root}/shared --workdir={root}/seed-0 "
    f"--stages=policy_init,gold,label && python3 -m rmscale.main --config=configs/overopt.py:rm=85m,data=90k "
    f"--workdir={root}/seed-0 '\"'\"'--config.proxies.seeds=(0,)'\"'\"' --distributed=on'"
  ) in out
  with pytest.raises(SystemExit):  # A relative root would not be shared by the pod's workers.
    sweep.main(
      [
        "--config=configs/sweeps/seeds.py",
        "--workdir_root=runs/x",
        "--target=tpu",
        "--zone=z",
        "--accelerator=v4-8",
        "--dry_run",
      ]
    )
  assert "must be an absolute path" in capsys.readouterr().err


def test_sweep_cli_resolves_the_sweep_file_and_root_where_the_user_is(cli, sweep_file):
  sweep_file(cli.cwd / "sweeps" / "s.py")
  p = cli("launch.sweep", "--config=sweeps/s.py", "--workdir_root=runs/sw", "--dry_run")
  assert p.returncode == 0, p.stderr
  assert f"--workdir={cli.cwd}/runs/sw/p_ramble-0.1 " in p.stdout
  p = cli(
    "launch.sweep", "--config=sweeps/s.py", "--workdir_root=runs/sw", "--target=slurm", "--dry_run"
  )
  assert p.returncode == 0, p.stderr
  slurm_dir = cli.cwd / "runs" / "sw" / "p_ramble-0.2" / "slurm"
  assert f"# ---- {slurm_dir}/s-p_ramble-0.2.sbatch" in p.stdout.splitlines()
  assert f"#SBATCH --output={slurm_dir}/%x-%j.out" in p.stdout.splitlines()

  # A real local start (a stand-in interpreter that exits at once) writes under ~, as status reads.
  sweep_file(cli.home / "s.py")
  true = shutil.which("true")
  p = cli("launch.sweep", "--config=~/s.py", "--workdir_root=~/sw", f"--python={true}")
  assert p.returncode == 0, p.stderr
  for name in ("p_ramble-0.1", "p_ramble-0.2"):
    with open(cli.home / "sw" / name / "launch.json") as f:
      assert json.load(f)["returncode"] == 0
  _finish(str(cli.home / "sw" / "p_ramble-0.2"), ["gold"])
  p = cli("launch.sweep", "--config=~/s.py", "--workdir_root=~/sw", "--status")
  assert p.stdout.startswith(f"sweep s ({cli.home}/sw): 2 runs, 1 done, 0 running, 0 failed")


def test_sweep_roots_each_target_can_use(tmp_path, monkeypatch, capsys, sweep_file):
  sweep_file(tmp_path / "s.py")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  tpu_args = ["--target=tpu", "--zone=z", "--accelerator=v4-8", "--dry_run"]

  def main(root, *args):
    capsys.readouterr()
    try:
      rc = sweep.main([f"--config={tmp_path / 's.py'}", f"--workdir_root={root}", *args])
    except SystemExit as e:
      rc = e.code
    return rc, capsys.readouterr()

  for root in ("runs/sw", "~/sw"):  # TPU workers would each read it as their own directory.
    rc, out = main(root, *tpu_args)
    assert rc == 2 and f"--workdir_root={root!r} must be an absolute path on storage" in out.err
  rc, out = main("gs://b/sw", *tpu_args)
  assert rc == 0 and "--workdir=gs://b/sw/p_ramble-0.1 " in out.out
  rc, out = main("gs://b/sw", "--dry_run")  # Local runs write logs and records under the root.
  assert rc == 2 and "must be a file-system path (gs:// roots work with --target=tpu)" in out.err
  # Shared stages are linked with symlinks, which a bucket cannot hold.
  rc, out = main("gs://b/sw", "--config=configs/sweeps/seeds.py:num=2", *tpu_args)
  assert rc == 2 and "shared stages are linked into each run with symlinks" in out.err


def test_link_cli_resolves_both_directories(cli):
  shared = cli.home / "sw" / "shared"
  for stage in SHARED:
    (shared / stage / "params").mkdir(parents=True)
  _finish(str(shared), SHARED)
  p = cli("launch.common", "link", "--shared=~/sw/shared", "--workdir=runs/r", "--stages=gold")
  assert p.returncode == 0, p.stderr
  run = cli.cwd / "runs" / "r"
  assert os.path.samefile(run / "gold", shared / "gold")
  assert (run / "stages" / "gold.json").read_text() == "{}"


def test_link_shared_makes_a_run_see_the_shared_stages(tmp_path):
  shared, run = tmp_path / "shared", tmp_path / "rm-3m"
  for stage in SHARED:
    (shared / stage / "params").mkdir(parents=True)
  _finish(str(shared), SHARED)
  with pytest.raises(ValueError, match="cannot be shared"):
    common.link_shared(str(shared), str(run), ["proxies"])
  for _ in range(2):  # Idempotent (every host of a job runs it).
    common.main(
      ["link", f"--shared={shared}", f"--workdir={run}", "--stages=policy_init,gold,label"]
    )
  for stage in SHARED:
    assert os.readlink(run / stage) == os.path.join("..", "shared", stage)
    assert (run / stage / "params").is_dir()
    assert (run / "stages" / f"{stage}.json").read_text() == "{}"
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "gold").mkdir()
  with pytest.raises(FileExistsError, match="is not a link"):
    common.link_shared(str(shared), str(tmp_path / "other"), ["gold"])
  os.unlink(shared / "stages" / "label.json")
  with pytest.raises(FileNotFoundError, match="shared stage 'label' has not finished"):
    common.link_shared(str(shared), str(tmp_path / "new"), ["label"])


def test_local_sweep_runs_rmscale_main_and_skips_what_finished(tmp_path, capsys):
  """Real runs: the oracle gold stage alone needs no training, so each run is seconds of start-up."""
  spec = dict(
    name="oracle",
    config="configs/overopt.py",
    arg={"runlocal": True},
    overrides={"stages": "gold", "gold.kind": "oracle"},
    runs=[
      {"config.gold.p_ramble": 0.1},
      {"config.gold.p_ramble": 0.2},
      {"config.label.noise": 0.7, "name": "bad"},
    ],
  )  # noise >= 0.5: rmscale.main refuses it.
  s = sweep.expand(spec, str(tmp_path))
  assert [r.name for r in s.runs] == ["p_ramble-0.1", "p_ramble-0.2", "bad"]
  assert sweep.run_local(s, sys.executable, parallel=2) == 1
  for r in s.runs[:2]:
    assert sweep.state(r)["state"] == "done"
    with open(os.path.join(r.workdir, "config.json")) as f:
      assert json.load(f)["gold"]["p_ramble"] == dict(r.overrides)["gold.p_ramble"]
  assert sweep.state(s.runs[2]) == {"state": "failed", "stages": [], "detail": "exit code 2"}
  with open(os.path.join(s.runs[2].workdir, "launch.log")) as f:
    assert "config.label.noise=0.7 must be in [0, 0.5)" in f.read()
  capsys.readouterr()

  before = {r.name: os.path.getmtime(os.path.join(r.workdir, "launch.json")) for r in s.runs}
  assert sweep.run_local(s, sys.executable, parallel=2) == 1  # Only the failed run is tried again.
  out = capsys.readouterr().out
  assert "# p_ramble-0.1: finished, skipped" in out and "# p_ramble-0.2: finished, skipped" in out
  assert [
    os.path.getmtime(os.path.join(r.workdir, "launch.json")) == before[r.name] for r in s.runs
  ] == [True, True, False]
