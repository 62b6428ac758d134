"""Multi-host start-up: one process per host (or per GPU) joined by ``jax.distributed``.

JAX's runtime is multi-controller: every process runs the same program on its own devices, and
``jax.distributed.initialize`` connects them before the first computation. ``initialize`` below
decides whether to call it:

- explicit settings (arguments, or ``RMSCALE_COORDINATOR`` / ``RMSCALE_NUM_PROCESSES`` /
  ``RMSCALE_PROCESS_ID`` [/ ``RMSCALE_LOCAL_DEVICE_IDS``]) win; one process is a no-op;
- ``mode='auto'`` (the default) also joins a SLURM job step with several tasks, an Open MPI job with
  several ranks, and a TPU pod whose workers are listed in ``TPU_WORKER_HOSTNAMES``;
- ``mode='on'`` always calls ``jax.distributed.initialize()`` and lets JAX detect the cluster (the
  TPU and SLURM launchers pass it, so a pod never silently runs as independent single hosts);
- ``mode='off'`` never does (one host, or a debugging session on one worker).

Then every process computes, only process 0 writes results and logs (``is_writer``), and
``barrier`` keeps the others from reading a file before process 0 has written it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

MODES = ("auto", "on", "off")
ENV_MODE = "RMSCALE_DISTRIBUTED"
ENV_COORDINATOR = "RMSCALE_COORDINATOR"
ENV_NUM_PROCESSES = "RMSCALE_NUM_PROCESSES"
ENV_PROCESS_ID = "RMSCALE_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "RMSCALE_LOCAL_DEVICE_IDS"
# SLURM variables JAX's own SlurmCluster reads; all must be present for it to work.
_SLURM_VARS = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``initialize`` will do: ``kind`` is 'single', 'explicit' or a detected cluster name."""

  kind: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def distributed(self) -> bool:
    return self.kind != "single"


def _int(value, name: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _device_ids(value, name: str) -> tuple[int, ...] | None:
  if value is None or value == "":
    return None
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  ids = tuple(_int(v, name) for v in value)
  if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ValueError(f"{name}={value!r} must be distinct non-negative device ids")
  return ids


def plan(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | str | None = None,
  mode: str | None = None,
  env: Mapping[str, str] | None = None,
) -> Plan:
  """Decides, without touching JAX, how this process joins its job (see the module docstring)."""
  env = os.environ if env is None else env
  mode = mode or env.get(ENV_MODE) or "auto"
  if mode not in MODES:
    raise ValueError(
      f"distributed mode {mode!r} is not one of {MODES} (flag --distributed or ${ENV_MODE})"
    )
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
  local_ids = _device_ids(
    local_device_ids if local_device_ids is not None else env.get(ENV_LOCAL_DEVICE_IDS),
    "local_device_ids",
  )
  if mode == "off":
    return Plan("single")

  explicit = {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  given = {k for k, v in explicit.items() if v is not None}
  if given:
    if given != set(explicit):
      missing = sorted(set(explicit) - given)
      raise ValueError(
        f"explicit multi-host start-up needs coordinator_address, num_processes and "
        f"process_id together (flags or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
        f"${ENV_PROCESS_ID}); missing {missing}"
      )
    if num_processes < 1:
      raise ValueError(f"num_processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if ":" not in coordinator_address:
      raise ValueError(f"coordinator_address={coordinator_address!r} must be host:port")
    if num_processes == 1:
      return Plan("single")
    return Plan("explicit", coordinator_address, num_processes, process_id, local_ids)

  if mode == "on":
    return Plan("auto-detected", local_device_ids=local_ids)
  if all(v in env for v in _SLURM_VARS) and _int(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
    return Plan("slurm", local_device_ids=local_ids)
  if _int(env.get("OMPI_COMM_WORLD_SIZE", "1"), "OMPI_COMM_WORLD_SIZE") > 1:
    return Plan("ompi", local_device_ids=local_ids)
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return Plan("tpu", local_device_ids=local_ids)
  return Plan("single")


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | str | None = None,
  mode: str | None = None,
) -> Plan:
  """Joins the job's other processes if there are any; call before any JAX computation.

  Idempotent: a second call (or one after JAX was initialised elsewhere) changes nothing.
  """
  p = plan(coordinator_address, num_processes, process_id, local_device_ids, mode)
  if not p.distributed or jax.distributed.is_initialized():
    return p
  kwargs = {}
  if p.local_device_ids is not None:
    kwargs["local_device_ids"] = list(p.local_device_ids)
  if p.kind == "explicit":
    kwargs.update(
      coordinator_address=p.coordinator_address,
      num_processes=p.num_processes,
      process_id=p.process_id,
    )
  jax.distributed.initialize(**kwargs)
  return p


def is_writer() -> bool:
  """Whether this process writes results, plots and logs (process 0 of the job)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op on one process).

  Used after process 0 writes a file that the others read next.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def global_array(x, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host value that every process holds *in full* (e.g. prompts drawn from a shared seed), laid
  out with ``sharding``; each process places only the shards of its own devices.

  Plain ``jit(f, in_shardings=...)(numpy_array)`` refuses non-replicated shardings across processes;
  for per-host *slices* of a batch use ``mesh.put_batch`` instead.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(tree):
  """Fetches a pytree of (possibly multi-host sharded) arrays as numpy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def agree(flag: bool) -> bool:
  """Process 0's value of ``flag`` on every process: one decision where hosts could disagree (e.g. a
  file check racing with process 0's write), so that all take the same branch and run the same
  collectives."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))
