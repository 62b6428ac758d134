"""Multi-host start-up: the decision logic, and a real 2-process jax.distributed run on localhost CPU."""

import importlib.util
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from rmscale.checkpoint import Checkpointer, abstract_like
from rmscale.models import sizes
from rmscale.parallel import distributed
from rmscale.parallel import mesh as mesh_lib
from rmscale.train.state import init_state

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
_spec = importlib.util.spec_from_file_location("_dist_worker", WORKER)
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)

SLURM = {
  "SLURM_JOB_ID": "77",
  "SLURM_STEP_NODELIST": "gpu[01-02]",
  "SLURM_NTASKS": "16",
  "SLURM_PROCID": "3",
  "SLURM_LOCALID": "3",
}


@pytest.mark.parametrize(
  "env,kwargs,kind",
  [
    ({}, {}, "single"),
    # A one-task SLURM job or a one-worker TPU VM is a single host: nothing to join.
    ({**SLURM, "SLURM_NTASKS": "1"}, {}, "single"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, {}, "single"),
    (SLURM, {}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, {}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, {}, "tpu"),
    ({}, {"mode": "on"}, "auto-detected"),
    ({"RMSCALE_DISTRIBUTED": "on"}, {}, "auto-detected"),
    (SLURM, {"mode": "off"}, "single"),
    (
      {"RMSCALE_COORDINATOR": "h:1", "RMSCALE_NUM_PROCESSES": "1", "RMSCALE_PROCESS_ID": "0"},
      {},
      "single",
    ),
  ],
)
def test_plan_detects_the_job(env, kwargs, kind):
  assert distributed.plan(env=env, **kwargs).kind == kind


def test_plan_explicit_settings_flags_override_env():
  env = {
    "RMSCALE_COORDINATOR": "10.1.1.1:1234",
    "RMSCALE_NUM_PROCESSES": "4",
    "RMSCALE_PROCESS_ID": "2",
    "RMSCALE_LOCAL_DEVICE_IDS": "0,1",
    **SLURM,
  }
  p = distributed.plan(env=env)
  assert (p.kind, p.coordinator_address, p.num_processes, p.process_id, p.local_device_ids) == (
    "explicit",
    "10.1.1.1:1234",
    4,
    2,
    (0, 1),
  )
  p = distributed.plan(process_id=3, env=env)
  assert p.process_id == 3
  # One GPU-node task driving all 8 GPUs (SLURM 'per node' mode) passes its device ids on.
  assert distributed.plan(
    env={**SLURM, "RMSCALE_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"}
  ).local_device_ids == tuple(range(8))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(coordinator_address="h:1", num_processes=2), r"missing \['process_id'\]"),
    (
      dict(coordinator_address="h:1", num_processes=2, process_id=2),
      r"process_id=2 must be in \[0, ",
    ),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "must be host:port"),
    (
      dict(coordinator_address="h:1", num_processes=0, process_id=0),
      "num_processes=0 must be >= 1",
    ),
    (dict(mode="maybe"), "distributed mode 'maybe' is not one of"),
    (dict(local_device_ids="0,0"), "distinct non-negative"),
  ],
)
def test_plan_bad_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan(env={}, **kwargs)


def test_initialize_is_a_no_op_on_one_host(monkeypatch):
  for var in [
    *SLURM,
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "RMSCALE_DISTRIBUTED",
    "RMSCALE_COORDINATOR",
    "RMSCALE_NUM_PROCESSES",
    "RMSCALE_PROCESS_ID",
  ]:
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize().kind == "single"
  assert distributed.initialize(mode="off").kind == "single"
  assert not jax.distributed.is_initialized() and jax.process_count() == 1
  assert distributed.is_writer()
  distributed.barrier("single process")  # Returns at once.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """The output directory of one 2-process run of ``_dist_worker.py`` (RM training, then PPO)."""
  tmp_path = tmp_path_factory.mktemp("dist")
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {
      **os.environ,
      "RMSCALE_COORDINATOR": f"localhost:{port}",
      "RMSCALE_NUM_PROCESSES": "2",
      "RMSCALE_PROCESS_ID": str(pid),
    }
    procs.append(
      subprocess.Popen(
        [sys.executable, WORKER, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  return tmp_path


def test_two_process_rm_training_matches_single_process(two_process_run):
  tmp_path = two_process_run
  # Single process, one device: the reference.
  ref_losses, ref_state = _worker.train(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  ref = _worker.flatten(ref_state["params"])
  ref_scores = _worker.score(ref_state["params"], dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  assert ref_losses[-1] < 0.5 * ref_losses[0]  # It learns the planted preference.
  outs = [dict(np.load(tmp_path / f"p{pid}.npz")) for pid in range(2)]
  for pid, out in enumerate(outs):
    # fp32 reductions run in another order (and over gloo): agreement to reduction noise.
    np.testing.assert_allclose(out["losses"], ref_losses, rtol=2e-5)
    np.testing.assert_allclose(out["scores"], ref_scores, atol=1e-5)
    chosen, rejected = np.split(out["scores"], 2)
    assert np.all(chosen > rejected)  # The trained RM prefers the planted winner.
    np.testing.assert_array_equal(out["rows"], np.arange(8.0))
    assert out["agree"]  # Process 0's True reached process 1 too.
    for k, v in ref.items():
      np.testing.assert_allclose(out[k], v, atol=1e-6, rtol=1e-4, err_msg=k)
    # The FSDP-sharded kernel (embed=64 rows over fsdp=2) is split across hosts: rows 0-31 on
    # process 0, 32-63 on process 1, and neither host holds the whole array.
    assert not out["fully_addressable"]
    assert out["addressable_rows"].tolist() == [32 * pid]

  # The checkpoint both hosts wrote (each its own shards) restores in one process onto another mesh.
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
  cfg = sizes.model_config("100k", vocab_size=_worker.V, reward_head="linear", d_ff=128)
  fresh, shardings = init_state(cfg, optax.sgd(0.05, momentum=0.9), jax.random.key(1), mesh)
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    restored, meta = ckpt.restore(target=abstract_like(fresh, shardings))
  assert meta == {"data_position": _worker.STEPS} and int(restored["step"]) == _worker.STEPS
  kernel = restored["params"]["layers_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  for k, v in _worker.flatten(restored["params"]).items():
    np.testing.assert_array_equal(v, outs[0][k], err_msg=k)


def test_two_process_ppo_matches_single_process(two_process_run):
  """PPO as the rl stage runs it (host-array prompts every process holds in full, sharded policy,
  reference and reward model, evaluation fetched to every host) on 2 processes x 2 devices, against
  the same run on one device: same metrics, samples, KL, scores and policy."""
  ref = _worker.ppo_run(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  outs = [dict(np.load(two_process_run / f"ppo{pid}.npz")) for pid in range(2)]
  assert outs[0].keys() == ref.keys()
  for k in outs[0]:
    np.testing.assert_array_equal(outs[1][k], outs[0][k], err_msg=k)  # Every host: the same.
  out = outs[0]
  np.testing.assert_array_equal(out["eval_tokens"], ref["eval_tokens"])
  np.testing.assert_array_equal(out["eval_mask"], ref["eval_mask"])
  np.testing.assert_allclose(out["eval_kl"], ref["eval_kl"], atol=1e-5)
  np.testing.assert_allclose(out["eval_score"], ref["eval_score"], atol=1e-5)
  for k in ref:
    if k.startswith("metric_"):
      np.testing.assert_allclose(out[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    elif k.startswith("param_"):
      np.testing.assert_allclose(out[k], ref[k], atol=1e-5, rtol=1e-4, err_msg=k)
  # Not a vacuous match: 12 evaluation samples of [4 prompt | 4 response] tokens, a policy that
  # moved away from its reference (KL > 0), and responses the reward model tells apart.
  assert out["eval_tokens"].shape == (_worker.EVAL_PROMPTS, _worker.PPO_P + _worker.PPO_N)
  assert out["metric_kl_mean"][-1] != 0 and np.all(ref["eval_kl"] != 0)
  assert np.ptp(ref["eval_score"]) > 0
