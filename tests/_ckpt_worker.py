"""A tiny resumable training run for tests/test_checkpoint.py, run as a subprocess.

Linear regression with optax adam. The train state carries the params, the optimizer state, the
step and a typed PRNG key (split every step for the label noise); the data position (how many
batches were consumed) lives in the checkpoint's JSON meta, as a real input pipeline's would.
The run resumes from the newest readable checkpoint, and can SIGKILL itself right after a given
step's save was issued, i.e. while an asynchronous save may still be writing.

    python tests/_ckpt_worker.py CKPT_DIR OUT.npz --steps 12 --save-every 3 [--kill-at 6]
"""

from __future__ import annotations

import argparse
import os
import signal
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmscale.checkpoint import Checkpointer, abstract_like

DIM, BATCH = 4, 8
W_TRUE = np.arange(1.0, DIM + 1, dtype=np.float32)
_OPT = optax.adam(0.05)


def init_state(seed: int) -> dict:
  rng, init_rng = jax.random.split(jax.random.key(seed))
  params = {"w": 0.1 * jax.random.normal(init_rng, (DIM,)), "b": jnp.zeros(())}
  return {"params": params, "opt_state": _OPT.init(params), "step": jnp.int32(0), "rng": rng}


def batch_at(seed: int, position: int) -> np.ndarray:
  """The `position`-th batch of inputs: a pure function of the position, like a data source."""
  batch_rng = jax.random.fold_in(jax.random.key(seed + 1), position)
  return np.asarray(jax.random.normal(batch_rng, (BATCH, DIM)))


@partial(jax.jit, donate_argnums=0)
def train_step(state: dict, x_BxD: jax.Array) -> dict:
  rng, noise_rng = jax.random.split(state["rng"])
  y_B = x_BxD @ W_TRUE + 0.5 + 0.1 * jax.random.normal(noise_rng, (BATCH,))

  def loss(params):
    return jnp.mean((x_BxD @ params["w"] + params["b"] - y_B) ** 2)

  grads = jax.grad(loss)(state["params"])
  updates, opt_state = _OPT.update(grads, state["opt_state"], state["params"])
  return {
    "params": optax.apply_updates(state["params"], updates),
    "opt_state": opt_state,
    "step": state["step"] + 1,
    "rng": rng,
  }


def train(
  num_steps: int,
  seed: int = 0,
  ckpt_dir: str | None = None,
  save_every: int = 1,
  kill_at: int | None = None,
) -> dict:
  """Runs to `num_steps`; with `ckpt_dir`, resumes from and saves to it. Returns numpy params."""
  state, position = init_state(seed), 0
  ckpt = Checkpointer(ckpt_dir, save_interval_steps=save_every, max_to_keep=2) if ckpt_dir else None
  if ckpt is not None and ckpt.latest_step() is not None:
    state, meta = ckpt.restore(target=abstract_like(state))
    position = meta["data_position"]
    print(f"resumed_from {int(state['step'])}", flush=True)
  for step in range(int(state["step"]), num_steps):
    state = train_step(state, batch_at(seed, position))
    position += 1
    if ckpt is not None:
      ckpt.save(step + 1, state, {"data_position": position, "seed": seed})
      if step + 1 == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
  if ckpt is not None:
    ckpt.close()
  return jax.tree.map(np.asarray, state["params"])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("ckpt_dir")
  parser.add_argument("out")
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--save-every", type=int, required=True)
  parser.add_argument("--kill-at", type=int, default=None)
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  params = train(
    args.steps, ckpt_dir=args.ckpt_dir, save_every=args.save_every, kill_at=args.kill_at
  )
  tmp = args.out + ".tmp.npz"
  np.savez(tmp, **params)
  os.replace(tmp, args.out)


if __name__ == "__main__":
  main()
