"""Train state (a plain dict), optimizers, sharded initialisation and the generic jitted train step.

State: ``{'params', 'opt_state', 'step', 'rng'}`` with ``rng`` stored as raw key data (uint32) so it
checkpoints like any array, plus ``'fp8_meta'`` (replicated amax histories and scales) when the model
has FP8 matmuls. Parameters and optimizer state are created already sharded:
``eval_shape`` of a boxed init -> logical specs -> NamedShardings -> ``jit(init, out_shardings=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import FP8_META_KEY, Transformer
from rmscale.ops import fp8, fp8_optim
from rmscale.parallel import mesh as mesh_lib

State = dict[str, Any]
# loss_fn(params, batch, rng) -> (loss, metrics dict of scalars)
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
# grads_fn(loss_fn, params, fp8_meta or None, batch, rng)
#   -> ((loss, metrics), param grads, fp8 meta "gradients" or None); see loss_and_grads.
GradsFn = Callable[..., tuple[tuple[jax.Array, dict], Any, Any]]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  total_steps: int = 1000  # Length of the decay; the schedule ends at end_lr_fraction * lr.
  schedule: str = "cosine"  # "cosine" | "linear" | "constant"
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0  # Global-norm clipping; 0 disables.
  # "fp8": FP8-LM O2 moments, E4M3 first and float16 second, per-tensor scaled (ops/fp8_optim.py).
  moments: str = "float32"
  # Master copy of the params in the optimizer state ("float32", "float16", "bfloat16"); None: the
  # params (in the model's param_dtype) are the master weights.
  master_dtype: str | None = None

  def __post_init__(self):
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ValueError(f"optim.schedule={self.schedule!r} is not one of cosine, linear, constant")
    if self.moments not in ("float32", "fp8"):
      raise ValueError(f"optim.moments={self.moments!r} is not one of float32, fp8")
    if self.master_dtype not in (None, "float32", "float16", "bfloat16"):
      raise ValueError(
        f"optim.master_dtype={self.master_dtype!r} is not one of None, float32, float16, bfloat16"
      )
    if self.learning_rate <= 0:
      raise ValueError(f"optim.learning_rate must be positive, got {self.learning_rate}")


def make_schedule(ocfg: OptimConfig) -> optax.Schedule:
  lr, end = ocfg.learning_rate, ocfg.learning_rate * ocfg.end_lr_fraction
  decay_steps = max(ocfg.total_steps - ocfg.warmup_steps, 1)
  if ocfg.schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif ocfg.schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=ocfg.end_lr_fraction)
  if not ocfg.warmup_steps:
    return decay
  return optax.join_schedules(
    [optax.linear_schedule(0.0, lr, ocfg.warmup_steps), decay], [ocfg.warmup_steps]
  )


def make_optimizer(ocfg: OptimConfig) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(ocfg.grad_clip)] if ocfg.grad_clip else []
  adamw = fp8_optim.fp8_adamw if ocfg.moments == "fp8" else optax.adamw
  parts.append(
    adamw(make_schedule(ocfg), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay)
  )
  tx = optax.chain(*parts)
  return tx if ocfg.master_dtype is None else fp8_optim.with_master_weights(tx, ocfg.master_dtype)


def _boxed_init(model_cfg: TransformerConfig, seq_len: int):
  model = Transformer(model_cfg)
  return lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32), method=Transformer.forward)


def merge_params(boxed, loaded):
  """``boxed`` (fresh init) with every leaf that ``loaded`` also has replaced by the loaded value.

  Leaves only in ``boxed`` keep their fresh init (e.g. a new reward head on a pretrained trunk);
  leaves only in ``loaded`` are dropped (e.g. the LM head). Shapes must agree.
  """
  flat_new = traverse_util.flatten_dict(boxed)
  flat_in = traverse_util.flatten_dict(loaded)
  for key, box in flat_new.items():
    if key in flat_in:
      value = flat_in[key]
      if tuple(value.shape) != tuple(nn.unbox(box).shape):
        raise ValueError(
          f"parameter {'/'.join(key)}: loaded shape {tuple(value.shape)} does not match "
          f"the model's {tuple(nn.unbox(box).shape)}"
        )
      flat_new[key] = box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value
  return traverse_util.unflatten_dict(flat_new)


def init_state(
  model_cfg: TransformerConfig,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  params=None,
  seq_len: int = 8,
  compiler_options: dict | None = None,
):
  """A sharded train state and its shardings.

  ``params`` (optional, plain arrays, possibly a partial tree) replaces the random initialisation
  where it has leaves (``merge_params``), e.g. to start a reward model from a pretrained trunk; it is
  resharded onto the state's layout. ``compiler_options`` are XLA options for the init program.
  """
  boxed_init = _boxed_init(model_cfg, seq_len)

  def make(rng_data, params_in):
    key = jax.random.wrap_key_data(rng_data)
    variables = boxed_init(jax.random.fold_in(key, 0))
    boxed = variables["params"]
    if params_in is not None:
      boxed = merge_params(boxed, params_in)
    state = {
      "params": boxed,
      "opt_state": tx.init(boxed),
      "step": jnp.zeros((), jnp.int32),
      "rng": rng_data,
    }
    if FP8_META_KEY in variables:  # Only models with FP8 matmuls have delayed-scaling state.
      state[FP8_META_KEY] = variables[FP8_META_KEY]
    return state

  rng_data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  abstract = jax.eval_shape(make, rng_data, params)
  shardings = mesh_lib.logical_shardings(
    nn.unbox(abstract), nn.get_partition_spec(abstract), mesh, rules
  )
  # Traced outside the sharding context: flax's DenseGeneral initialises kernels flat, which cannot
  # carry their logical constraint; out_shardings alone lays the state out (XLA propagates it back).
  state = jax.jit(
    lambda r, p: nn.unbox(make(r, p)), out_shardings=shardings, compiler_options=compiler_options
  )(rng_data, params)
  return state, shardings


def loss_and_grads(loss_fn: LossFn, params, fp8_meta, batch: dict, rng: jax.Array):
  """``((loss, metrics), param grads, FP8 meta "gradients")``; the last is None without FP8 meta.

  The meta rides in the params tree under ``FP8_META_KEY`` (``Transformer.apply`` lifts it into its
  collection), so any loss function trains FP8 models unchanged; the meta's "gradient" is its
  updated value (rmscale/ops/fp8.py), kept apart from the optimizer's gradients.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if fp8_meta is None:
    aux, grads = grad_fn(params, batch, rng)
    return aux, grads, None
  aux, grads = grad_fn({**params, FP8_META_KEY: fp8_meta}, batch, rng)
  grads = dict(grads)
  meta_grads = grads.pop(FP8_META_KEY)
  return aux, grads, meta_grads


def train_step(
  state: State,
  batch: dict,
  *,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  grads_fn: GradsFn = loss_and_grads,
):
  """One optimizer step; the step's RNG is ``fold_in(rng, step)`` so a resumed run repeats it.

  ``grads_fn`` computes the gradients (e.g. ``rmscale.ops.fp8_collectives.fp8_data_parallel`` for
  FP8-LM O1: an FP8 all-reduce across the data axis); FP8 meta, if any, is replaced by its update.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  (loss, metrics), grads, meta_grads = grads_fn(
    loss_fn, state["params"], state.get(FP8_META_KEY), batch, rng
  )
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
  new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
  if meta_grads is not None:
    new_state[FP8_META_KEY] = fp8.apply_fp8_meta_update(
      {FP8_META_KEY: state[FP8_META_KEY]}, {FP8_META_KEY: meta_grads}
    )[FP8_META_KEY]
  return new_state, metrics


def compile_train_step(
  loss_fn: LossFn,
  tx,
  state_shardings,
  mesh,
  rules=mesh_lib.DEFAULT_RULES,
  grads_fn: GradsFn = loss_and_grads,
  compiler_options: dict | None = None,
):
  """``train_step`` jitted with explicit shardings and the state donated.

  ``compiler_options`` are XLA options for this program (tests pass a low CPU optimisation level,
  since compiling dominates a tiny model's step).
  """
  jitted = jax.jit(
    functools.partial(train_step, loss_fn=loss_fn, tx=tx, grads_fn=grads_fn),
    in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
    out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
    donate_argnums=0,
    compiler_options=compiler_options,
  )

  def step(state, batch):
    with mesh_lib.sharding_context(mesh, rules):
      return jitted(state, batch)

  return step


def check_finite(metrics: dict, step: int) -> dict:
  """Fetches metrics to host; NaN or inf stops the run naming the metric and step."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = [k for k, v in host.items() if not jnp.isfinite(v)]
  if bad:
    raise FloatingPointError(f"non-finite {', '.join(bad)} at step {step}: {host}")
  return host
