"""The one training loop every stage uses: resume, step, log, check for NaN, checkpoint.

Batches are a pure function of the step (``batch_fn(step)``), so the data position is the step and a
run killed at any point resumes from its last checkpoint to the same final parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
from tqdm.auto import tqdm

from rmscale.checkpoint import Checkpointer, abstract_like
from rmscale.train.state import State, check_finite

_log = logging.getLogger(__name__)


def restore_latest(ckpt: Checkpointer | None, state: State, state_shardings, desc: str):
  """``(state, meta)`` from the latest checkpoint in ``ckpt`` if there is one, else ``(state, {})``."""
  if ckpt is None or ckpt.latest_step() is None:
    return state, {}
  state, meta = ckpt.restore(target=abstract_like(state, state_shardings))
  _log.info("%s: resumed at step %d from %s", desc, int(state["step"]), ckpt.directory)
  return state, meta


def progress_bar(start: int, total: int, desc: str):
  """Steps ``start..total`` with a progress bar on process 0 only."""
  return tqdm(
    range(start, total),
    desc=desc,
    initial=start,
    total=total,
    disable=jax.process_index() != 0,
    leave=False,
    mininterval=2.0,
  )


def train_loop(
  state: State,
  state_shardings,
  step_fn: Callable,
  batch_fn: Callable[[int], dict],
  num_steps: int,
  *,
  ckpt_dir: str | None = None,
  save_every: int = 0,
  log_every: int = 50,
  writer=None,
  desc: str = "train",
  on_log: Callable[[int, dict], None] | None = None,
) -> tuple[State, list[dict]]:
  """Runs ``step_fn`` until ``state['step'] == num_steps``; returns the state and logged metrics.

  With ``ckpt_dir``, the latest checkpoint there (if any) replaces ``state`` before training and a
  checkpoint is written every ``save_every`` steps and at the end.
  """
  history: list[dict] = []
  ckpt = Checkpointer(ckpt_dir, max_to_keep=2) if ckpt_dir else None
  try:
    state, meta = restore_latest(ckpt, state, state_shardings, desc)
    history = list(meta.get("history", []))
    start = int(jax.device_get(state["step"]))
    bar = progress_bar(start, num_steps, desc)
    for step in bar:
      state, metrics = step_fn(state, batch_fn(step))
      last = step + 1 == num_steps
      if (step + 1) % log_every == 0 or last:
        host = check_finite(metrics, step)
        history.append({"step": step + 1, **host})
        bar.set_postfix({k: f"{v:.4g}" for k, v in host.items() if k in ("loss", "accuracy")})
        if writer is not None:
          for k, v in host.items():
            writer.add_scalar(f"{desc}/{k}", v, step + 1)
        if on_log is not None:
          on_log(step + 1, host)
      if ckpt is not None and (last or (save_every and (step + 1) % save_every == 0)):
        ckpt.save(step + 1, state, {"data_position": step + 1, "history": history}, force=True)
    if ckpt is not None:
      ckpt.wait()
  finally:
    if ckpt is not None:
      ckpt.close()
  return state, history
