"""Ahead-of-time compilation: per-device byte counts that add up, the same program as the trainer's."""

import importlib.util
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from rmscale.data.world import World, WorldConfig
from rmscale import aot
from rmscale.parallel import mesh as mesh_lib
from rmscale.stages import common, roles
from rmscale.train import rm
from rmscale.train.state import compile_train_step, init_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _overopt(arg):
  spec = importlib.util.spec_from_file_location(
    "overopt", os.path.join(ROOT, "configs", "overopt.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _shard_bytes(tree) -> int:
  return sum(
    math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    for a in jax.tree.leaves(tree)
  )


def test_plan_covers_every_step_of_the_real_scale_config():
  cfg = _overopt("rm=85m+3b,data=90k")
  assert [(k, label, size, batch) for k, label, size, batch, _ in aot.plan_steps(cfg)] == [
    ("sft", "sft policy", "1.2b", 256),
    ("pretrain", "sft gold-LM", "pythia-6.9b", 256),
    ("rm", "rm gold", "pythia-6.9b", 128),
    ("pretrain", "sft proxy-LM", "85m", 256),
    ("rm", "rm proxy", "85m", 64),
    ("pretrain", "sft proxy-LM", "3b", 256),
    ("rm", "rm proxy", "3b", 64),
    ("sampler", "sample policy", "1.2b", 1024),
    ("score", "score gold", "pythia-6.9b", 1024),
    ("score", "score proxy", "85m", 1024),
    ("score", "score proxy", "3b", 1024),
    ("optimise", "ppo", "85m", 256),  # Methods declare their programs (bon compiles none).
    ("optimise", "ppo", "3b", 256),
  ]
  cfg.gold.kind = "oracle"
  assert not [s for s in aot.plan_steps(cfg) if "gold" in s[1]]


def test_every_methods_iteration_compiles_with_its_memory():
  """The methods' own jitted iterations, on abstract inputs sharded over 8 devices."""
  cfg = _overopt("runlocal,rm=3m,methods=bon+ppo+rloo+rejection")
  reports = aot.compile_config(cfg, kinds=("optimise",))
  assert [(r.step, r.size, r.batch) for r in reports] == [  # runlocal maps 3m to 100k.
    ("ppo iteration", "100k", 16),
    ("rloo iteration", "100k", 16),
    ("rejection iteration", "100k", 16),
  ]
  for r in reports:
    assert r.argument_bytes > 0 and r.temp_bytes > 0
    assert r.alias_bytes > 0  # The train state is donated.
    assert r.peak_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes


def test_rm_step_memory_adds_up_and_is_the_trainers_program():
  cfg = _overopt("runlocal,rm=3m")
  cfg.mesh = dict(data=2, fsdp=2, tensor=2)
  cfg.stages = "proxies"  # Just the proxy RM's steps.
  ((label, size, batch_size, compiled),) = list(
    aot.compile_steps(cfg, jax.devices(), kinds=("rm",))
  )
  assert (label, size, batch_size) == ("rm proxy", "100k", 32)
  report = aot.report(label, size, batch_size, compiled)

  mesh = mesh_lib.make_mesh(dict(cfg.mesh))
  ctx = common.Context(
    config=cfg,
    workdir="",
    mesh=mesh,
    rules=mesh_lib.rules_from_config(cfg.rules),
    world=World(WorldConfig(**cfg.world)),
  )
  model_cfg = roles.model_config(ctx, "100k", "rm")
  tx = make_optimizer(common.optim_config(cfg.proxies, 1000))
  abstract, shardings = aot.abstract_train_state(model_cfg, tx, mesh, ctx.rules)
  state_bytes = _shard_bytes(abstract)
  # Each device: its shards of the state, plus 32/4 comparison pairs of 33 int32 tokens and 33 bool mask.
  batch_bytes = 2 * (32 // 4) * 33 * (4 + 1)
  assert report.argument_bytes == state_bytes + batch_bytes
  assert report.alias_bytes == state_bytes  # The donated state is updated in place.
  assert report.output_bytes >= state_bytes and report.temp_bytes > 0
  assert (
    report.peak_bytes
    == report.argument_bytes + report.output_bytes - state_bytes + report.temp_bytes
  )
  # FSDP x tensor sharding: the 4-way split parameters and moments take well under a replica's bytes.
  replica = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract))
  assert state_bytes < 0.5 * replica

  # The AOT executable is the trainer's step: same updated state and metrics on real inputs.
  data = {
    k: np.random.default_rng(0).integers(1, 50, (32, 33)).astype(np.int32)
    if not k.endswith("mask")
    else np.ones((32, 33), bool)
    for k in rm.BATCH_KEYS
  }
  batch = mesh_lib.put_batch(data, mesh)
  state, _ = init_state(model_cfg, tx, jax.random.key(0), mesh, ctx.rules)
  host = jax.device_get(state)  # Both steps donate their input state: each gets its own copy.
  aot_state, aot_metrics = compiled(jax.device_put(host, shardings), batch)
  ref_step = compile_train_step(
    rm.make_rm_loss(model_cfg, cfg.proxies.score_l2), tx, shardings, mesh, ctx.rules
  )
  ref_state, ref_metrics = ref_step(jax.device_put(host, shardings), batch)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(aot_metrics), jax.device_get(ref_metrics)
  )
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(aot_state), jax.device_get(ref_state))


def test_oom_verdict_and_topology_errors():
  r = aot.StepReport(
    "rm gold",
    "3b",
    64,
    argument_bytes=10 * 2**30,
    output_bytes=10 * 2**30,
    temp_bytes=7 * 2**30,
    alias_bytes=10 * 2**30,
    code_bytes=0,
  )
  assert r.peak_bytes == 17 * 2**30
  table = aot.format_table([r], 16 * 2**30, 256, "TPU v5 lite")
  assert "17.00 GiB" in table and table.splitlines()[-1].endswith("OOM")
  assert aot.format_table([r], 32 * 2**30, 256, "TPU v5 lite").splitlines()[-1].endswith("ok")
  with pytest.raises(ValueError, match="unknown steps"):
    aot.compile_config(_overopt("runlocal"), kinds=("backward",))
  try:
    import libtpu  # noqa: F401
  except ImportError:
    with pytest.raises(ValueError, match="needs libtpu installed"):
      aot.topology_devices("v5e:2x2")


def test_cli_writes_the_json_report_where_the_user_means(cli):
  (cli.cwd / "configs").mkdir()
  shutil.copy(os.path.join(ROOT, "configs", "overopt.py"), cli.cwd / "configs")
  p = cli(
    "rmscale.aot",
    "--config=configs/overopt.py:runlocal,rm=3m",  # Relative to where the user is.
    "--config.stages=proxies",
    "--steps=rm",
    "--json=~/reports/aot.json",
  )
  assert p.returncode == 0, p.stderr
  with open(cli.home / "reports" / "aot.json") as f:
    report = json.load(f)
  assert [(s["step"], s["size"], s["batch"]) for s in report["steps"]] == [("rm proxy", "100k", 32)]
  assert os.listdir(cli.home / "reports") == ["aot.json"]  # Written whole: no temporary left.
