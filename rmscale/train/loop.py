"""The one training loop every stage and method uses: resume, step, log, evaluate, check for NaN,
checkpoint.

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
  eval_every: int = 0,
  evaluate: Callable[[State, int], dict | None] | None = None,
  postfix: tuple[str, ...] = ("loss", "accuracy"),
) -> tuple[State, list[dict], list[dict]]:
  """Runs ``step_fn(state, batch_fn(step))`` until ``state['step'] == num_steps``.

  Returns ``(state, history, evals)``: the logged metrics (each with ``step``) and the evaluations.
  Every ``eval_every`` steps, and at 0 and at the end, ``evaluate(state, step)`` runs; a dict it
  returns is kept in ``evals`` (with ``step``). Both lists are checkpointed with the state, so after
  a resume they are whole; evaluations after the last checkpoint are redone, so write results from
  the returned lists. With ``ckpt_dir``, the latest checkpoint there (if any) replaces ``state``
  before training and a checkpoint is written every ``save_every`` steps and at the end. NaN or inf
  in a logged metric raises, naming it.
  """
  if eval_every and evaluate is None:
    raise ValueError("train_loop: eval_every > 0 needs evaluate")
  history: list[dict] = []
  evals: list[dict] = []
  ckpt = Checkpointer(ckpt_dir, max_to_keep=2) if ckpt_dir else None

  def run_eval(step: int):
    record = evaluate(state, step)
    if record is not None:
      evals.append({"step": step, **record})
      if writer is not None:
        for k, v in record.items():
          if isinstance(v, (int, float)):
            writer.add_scalar(f"{desc}_eval/{k}", v, step)

  try:
    state, meta = restore_latest(ckpt, state, state_shardings, desc)
    history, evals = list(meta.get("history", [])), list(meta.get("evals", []))
    start = int(jax.device_get(state["step"]))
    if eval_every and start == 0:
      run_eval(0)
    bar = progress_bar(start, num_steps, desc)
    for step in bar:
      state, metrics = step_fn(state, batch_fn(step))
      done = step + 1
      last = done == num_steps
      if done % log_every == 0 or last:
        host = check_finite(metrics, step)
        history.append({"step": done, **host})
        bar.set_postfix({k: f"{v:.4g}" for k, v in host.items() if k in postfix})
        if writer is not None:
          for k, v in host.items():
            writer.add_scalar(f"{desc}/{k}", v, done)
        if on_log is not None:
          on_log(done, host)
      if eval_every and (done % eval_every == 0 or last):
        run_eval(done)
      if ckpt is not None and (last or (save_every and done % save_every == 0)):
        meta = {"data_position": done, "history": history, "evals": evals}
        ckpt.save(done, state, meta, force=True)
    if ckpt is not None:
      ckpt.wait()
  finally:
    if ckpt is not None:
      ckpt.close()
  return state, history, evals
