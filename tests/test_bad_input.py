"""The bad-input corpus: every command-line tool given bad input, as a user types it.

Each case runs the tool in a subprocess from a scratch directory and asserts what the user sees and
what is left behind: exit status 2, exactly one ``error: ...`` line naming the key, flag or file at
fault, no traceback, and the files already there (the workdir, the directories the tool was pointed
at) byte for byte as they were. A run stopped by a config error stops before writing anything, its
run log and provenance record included; a run stopped by a damaged file in its workdir has written
only what every run writes before its stages (the run log, a provenance record, a TensorBoard event
file) when it reads the file.
"""

import hashlib
import importlib.util
import json
import os
import shutil

import pytest

from rmscale import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACEBACK = "Traceback (most recent call last)"
# What a run appends to before its stages start, so before any damaged file is read.
APPENDED = ("logs/run.log", "provenance.jsonl")
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"  # As tiny_run was made (conftest).


def snapshot(root) -> dict[str, str]:
  """sha256 of every file under ``root`` (symlinked directories not followed), by relative path."""
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_untouched(before: dict, after: dict, appended=(), new_under=()) -> None:
  """Every file of ``before`` is still there, unchanged (``appended`` aside); new files only under
  the ``new_under`` prefixes."""
  changed = sorted(k for k in before if k not in appended and before[k] != after.get(k))
  new = sorted(k for k in after if k not in before and not k.startswith(tuple(new_under)))
  assert not changed and not new, f"changed: {changed}; new: {new}"


def assert_one_line(p, *names: str, code: int = 2) -> None:
  """Exit status ``code``, no traceback, one ``error: ...`` line, which names each of ``names``."""
  assert TRACEBACK not in p.stderr, p.stderr[-3000:]
  assert p.returncode == code, p.stderr[-3000:]
  lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
  assert len(lines) == 1, p.stderr[-3000:]
  for name in names:
    assert name in lines[0], lines[0]


@pytest.fixture
def user(cli, monkeypatch):
  """``cli`` as a user has it: one CPU device (no XLA_FLAGS) and the repository's configs/ linked
  into the working directory, as a clone has it."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  os.symlink(os.path.join(ROOT, "configs"), cli.cwd / "configs")
  return cli


# --- Config values and keys, flags, world fields: caught at start-up, before anything is written.

WORLD_CONFIG = """
from configs import quickstart


def get_config(arg=None):
  c = quickstart.get_config("tiny")
  c.world = {world!r}
  return c
"""

CONFIG_CASES = [
  pytest.param(["--config.policy.lr=-1.0"], "config.policy.lr=-1.0", id="negative-lr"),
  pytest.param(["--config.policy.lr=nan"], "config.policy.lr=nan", id="nan-lr"),
  pytest.param(["--config.label.noise=0.7"], "config.label.noise=0.7", id="noise-0.7"),
  pytest.param(["--config.policy.size=9z"], "config.policy.size='9z'", id="unknown-size"),
  pytest.param(["--config.policy.nokey=1"], "'nokey'", id="unknown-key"),
  pytest.param(["--config.policy.lr=abc"], "--config.policy.lr=abc", id="wrong-type"),
  pytest.param(["--config.stages=fit,gold"], "config.stages", id="stages-out-of-order"),
  pytest.param(["--config.stages=policy_init,dance"], "'dance'", id="unknown-stage"),
  pytest.param(["--config.mesh.data=16"], "config.mesh", id="mesh-larger-than-machine"),
  pytest.param(["--config.world.seed=-1"], "config.world.seed=-1", id="world-negative-seed"),
  pytest.param(["--bogus=1"], "'bogus'", id="unknown-flag"),
]


def _workdir_with_history(workdir) -> None:
  """A workdir an earlier run left: a finished stage, its log and provenance record."""
  for name, text in {
    "config.json": "{}",
    "stages/policy_init.json": '{"final_loss": 5.1}',
    "logs/run.log": "05:00:00 [1/7] policy_init: starting\n",
    "provenance.jsonl": '{"seed": 0}\n',
  }.items():
    path = workdir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _main_fails_before_writing(user, args, *names, config="configs/quickstart.py:tiny"):
  """``rmscale.main`` on ``runs/qs``, a workdir with history: stopped before writing anything."""
  _workdir_with_history(user.cwd / "runs" / "qs")
  before = snapshot(user.cwd / "runs")
  p = user("rmscale.main", f"--config={config}", *args)
  assert_one_line(p, *names)
  assert_untouched(before, snapshot(user.cwd / "runs"))  # The log and provenance included.


@pytest.mark.parametrize("args, name", CONFIG_CASES)
def test_config_errors_stop_before_anything_is_written(user, args, name):
  _main_fails_before_writing(user, ["--workdir=runs/qs", *args], name)


def test_batch_not_divisible_by_the_devices(user, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", EIGHT_DEVICES)
  _main_fails_before_writing(
    user, ["--workdir=runs/qs", "--config.proxies.batch_size=12"], "config.proxies.batch_size=12"
  )


@pytest.mark.parametrize(
  "config, name",
  [
    pytest.param("configs/nope.py", "configs/nope.py", id="missing-config-file"),
    pytest.param("configs/quickstart.py:bogus", "'bogus'", id="unknown-config-arg"),
  ],
)
def test_config_file_errors(user, config, name):
  _main_fails_before_writing(user, ["--workdir=runs/qs"], name, config=config)


def test_missing_workdir_flag(user):
  _main_fails_before_writing(user, [], "--workdir")


@pytest.mark.parametrize(
  "world, name",
  [
    pytest.param({"seed": 0, "num_topics": 99}, "config.world.num_topics=99", id="out-of-range"),
    pytest.param(
      {"seed": 0, "max_request": "16"}, "config.world.max_request='16'", id="wrong-type"
    ),
    pytest.param({"seed": 0, "topics": 3}, "'topics'", id="unknown-field"),
  ],
)
def test_world_field_errors(user, world, name):
  (user.cwd / "bad_world.py").write_text(WORLD_CONFIG.format(world=world))
  _main_fails_before_writing(user, ["--workdir=runs/qs"], name, config="bad_world.py")


# --- Damaged or missing files in a finished workdir: the stage that reads one names it.


def _truncate(path, keep: float = 0.5) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: int(len(data) * keep)])


def _append(path, text: str) -> None:
  with open(path, "a") as f:
    f.write(text)


def _remove(path) -> None:
  shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _truncate_arrays(path) -> None:
  """Cuts every data file of an orbax checkpoint (under its ``d/`` directories) in half."""
  for d, _, files in os.walk(path):
    for name in files if os.path.basename(d) == "d" else ():
      _truncate(os.path.join(d, name))


DAMAGE_CASES = [
  pytest.param(_truncate, "label/comparisons.npz", "proxies", id="truncated-labels-npz"),
  pytest.param(
    lambda p: _append(p, "{garbage\n"), "results/curves.jsonl", "fit", id="garbage-results-jsonl"
  ),
  pytest.param(_truncate, "stages/gold.json", None, id="truncated-stage-marker"),
  pytest.param(
    _truncate_arrays, "proxies/100k_d100_s0/params", "reference", id="truncated-proxy-checkpoint"
  ),
  pytest.param(
    lambda p: _append(p, "not json\n"), "provenance.jsonl", None, id="garbage-provenance-jsonl"
  ),
  pytest.param(_remove, "results/proxies.jsonl", "fit", id="missing-results-jsonl"),
  pytest.param(_remove, "policy_init/params", "label", id="missing-params-dir"),
  pytest.param(_remove, "reference/samples.npz", "optimise", id="missing-reference-samples"),
]


@pytest.mark.xdist_group("tiny_run")
@pytest.mark.parametrize("damage, victim, reader", DAMAGE_CASES)
def test_damaged_workdir_files_are_named(
  tiny_run, copy_run, user, monkeypatch, damage, victim, reader
):
  monkeypatch.setenv("XLA_FLAGS", EIGHT_DEVICES)  # tiny_run's devices, so validation agrees.
  workdir = copy_run(tiny_run[0], user.cwd)
  damage(os.path.join(workdir, victim))
  # The markers of the stage that reads the file and of those after it go, so that it runs again.
  for stage in pipeline.ORDER[pipeline.ORDER.index(reader) :] if reader else ():
    os.remove(os.path.join(workdir, "stages", f"{stage}.json"))
  before = snapshot(workdir)
  p = user("rmscale.main", "--config=configs/quickstart.py:tiny,oracle", f"--workdir={workdir}")
  assert_one_line(p, os.path.join(workdir, victim))
  assert_untouched(before, snapshot(workdir), appended=APPENDED, new_under=("tensorboard/",))


# --- Preference data files: the build stops at the file and line, the data directory kept.

GOOD_ROW = {
  "chosen": "\n\nHuman: hi\n\nAssistant: hello",
  "rejected": "\n\nHuman: hi\n\nAssistant: bye",
}


@pytest.mark.parametrize(
  "second_line, name",
  [
    pytest.param('{"chosen": "x", "rejected": ', "train.jsonl:2: corrupt JSON", id="malformed"),
    pytest.param(
      json.dumps({"chosen": GOOD_ROW["chosen"]}), "missing field 'rejected'", id="field"
    ),
  ],
)
def test_preference_file_errors(user, second_line, name):
  raw = user.cwd / "raw" / "helpful-base"
  raw.mkdir(parents=True)
  (raw / "train.jsonl").write_text(json.dumps(GOOD_ROW) + "\n" + second_line + "\n")
  (raw / "test.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
  (user.cwd / "tfds" / "other").mkdir(parents=True)
  (user.cwd / "tfds" / "other" / "kept.txt").write_text("an earlier build")
  before = snapshot(user.cwd)
  p = user(
    "rmscale.data.preference_builders",
    "--dataset=hh_rlhf",
    f"--manual_dir={user.cwd / 'raw'}",
    f"--data_dir={user.cwd / 'tfds'}",
  )
  assert_one_line(p, str(raw / "train.jsonl"), name)
  assert_untouched(before, snapshot(user.cwd))


# --- Hugging Face directories: convert and export name the file and field, and write nothing.


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
  """A tiny GPT-2 checkpoint, written by rmscale's own exporter."""
  import jax

  from rmscale import hf
  from rmscale.models import sizes
  from rmscale.models.transformer import init_params

  cfg = sizes.model_config("25k", vocab_size=16, family="gpt2", max_len=8)
  params, _ = init_params(cfg, jax.random.key(0))
  out = str(tmp_path_factory.mktemp("hf") / "gpt2")
  hf.save_pretrained(cfg, params, out)
  return out


def _drop_tensor(directory: str, name: str) -> None:
  from rmscale import hf

  ckpt = hf.HFCheckpoint(directory)
  keep = [n for n in ckpt.infos if n != name]
  specs = [(n, ckpt.infos[n].dtype, ckpt.shape(n)) for n in keep]
  hf.write_safetensors(os.path.join(directory, "model.safetensors"), specs, map(ckpt.read, keep))


def _edit_config(directory: str, **fields) -> None:
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump({**config, **fields}, f)


VICTIM = "transformer.h.1.mlp.c_fc.bias"


@pytest.mark.parametrize(
  "damage, names",
  [
    pytest.param(
      lambda d: os.remove(os.path.join(d, "config.json")), ["gpt2/config.json"], id="no-config"
    ),
    pytest.param(
      lambda d: _edit_config(d, model_type="mamba"),
      ["gpt2/config.json", "'model_type'='mamba'"],
      id="unknown-model-type",
    ),
    pytest.param(lambda d: _drop_tensor(d, VICTIM), ["gpt2", VICTIM], id="missing-tensor"),
    pytest.param(
      lambda d: _truncate(os.path.join(d, "model.safetensors"), 0.9),
      ["gpt2/model.safetensors", "truncated"],
      id="truncated-safetensors",
    ),
  ],
)
def test_hf_convert_errors(user, hf_dir, damage, names):
  directory = shutil.copytree(hf_dir, user.cwd / "gpt2")
  damage(str(directory))
  before = snapshot(user.cwd)
  p = user("rmscale.hf", "convert", "--hf_dir=gpt2", "--out=ckpt")
  assert_one_line(p, *names)
  assert_untouched(before, snapshot(user.cwd))
  assert not (user.cwd / "ckpt").exists()


def test_hf_checkpoint_without_config_in_a_run(user, hf_dir):
  """The gold RM of configs/overopt_pythia.py (a local checkpoint) lacks its config.json."""
  fixtures = importlib.util.spec_from_file_location(
    "preference_fixtures", os.path.join(ROOT, "tests", "data", "test_preferences.py")
  )
  module = importlib.util.module_from_spec(fixtures)
  fixtures.loader.exec_module(module)
  root = user.cwd / "data"
  module.word_tokenizer(root / "ckpts" / "tiny-policy", pad=False)
  module.write_hh(str(root / "raw" / "hh_rlhf"))
  gold = shutil.copytree(hf_dir, root / "ckpts" / "tiny-gold")
  os.remove(gold / "config.json")
  before = snapshot(root)
  p = user(
    "rmscale.main",
    f"--config=configs/overopt_pythia.py:root={root},policy=tiny-policy,rm=r,gold=tiny-gold,shrink",
    "--config.stages=gold",
    "--workdir=runs/w",
  )
  assert_one_line(p, "config.gold.hf_dir", str(gold / "config.json"))
  assert_untouched(before, snapshot(root), new_under=("tfds/",))  # The dataset, built on first use.


def test_hf_export_of_a_missing_checkpoint(user):
  before = snapshot(user.cwd)
  p = user("rmscale.hf", "export", "--ckpt=nockpt", "--out=hf")
  assert_one_line(p, str(user.cwd / "nockpt"))
  assert_untouched(before, snapshot(user.cwd))
  assert not (user.cwd / "nockpt").exists() and not (user.cwd / "hf").exists()


# --- The other command-line tools.


def _corrupt_launch_record(cwd, sweep_file) -> None:
  sweep_file(cwd / "s.py")
  run = cwd / "runs" / "sw" / "p_ramble-0.1"
  run.mkdir(parents=True)
  (run / "launch.json").write_text('{"state": "runn')


def _unfinished_shared_stage(cwd, sweep_file) -> None:
  del sweep_file
  (cwd / "sw" / "shared" / "gold").mkdir(parents=True)


TPU = ["run", "--name=p1", "--zone=z", "--accelerator=v4-8", "--dry_run", "--"]
SLURM = ["--name=j", "--dry_run", "--"]
MAIN = ["--config=configs/overopt.py"]


@pytest.mark.parametrize(
  "setup, module, args, names",
  [
    pytest.param(
      None,
      "launch.sweep",
      ["--config=sweeps/nope.py", "--workdir_root=runs"],
      ["sweeps/nope.py"],
      id="sweep-missing-file",
    ),
    pytest.param(
      _corrupt_launch_record,
      "launch.sweep",
      ["--config=s.py", "--workdir_root=runs/sw", "--status"],
      ["runs/sw/p_ramble-0.1/launch.json"],
      id="sweep-corrupt-launch-record",
    ),
    pytest.param(
      None,
      "launch.tpu",
      [*TPU, *MAIN, "--workdir=runs/x"],
      ["--workdir='runs/x'"],
      id="tpu-workdir",
    ),
    pytest.param(
      None,
      "launch.slurm",
      [*SLURM, *MAIN, "--workdir=gs://bucket/x"],
      ["--workdir=gs://bucket/x"],
      id="slurm-workdir",
    ),
    pytest.param(
      _unfinished_shared_stage,
      "launch.common",
      ["link", "--shared=sw/shared", "--workdir=sw/run", "--stages=gold"],
      ["'gold'", "sw/shared/stages/gold.json"],
      id="link-unfinished-stage",
    ),
    pytest.param(
      None,
      "rmscale.aot",
      ["--config=configs/overopt.py:runlocal", "--config.proxies.lr=-1", "--steps=rm"],
      ["config.proxies.lr=-1"],
      id="aot-config-value",
    ),
    pytest.param(
      None, "rmscale.aot", ["--config=configs/nope.py"], ["configs/nope.py"], id="aot-file"
    ),
    pytest.param(
      None, "benchmarks.train_step", ["--sizes=9z"], ["--sizes", "'9z'"], id="train_step"
    ),
    pytest.param(None, "benchmarks.sampler", ["--new_tokens=0"], ["--new_tokens"], id="sampler"),
    pytest.param(None, "benchmarks.fp8", ["--gemm_sizes=abc"], ["--gemm_sizes"], id="fp8"),
  ],
)
def test_other_tools(user, sweep_file, setup, module, args, names):
  if setup:
    setup(user.cwd, sweep_file)
  before = snapshot(user.cwd)
  p = user(module, *args)
  assert_one_line(p, *names)
  assert_untouched(before, snapshot(user.cwd))
