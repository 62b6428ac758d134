"""Cloud TPU and SLURM launchers: the exact commands and scripts their dry runs print, the
preemption loop, and quoting that no config value can escape (checked by running the output in bash)."""

import os
import shlex
import stat
import subprocess

import pytest

from launch import common, slurm, sweep, tpu

REPO = tpu.REPO_ROOT
MAIN_ARGS = ["--config=configs/overopt.py:rm=85m,data=90k", "--workdir=/mnt/shared/overopt/rm85m"]


def test_tpu_launch_dry_run_prints_the_exact_commands(capsys):
  rc = tpu.main(
    [
      "launch",
      "--name=overopt",
      "--zone=us-central2-b",
      "--accelerator=v4-32",
      "--project=my-proj",
      "--spot",
      "--delete_after",
      "--dry_run",
      "--",
      *MAIN_ARGS,
    ]
  )
  assert rc == 0
  where = "--zone=us-central2-b --project=my-proj"
  assert capsys.readouterr().out.splitlines() == [
    f"# launch overopt on overopt: state = `gcloud compute tpus tpu-vm describe overopt {where} "
    "'--format=value(state)'`",
    f"# if the pod is NOT_FOUND (or PREEMPTED/TERMINATED: first gcloud compute tpus tpu-vm delete overopt "
    f"{where} --quiet):",
    f"gcloud compute tpus tpu-vm create overopt {where} --accelerator-type=v4-32 "
    "--version=tpu-ubuntu2204-base --spot",
    "# on every new pod (and on the first pass):",
    f"git -C {REPO} archive --format=tar.gz --output=/tmp/rmscale-overopt.tar.gz HEAD",
    f"gcloud compute tpus tpu-vm scp /tmp/rmscale-overopt.tar.gz overopt:rmscale.tar.gz {where} --worker=all",
    f"gcloud compute tpus tpu-vm ssh overopt {where} --worker=all '--command=rm -rf rmscale && mkdir -p "
    "rmscale && tar -xzf rmscale.tar.gz -C rmscale && cd rmscale && python3 -m pip install -q -e \".[tpu]\"'",
    f"gcloud compute tpus tpu-vm ssh overopt {where} --worker=all '--command=cd rmscale && python3 -m "
    "rmscale.main --config=configs/overopt.py:rm=85m,data=90k --workdir=/mnt/shared/overopt/rm85m "
    "--distributed=on'",
    "# if the run fails and the pod was preempted: back to the top (at most 10 creations); the run resumes "
    "from its checkpoint",
    "# once the run succeeds:",
    f"gcloud compute tpus tpu-vm delete overopt {where} --quiet",
  ]


@pytest.mark.parametrize(
  "command,expected",
  [
    (
      "create",
      "gcloud compute tpus tpu-vm create p1 --zone=z --accelerator-type=v5litepod-16 "
      "--version=tpu-ubuntu2204-base",
    ),
    ("delete", "gcloud compute tpus tpu-vm delete p1 --zone=z --quiet"),
    ("state", "gcloud compute tpus tpu-vm describe p1 --zone=z '--format=value(state)'"),
  ],
)
def test_tpu_single_commands(capsys, command, expected):
  assert (
    tpu.main([command, "--name=p1", "--zone=z", "--accelerator=v5litepod-16", "--dry_run"]) == 0
  )
  assert capsys.readouterr().out == expected + "\n"


def test_tpu_refuses_bad_names_and_relative_workdirs():
  with pytest.raises(ValueError, match="TPU name 'Rm_85m'"):
    tpu.Pod("Rm_85m", "z", "v4-8")
  with pytest.raises(ValueError, match="absolute.path on storage shared by all workers"):
    tpu.main_job("p", "python3", ["--config=c.py", "--workdir=runs/x"])


def test_tpu_cli_refuses_workdirs_the_workers_would_not_share(cli):
  def run(workdir):
    return cli(
      "launch.tpu",
      "run",
      "--name=p1",
      "--zone=z",
      "--accelerator=v4-8",
      "--dry_run",
      "--",
      "--config=configs/overopt.py",
      f"--workdir={workdir}",
    )

  for workdir in ("runs/x", "~/x"):  # This machine's directory, or each worker's own home.
    p = run(workdir)
    assert p.returncode == 2 and not p.stdout
    assert f"--workdir={workdir!r} must be an absolute path on storage shared by all" in p.stderr
  for workdir in ("/mnt/shared/x", "gs://bucket/x"):  # Passed through untouched.
    p = run(workdir)
    assert p.returncode == 0, p.stderr
    assert (
      f"rmscale.main --config=configs/overopt.py --workdir={workdir} --distributed=on" in p.stdout
    )


def _scripted(states, codes):
  """A pod whose ``describe`` answers come from ``states`` and whose commands exit with ``codes``
  (keyed by the gcloud verb, or 'git'), recording every command."""
  calls, states = [], list(states)

  def call(argv):
    calls.append(argv)
    verb = "git" if argv[0] == "git" else argv[4]
    return codes.get(verb, [0]).pop(0) if codes.get(verb) else 0

  return calls, call, lambda pod: states.pop(0)


def test_tpu_launch_recreates_the_pod_after_a_preemption():
  pod = tpu.Pod("p1", "z", "v4-32", spot=True)
  job = tpu.main_job("p1", "python3", MAIN_ARGS)
  # Missing -> created -> READY; the run dies with the pod (PREEMPTED) -> delete, create, install, run.
  calls, call, state = _scripted(
    ["NOT_FOUND", "READY", "PREEMPTED", "PREEMPTED", "READY"], {"ssh": [0, 255, 0, 0]}
  )
  logs = []
  assert tpu.launch(pod, job, call=call, state=state, sleep=lambda s: None, log=logs.append) == 0
  install = pod.install()
  assert calls == [
    pod.create(),
    *install,
    pod.run(job),
    pod.delete(),
    pod.create(),
    *install,
    pod.run(job),
  ]
  assert any("resumes from its checkpoint" in line for line in logs)


def test_tpu_launch_returns_a_programs_own_failure():
  pod = tpu.Pod("p1", "z", "v4-32")
  job = tpu.main_job("p1", "python3", MAIN_ARGS)
  calls, call, state = _scripted(["READY", "READY"], {"ssh": [0, 3]})
  assert tpu.launch(pod, job, call=call, state=state, sleep=lambda s: None, log=lambda m: None) == 3
  assert calls[-1] == pod.run(job) and pod.create() not in calls  # Not retried: the pod is fine.
  # Capacity that never comes: bounded.
  calls, call, state = _scripted(["NOT_FOUND"] * 3, {"create": [1, 1]})
  assert (
    tpu.launch(
      pod, job, max_attempts=2, call=call, state=state, sleep=lambda s: None, log=lambda m: None
    )
    == 1
  )
  assert calls == [pod.create(), pod.create()]


def test_tpu_pod_state_tells_missing_from_broken():
  pod = tpu.Pod("p1", "z", "v4-8")
  assert tpu.pod_state(pod, lambda a: (0, "READY\n", "")) == "READY"
  assert (
    tpu.pod_state(pod, lambda a: (1, "", "ERROR: (gcloud) NOT_FOUND: Resource p1 not found"))
    == "NOT_FOUND"
  )
  with pytest.raises(RuntimeError, match="exit 1.*permission denied"):
    tpu.pod_state(pod, lambda a: (1, "", "permission denied"))


SLURM_ARGS = [
  "--name=rm85m",
  "--nodes=2",
  "--gpus_per_node=4",
  "--partition=gpu",
  "--time=24:00:00",
  "--slurm_setup=source ~/venv/bin/activate",
  "--dry_run",
  "--",
  *MAIN_ARGS,
]


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_dry_run_prints_the_exact_script(capsys, per):
  assert slurm.main([f"--per={per}", *SLURM_ARGS]) == 0
  tasks = "4" if per == "gpu" else "1"
  expected = [
    "#!/bin/bash",
    "#SBATCH --job-name=rm85m",
    "#SBATCH --nodes=2",
    f"#SBATCH --ntasks-per-node={tasks}",
    "#SBATCH --gpus-per-node=4",
    "#SBATCH --output=/mnt/shared/overopt/rm85m/slurm/%x-%j.out",
    f"#SBATCH --chdir={REPO}",
    "#SBATCH --open-mode=append",
    "#SBATCH --requeue",
    "#SBATCH --partition=gpu",
    "#SBATCH --time=24:00:00",
    "",
    "set -euo pipefail",
    "source ~/venv/bin/activate",
    *(
      ["export RMSCALE_LOCAL_DEVICE_IDS=0,1,2,3  # one process drives all GPUs of its node"]
      if per == "node"
      else []
    ),
    "srun --kill-on-bad-exit=1 python -m rmscale.main --config=configs/overopt.py:rm=85m,data=90k "
    "--workdir=/mnt/shared/overopt/rm85m --distributed=on",
  ]
  assert capsys.readouterr().out.splitlines() == expected


def test_slurm_cli_makes_the_workdir_absolute_where_the_user_is(cli, tmp_path):
  args = ["--name=j", "--gpus_per_node=1", "--", "--config=configs/overopt.py"]
  p = cli("launch.slurm", "--dry_run", *args, "--workdir=runs/x")
  assert p.returncode == 0, p.stderr
  workdir = cli.cwd / "runs" / "x"  # Not under the checkout, where the job starts (--chdir).
  assert f"#SBATCH --output={workdir}/slurm/%x-%j.out" in p.stdout.splitlines()
  assert f"--workdir={workdir} --distributed=on" in p.stdout

  # Submitted: the script is written under ~ and sbatch (a stand-in) is given its absolute path.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" > "$HOME/sbatch.args"\necho 4242\n')
  (bin_dir / "sbatch").chmod(stat.S_IRWXU)
  p = cli("launch.slurm", *args, "--workdir=~/runs/x", path=str(bin_dir))
  assert p.returncode == 0, p.stderr
  assert p.stdout == "4242\n"
  script = cli.home / "runs" / "x" / "slurm" / "j.sbatch"
  assert (cli.home / "sbatch.args").read_text() == f"--parsable {script}\n"
  assert f"--workdir={cli.home}/runs/x --distributed=on" in script.read_text()

  p = cli("launch.slurm", "--dry_run", *args, "--workdir=gs://bucket/x")
  assert p.returncode == 2 and "must be a path on the cluster's shared file system" in p.stderr


def test_slurm_bad_options_are_named():
  with pytest.raises(ValueError, match="per='socket' must be 'gpu' or 'node'"):
    slurm.SlurmOptions(per="socket")
  with pytest.raises(ValueError, match="line breaks"):
    slurm.render(
      common.Job("j", ("python",)), slurm.SlurmOptions(partition="gpu\nrm -rf /"), "/tmp"
    )


# -- quoting: run what the launchers emit, with recording stand-ins for python/srun -----------------

EVIL = [
  "x'; touch {canary}; echo '",
  "$(touch {canary})",
  "`touch {canary}`",
  "a b\"c\\d",
  "semi;colon && |",
  "new\nline",
]


def _recorder_bin(tmp_path):
  """A PATH directory whose python, python3 and srun write their argv (NUL-separated) to argv.bin."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  out = tmp_path / "argv.bin"
  rec = f"#!/bin/bash\nprintf '%s\\0' \"$0\" \"$@\" >> {shlex.quote(str(out))}\n"
  for name in ("python", "python3", "srun"):
    (bin_dir / name).write_text(rec)
    (bin_dir / name).chmod(stat.S_IRWXU)
  return bin_dir, out


def _run_bash(script: str, tmp_path, bin_dir) -> None:
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, check=True, capture_output=True)


def _recorded(out) -> list[list[str]]:
  parts = out.read_bytes().decode().split("\0")[:-1]
  calls, cur = [], []
  for p in parts:
    if p.startswith("/") and os.path.basename(p) in ("python", "python3", "srun") and cur:
      calls.append(cur)
      cur = []
    cur.append(p)
  calls.append(cur)
  return [[os.path.basename(c[0]), *c[1:]] for c in calls]


def test_no_config_value_can_inject_a_command(tmp_path):
  canary = tmp_path / "INJECTED"
  values = [v.format(canary=canary) for v in EVIL]
  overrides = [f"--config.gold.kind={v}" for v in values]
  main_args = ["--config=configs/overopt.py:rm=85m", "--workdir=/abs/work dir", *overrides]
  bin_dir, out = _recorder_bin(tmp_path)
  expected = ["-m", "rmscale.main", *main_args, "--distributed=on"]

  # SLURM: the whole generated script runs under bash (the #SBATCH lines are comments to it).
  job = common.rmscale_job("evil", "python", main_args)
  _run_bash(slurm.render(job, slurm.SlurmOptions(), "/tmp"), tmp_path, bin_dir)
  assert _recorded(out) == [["srun", "--kill-on-bad-exit=1", "python", *expected]]
  out.unlink()

  # TPU: the --command that every worker's shell runs (after `cd rmscale`).
  (tmp_path / "rmscale").mkdir()
  pod = tpu.Pod("p1", "z", "v4-8")
  ssh = pod.run(tpu.main_job("p1", "python3", main_args))
  printed = shlex.split(shlex.join(ssh))  # What --dry_run prints, read back by a shell.
  assert printed == ssh
  remote = ssh[-1].removeprefix("--command=")
  _run_bash(remote, tmp_path, bin_dir)
  assert _recorded(out) == [["python3", *expected]]
  out.unlink()

  # Local sweep dry run: each printed line is one command.
  run = sweep.Run("r", "configs/overopt.py:rm=85m", (("gold.kind", values[0]),), "/abs/w", ("fit",))
  _run_bash(shlex.join(run.argv("python")), tmp_path, bin_dir)
  assert _recorded(out) == [
    [
      "python",
      "-m",
      "rmscale.main",
      "--config=configs/overopt.py:rm=85m",
      "--workdir=/abs/w",
      f"--config.gold.kind={values[0]}",
    ]
  ]
  assert not canary.exists()
