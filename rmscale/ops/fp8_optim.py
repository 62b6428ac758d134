"""FP8-LM level O2: Adam(W) with an FP8 first moment and a 16-bit second moment; memory accounting.

``scale_by_adam_fp8`` is ``optax.scale_by_adam`` whose moments are *stored* narrow, each tensor
with its own just-in-time scale (``fp8.encode_scaled``): the first moment in E4M3, the second in
float16 (scaled, because squared gradients underflow float16's 6e-8 unscaled) or bfloat16. Every
step decodes them to float32, updates, uses the float32 values for this step's update and encodes
them again, so the narrow formats only carry the moments from one step to the next.

``with_master_weights`` keeps a copy of the parameters in ``master_dtype`` (FP8-LM O2: float16
with a per-tensor scale; or float32) in the optimizer state, applies the inner update to it and
returns updates that land the (possibly lower-precision, e.g. bfloat16) model parameters exactly
on the rounded master weights, so small updates accumulate in the master copy instead of vanishing
in the parameters' rounding.

``bytes_per_param`` measures a train state (and optionally the gradient as communicated) from the
actual pytrees: the figures in the README come from it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmscale.ops import fp8


class ScaledTree(NamedTuple):
  """A tree stored narrow with one scale per leaf: leaf i = ``data``'s leaf i / ``scales[i]``.

  The scales are one vector rather than a tree of scalars so that ``data`` keeps exactly the
  parameters' structure: boxed (logically partitioned) parameters give boxed ``data`` sharded
  like them, and the vector is simply replicated.
  """

  data: Any
  scales: jax.Array  # [number of leaves] float32


def encode_tree(tree, dtype, margin: float = 0.0) -> ScaledTree:
  leaves, treedef = jax.tree.flatten(tree)
  encoded = [fp8.encode_scaled(x, dtype, margin) for x in leaves]
  scales = jnp.stack([e.scale for e in encoded]) if encoded else jnp.zeros((0,), jnp.float32)
  return ScaledTree(jax.tree.unflatten(treedef, [e.data for e in encoded]), scales)


def decode_leaves(st: ScaledTree) -> list[jax.Array]:
  """The float32 leaves, in ``jax.tree.leaves`` order of the encoded tree."""
  return [
    fp8.decode_scaled(fp8.ScaledTensor(d, st.scales[i]))
    for i, d in enumerate(jax.tree.leaves(st.data))
  ]


class ScaleByAdamFp8State(NamedTuple):
  count: jax.Array
  mu: ScaledTree
  nu: ScaledTree


def scale_by_adam_fp8(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, mu_dtype=fp8.E4M3, nu_dtype=jnp.float16
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` with moments stored in ``mu_dtype`` / ``nu_dtype`` (per-tensor scaled)."""
  mu_dtype, nu_dtype = fp8.check_storage_dtype(mu_dtype), fp8.check_storage_dtype(nu_dtype)
  for name, b in (("b1", b1), ("b2", b2)):
    if not 0.0 <= b < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {b}")

  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return ScaleByAdamFp8State(
      jnp.zeros((), jnp.int32), encode_tree(zeros, mu_dtype), encode_tree(zeros, nu_dtype)
    )

  def update_fn(updates, state, params=None):
    del params
    g_leaves, treedef = jax.tree.flatten(updates)
    g32 = [g.astype(jnp.float32) for g in g_leaves]
    mu = [b1 * m + (1.0 - b1) * g for m, g in zip(decode_leaves(state.mu), g32)]
    nu = [b2 * v + (1.0 - b2) * g * g for v, g in zip(decode_leaves(state.nu), g32)]
    count = optax.safe_increment(state.count)
    c1 = 1.0 - b1 ** count.astype(jnp.float32)
    c2 = 1.0 - b2 ** count.astype(jnp.float32)
    new = [
      ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype) for m, v, g in zip(mu, nu, g_leaves)
    ]
    unflat = functools.partial(jax.tree.unflatten, treedef)
    return unflat(new), ScaleByAdamFp8State(
      count, encode_tree(unflat(mu), mu_dtype), encode_tree(unflat(nu), nu_dtype)
    )

  return optax.GradientTransformation(init_fn, update_fn)


class MasterWeightsState(NamedTuple):
  master: ScaledTree
  inner: Any


def with_master_weights(
  inner: optax.GradientTransformation, master_dtype
) -> optax.GradientTransformation:
  """Runs ``inner`` on a master copy of the parameters stored in ``master_dtype``.

  ``inner`` sees the float32-decoded master weights as its ``params`` (weight decay acts on them).
  The returned updates are ``round(master_new) - params`` in float32, so ``optax.apply_updates``
  sets each parameter to the master weight rounded to the parameter's dtype.
  """
  master_dtype = fp8.check_storage_dtype(master_dtype)
  if master_dtype in fp8.FP8_DTYPES:
    raise ValueError(
      f"master weights in {master_dtype} would lose every small update; "
      "use float16, bfloat16 or float32"
    )

  def init_fn(params):
    return MasterWeightsState(encode_tree(params, master_dtype), inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("with_master_weights needs params in update()")
    master = jax.tree.unflatten(jax.tree.structure(params), decode_leaves(state.master))
    inner_updates, inner_state = inner.update(updates, state.inner, master)
    master = jax.tree.map(lambda m, u: m + u.astype(jnp.float32), master, inner_updates)
    out = jax.tree.map(
      lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32), master, params
    )
    return out, MasterWeightsState(encode_tree(master, master_dtype), inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def fp8_adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  *,
  mu_dtype=fp8.E4M3,
  nu_dtype=jnp.float16,
  master_dtype=None,
) -> optax.GradientTransformation:
  """AdamW as FP8-LM O2: FP8 first moment, 16-bit second moment, optional master weights."""
  tx = optax.chain(
    scale_by_adam_fp8(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
  return tx if master_dtype is None else with_master_weights(tx, master_dtype)


def tree_bytes(tree) -> int:
  """Bytes of every array leaf (concrete arrays or ``jax.ShapeDtypeStruct``s)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bytes_per_param(state: dict, grads=None) -> dict[str, float]:
  """Bytes per model parameter of each entry of a train state, and of ``grads`` if given.

  ``state`` is a train state (rmscale.train.state) or its ``jax.eval_shape``; ``grads`` the gradient
  tree as it is communicated (e.g. ``fp8_collectives.gradient_payload``). ``total`` adds them all.
  """
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  if n_params == 0:
    raise ValueError("the state's params tree is empty")
  out = {key: tree_bytes(value) / n_params for key, value in state.items()}
  if grads is not None:
    out["grads"] = tree_bytes(grads) / n_params
  out["total"] = sum(out.values())
  return out
