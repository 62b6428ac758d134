"""Train-state checkpoints on orbax: keep-last-k, async saves, resharding restores.

A checkpoint step holds two items: ``state`` (any pytree of arrays and scalars, e.g. the plain
dict ``{"params", "opt_state", "step", "rng"}``) and ``meta`` (a small JSON dict: data position,
config hash, ...). Orbax writes each step into a temporary directory and renames it on commit, so
a process killed mid-save leaves no committed step, only a temporary directory that is ignored
and cleaned up at the next start.

Typical trainer use::

    with Checkpointer(workdir / "ckpt", save_interval_steps=100, max_to_keep=3) as ckpt:
        position = 0
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(target=abstract_like(state))
            position = meta["data_position"]
        for step in range(int(state["step"]), num_steps):
            state, metrics = train_step(state, next_batch(position), rng)
            position += 1
            ckpt.save(step + 1, state, {"data_position": position})
        ckpt.save(num_steps, state, {"data_position": position}, force=True)
    # leaving the block waits for the last asynchronous save
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from rmscale import fs
from rmscale.errors import UserError

PyTree = Any
_log = logging.getLogger(__name__)


class CorruptCheckpointError(UserError, RuntimeError):
  """A committed checkpoint step whose files cannot be read back (a UserError: damaged files)."""


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(abstract_key: jax.ShapeDtypeStruct) -> str:
  # jax.random.key_impl only accepts (traced) key arrays, not ShapeDtypeStructs; tracing
  # a no-op recovers the implementation name from the abstract value alone.
  names = []
  jax.eval_shape(lambda k: names.append(jax.random.key_impl(k)), abstract_key)
  return str(names[0])


def _keys_to_data(tree: PyTree) -> PyTree:
  """Typed PRNG keys -> their uint32 data, which orbax can serialise."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(abstract_key: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  # Keep the key's sharding: key data only adds trailing (replicated) dimensions.
  unsharded = jax.ShapeDtypeStruct(abstract_key.shape, abstract_key.dtype)
  data = jax.eval_shape(jax.random.key_data, unsharded)
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=abstract_key.sharding)


def abstract_like(state: PyTree, shardings: Any = None) -> PyTree:
  """Restore target for `Checkpointer.restore`: the structure, shapes and dtypes of `state`.

  Array leaves become `jax.ShapeDtypeStruct`s carrying a sharding, so that orbax reads each
  shard straight onto its device: the leaf's own sharding, or the one from `shardings`, which
  is a single `jax.sharding.Sharding` for every array or a pytree prefix of `state` (e.g. the
  `out_shardings` of a sharded init). Restoring onto a sharding other than the saved one
  reshards. numpy leaves without a given sharding restore as numpy arrays; Python scalars are
  kept as they are and restore as Python scalars.
  """

  def leaf(x, sharding):
    if isinstance(x, (bool, int, float)):
      return x
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"abstract_like: cannot checkpoint a leaf of type {type(x).__name__}")
    if sharding is None:
      sharding = getattr(x, "sharding", None)
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
      raise ValueError(f"abstract_like: expected a jax.sharding.Sharding, got {sharding!r}")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  if shardings is None:
    return jax.tree.map(lambda x: leaf(x, None), state)
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: leaf(x, s), sub), shardings, state)


class _AbandonedReads(logging.Filter):
  """Quiets the aftermath of a restore that fails on a damaged file: orbax stops at the first error
  and closes its event loop while tensorstore still finishes the other reads it started. Each of
  those then fails with ``RuntimeError('Event loop is closed')`` (printed as an unraisable
  exception: a traceback) and leaves a task whose error nobody retrieves (logged by asyncio, with
  its traceback): a dozen tracebacks around the one-line error. Those two, and only those, are
  dropped; installed once, before the first restore (they can come before its error does)."""

  installed = False

  def filter(self, record: logging.LogRecord) -> bool:  # "Task/Future exception was never ..."
    return not record.getMessage().split("\n", 1)[0].endswith("exception was never retrieved")

  @classmethod
  def install(cls) -> None:
    if cls.installed:
      return
    cls.installed = True
    logging.getLogger("asyncio").addFilter(cls())
    previous = sys.unraisablehook

    def hook(unraisable):
      closed = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == (
        "Event loop is closed"
      )
      if not closed:
        previous(unraisable)

    sys.unraisablehook = hook


def _check_meta(meta: Any) -> dict:
  if meta is None:
    return {}
  if not isinstance(meta, dict):
    raise ValueError(f"checkpoint meta must be a JSON-serialisable dict, got {type(meta).__name__}")
  try:
    json.dumps(meta)
  except TypeError as e:
    raise ValueError(f"checkpoint meta is not JSON-serialisable: {e}") from e
  return meta


class Checkpointer:
  """A directory of train-state checkpoints, one subdirectory per step.

  Args:
    directory: local path or ``gs://`` URL; created if missing.
    save_interval_steps: `save` writes only steps that are multiples of this (plus the first
      save into an empty directory, and any save with ``force=True``).
    max_to_keep: keep only the newest this many steps (None keeps all).
    async_save: write in a background thread; `save` returns at once and the caller may go on
      training, donating its state buffers included (orbax keeps what it still has to write).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    save_interval_steps: int = 1,
    max_to_keep: int | None = None,
    async_save: bool = True,
  ):
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be an int >= 1, got {save_interval_steps!r}")
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be None or an int >= 1, got {max_to_keep!r}")
    # Newer orbax deprecates max_to_keep in favour of preservation policies; use them where
    # they exist so that it keeps working when max_to_keep goes away.
    latest_n = getattr(getattr(ocp, "checkpoint_managers", None), "LatestN", None)
    if max_to_keep is None:
      keep = {}
    elif latest_n is not None:
      keep = {"preservation_policy": latest_n(max_to_keep)}
    else:
      keep = {"max_to_keep": max_to_keep}
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save,
      # Leftovers of saves killed before their commit-rename; never valid checkpoints.
      cleanup_tmp_directories=True,
      create=True,
      **keep,
    )
    self.directory = fs.resolve(directory)  # orbax refuses relative paths.
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # -- queries -------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (a committed step can still be corrupt on disk)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- save ----------------------------------------------------------------------------
  def save(self, step: int, state: PyTree, meta: dict | None = None, force: bool = False) -> bool:
    """Saves `state` and `meta` as `step` if the save interval says so (or `force`).

    Returns whether a save was started. A committed step is never overwritten, even with
    `force`, and without `force` nothing at or below the latest committed step is saved, so
    re-running steps after a resume (or a final forced save) is harmless.
    """
    meta = _check_meta(meta)
    step = int(step)
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(_keys_to_data(state)),
      meta=ocp.args.JsonSave(meta),
    )
    return bool(self._manager.save(step, args=args, force=force))

  # -- restore -------------------------------------------------------------------------
  def _restore_step(self, step: int, target: PyTree | None) -> tuple[PyTree, dict]:
    _AbandonedReads.install()
    if target is None:
      state_args = ocp.args.StandardRestore()
    else:
      target_data = jax.tree.map(lambda x: _abstract_key_data(x) if _is_key(x) else x, target)
      state_args = ocp.args.StandardRestore(target_data)
    try:
      args = ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
      out = self._manager.restore(step, args=args)
      state, meta = out["state"], out["meta"]
      if not isinstance(meta, dict):  # JsonRestore of a vanished file can give None
        raise ValueError(f"meta item unreadable (got {meta!r})")
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      raise CorruptCheckpointError(
        f"checkpoint step {step} at {self.step_path(step)} cannot be restored: "
        f"{type(e).__name__}: {str(e)[:500]}"
      ) from e
    if target is not None:
      state = jax.tree.map(
        lambda t, x: jax.random.wrap_key_data(x, impl=_key_impl_name(t)) if _is_key(t) else x,
        target,
        state,
      )
    return state, meta

  def restore(self, step: int | None = None, target: PyTree | None = None) -> tuple[PyTree, dict]:
    """Returns ``(state, meta)`` of `step`, or of the latest readable step if None.

    `target` (see `abstract_like`) fixes structure, dtypes and shardings, and turns saved
    PRNG key data back into typed keys; without it arrays come back as saved, keys as uint32
    data. With ``step=None`` a damaged latest step is skipped with a warning in favour of
    the newest one that reads back; an explicit damaged `step` raises
    `CorruptCheckpointError` naming its directory. Every process of a multi-host job must
    call this (orbax reads collectively), and the damage must look the same to all of them.
    """
    self._manager.wait_until_finished()  # a save in flight from this process must land first
    steps = self.all_steps()
    if step is not None:
      step = int(step)
      if step not in steps:
        raise fs.MissingFileError(
          f"no committed checkpoint for step {step} in {self.directory} (steps: {steps})"
        )
      return self._restore_step(step, target)
    if not steps:
      raise fs.MissingFileError(f"no committed checkpoint in {self.directory}")
    errors = []
    for s in reversed(steps):
      try:
        restored = self._restore_step(s, target)
      except CorruptCheckpointError as e:
        errors.append(e)
        _log.warning("%s; falling back to an earlier step", e)
        continue
      if errors:
        _log.warning(
          "restored checkpoint step %d from %s after skipping damaged steps %s",
          s,
          self.directory,
          steps[len(steps) - len(errors) :],
        )
      return restored
    raise CorruptCheckpointError(
      f"no checkpoint step in {self.directory} could be restored (tried {steps[::-1]}); "
      "if every step fails, the restore target probably does not match the saved state. "
      f"Latest error: {errors[0]}"
    ) from errors[0]

  # -- lifecycle -----------------------------------------------------------------------
  def wait(self) -> None:
    """Blocks until asynchronous saves are committed (call before exiting a process)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
