"""FP8 matmuls as custom JAX primitives, with delayed (amax-history) scaling.

The FP8-LM / Transformer-Engine "hybrid" recipe:

* forward: activations and weights are quantised to E4M3 (more mantissa, range +-448);
* backward: the incoming output gradient is quantised to E5M2 (more range, +-57344);
* every matmul accumulates in float32 and is rescaled afterwards;
* each tensor role (input, kernel, output gradient) has its own scale, computed from a window of
  past absolute maxima ("delayed scaling"), so no extra pass over the tensor is needed before the
  cast: the scale used at step t comes from the amax history *before* step t's amax is pushed.

Layers, from the bottom up:

1. Two primitives, ``quantize_p`` and ``fp8_dot_p``, each with an impl, abstract evaluation, an
   MLIR lowering (``mlir.lower_fun`` of the impl, so XLA sees exactly the
   ``dot(f8, f8) -> f32`` pattern that its GPU GEMM rewriter turns into cuBLASLt FP8 calls) and a
   batching rule.  They are named primitives so they stay visible in jaxprs and can later get
   hand-written lowerings (e.g. a fused Pallas kernel) without touching the callers.
2. ``Fp8Meta`` + ``compute_scale`` / ``update_amax_history``: delayed scaling as pure functions of
   explicit state.
3. ``fp8_dot_general``: a ``jax.custom_vjp`` over the primitives implementing the hybrid recipe.
   The primitives themselves have no JVP rule on purpose: quantisation is a step function whose
   true derivative is zero almost everywhere; the custom VJP defines the straight-through
   estimator FP8 training actually uses.
4. ``Fp8DotGeneral``: a linen module for ``nn.Dense(..., dot_general_cls=Fp8DotGeneral)``.

How the meta state is updated ("the gradient is the new value")
----------------------------------------------------------------
Linen has no way for a backward pass to write state, yet the output-gradient amax is only known
in the backward pass.  So, as in ``flax.linen.fp8_ops``, the meta arrays are *inputs* of the
custom VJP, and its backward rule returns the **updated meta as their cotangent**.  A train step
differentiates the loss w.r.t. ``{'params': ..., 'fp8_meta': ...}``, feeds only the ``params``
gradient to the optimizer and calls ``apply_fp8_meta_update(variables, grads)``, which replaces
the ``fp8_meta`` collection by its "gradient".  Consequences, all by design:

* A forward pass that is not differentiated (eval, sampling) leaves the meta untouched; one
  without any meta (a bare ``{'params': ...}``) uses current scaling (see ``Fp8DotGeneral``).
* ``rmscale.train.state.train_step`` does all this for any loss function: the state carries an
  ``fp8_meta`` entry, which it passes inside the params tree (``Transformer.apply`` lifts it into
  the collection) and replaces by its "gradient" after the step.
* A module whose output does not reach the loss gets an all-zero cotangent; a legitimate scale is
  always > 0, so ``apply_fp8_meta_update`` keeps the old meta there.
* Cotangents *add*: an ``Fp8DotGeneral`` instance must run once per differentiated forward pass
  (give tied weights separate instances), and gradient accumulation over microbatches must keep
  the last microbatch's meta "gradient" rather than summing; under ``shard_map`` data parallelism
  reduce the meta gradients with ``pmax``, not ``psum``/``pmean``.  Under plain ``jit`` with
  sharded inputs nothing is needed: ``max |x|`` is already a global reduction.
* Inside ``shard_map`` pass ``check_vma=False``: JAX has no public way for a custom primitive to
  declare which manual axes its output varies over.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FP8_DTYPES = (np.dtype(E4M3), np.dtype(E5M2))
FP8_META_COLLECTION = "fp8_meta"
# Tensor roles of one matmul, in the order their meta is passed around.
ROLES = ("input", "kernel", "output_grad")

DimensionNumbers = tuple[
  tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]
]


def fp8_max(dtype) -> float:
  """Largest finite value of an FP8 format (448 for E4M3, 57344 for E5M2)."""
  return float(jnp.finfo(_check_fp8_dtype(dtype)).max)


def _check_fp8_dtype(dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype not in FP8_DTYPES:
    raise ValueError(f"fp8 dtype must be float8_e4m3fn or float8_e5m2, got {dtype}")
  return dtype


def _check_scalar_scale(scale_aval, what: str) -> None:
  if scale_aval.shape != ():
    raise ValueError(f"{what} must be a scalar, got shape {scale_aval.shape}")
  if not jnp.issubdtype(scale_aval.dtype, jnp.floating):
    raise ValueError(f"{what} must be floating point, got {scale_aval.dtype}")


def _register_batcher(prim: Primitive, rule) -> None:
  """Registers ``rule(args, dims, **params)``.

  JAX is retiring the ``primitive_batchers`` compatibility table in favour of
  ``fancy_primitive_batchers`` (which also receives the axis data); use the latter when present
  so this keeps working across 0.10/0.11.
  """
  fancy = getattr(batching, "fancy_primitive_batchers", None)
  if fancy is None:
    batching.primitive_batchers[prim] = rule
    return

  def fancy_rule(axis_data, args, dims, **params):
    del axis_data
    if all(d is None for d in dims):
      return prim.bind(*args, **params), None
    return rule(args, dims, **params)

  fancy[prim] = fancy_rule


def _define_primitive(name: str, impl, abstract_eval, batch_rule, static_params) -> Primitive:
  prim = Primitive(name)
  # Eager binds run the impl compiled as one program instead of op by op.
  prim.def_impl(jax.jit(impl, static_argnames=tuple(static_params)))
  prim.def_abstract_eval(abstract_eval)
  mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))
  _register_batcher(prim, batch_rule)
  return prim


# ----------------------------------------------------------------------------------------------
# quantize_p: saturating scaled cast to fp8.
# ----------------------------------------------------------------------------------------------


def _quantize_math(x, scale, dtype):
  # Clip before the cast: float8_e4m3fn has no inf, so an overflowing cast yields NaN.
  # ``scale`` may be a scalar or broadcastable to x (the batched-scale vmap path).
  limit = fp8_max(dtype)
  scaled = x.astype(jnp.float32) * scale.astype(jnp.float32)
  return jnp.clip(scaled, -limit, limit).astype(dtype)


def _check_quantize_args(x, scale, dtype):
  _check_fp8_dtype(dtype)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"quantize input must be floating point, got {x.dtype}")
  _check_scalar_scale(scale, "quantize scale")


def _quantize_impl(x, scale, *, dtype):
  _check_quantize_args(x, scale, dtype)  # eager binds skip abstract eval: validate here too
  return _quantize_math(x, scale, dtype)


def _quantize_abstract_eval(x, scale, *, dtype):
  _check_quantize_args(x, scale, dtype)
  return ShapedArray(x.shape, np.dtype(dtype))


def _quantize_batch(args, dims, *, dtype):
  x, scale = args
  x_dim, scale_dim = dims
  if scale_dim is None:
    return quantize_p.bind(x, scale, dtype=dtype), x_dim
  # A per-example scale (vmap over independent models / seeds): the primitive takes a scalar
  # scale, so compute the same math with the scale broadcast along the mapped axis.
  size = scale.shape[scale_dim]
  scale = jnp.moveaxis(scale, scale_dim, 0)
  x = jnp.moveaxis(x, x_dim, 0) if x_dim is not None else jnp.broadcast_to(x, (size, *x.shape))
  return _quantize_math(x, scale.reshape((size,) + (1,) * (x.ndim - 1)), dtype), 0


quantize_p = _define_primitive(
  "fp8_quantize", _quantize_impl, _quantize_abstract_eval, _quantize_batch, ("dtype",)
)


def quantize(x: jax.Array, scale: jax.Array, dtype=E4M3) -> jax.Array:
  """Saturating ``cast(clip(x * scale, +-fp8_max), dtype)``; ``scale`` is a float32 scalar."""
  return quantize_p.bind(
    jnp.asarray(x), jnp.asarray(scale, jnp.float32), dtype=_check_fp8_dtype(dtype)
  )


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Inverse of ``quantize`` up to rounding: ``q / scale`` in ``dtype`` (computed in float32)."""
  _check_fp8_dtype(q.dtype)
  inv_scale = 1.0 / jnp.asarray(scale, jnp.float32)
  return (q.astype(jnp.float32) * inv_scale).astype(dtype)


# ----------------------------------------------------------------------------------------------
# fp8_dot_p: fp8 x fp8 dot_general, float32 accumulation, rescaled output.
# ----------------------------------------------------------------------------------------------


def _normalize_dimension_numbers(dimension_numbers) -> DimensionNumbers:
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    return (
      (tuple(int(d) for d in lc), tuple(int(d) for d in rc)),
      (tuple(int(d) for d in lb), tuple(int(d) for d in rb)),
    )
  except (TypeError, ValueError) as e:
    raise ValueError(
      "dimension_numbers must be ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), got "
      f"{dimension_numbers!r}"
    ) from e


def _free_dims(ndim: int, contract, batch) -> list[int]:
  used = set(contract) | set(batch)
  return [d for d in range(ndim) if d not in used]


def _fp8_dot_impl(lhs, rhs, lhs_scale, rhs_scale, *, dimension_numbers, out_dtype):
  # Eager binds skip abstract eval: validate here too.
  _fp8_dot_out_shape(lhs, rhs, lhs_scale, rhs_scale, dimension_numbers)
  # DEFAULT precision is exact here (fp8 values are representable in bf16 and up) and keeps the
  # HLO in the form XLA's FP8 GEMM rewriter matches, whatever the global precision setting.
  acc = lax.dot_general(
    lhs, rhs, dimension_numbers, precision=lax.Precision.DEFAULT, preferred_element_type=jnp.float32
  )
  inv_scale = 1.0 / (lhs_scale.astype(jnp.float32) * rhs_scale.astype(jnp.float32))
  return (acc * inv_scale).astype(out_dtype)


def _fp8_dot_out_shape(lhs, rhs, lhs_scale, rhs_scale, dimension_numbers) -> tuple[int, ...]:
  """Validates the operands and returns the output shape: batch, lhs free, rhs free dims."""
  for name, aval in (("lhs", lhs), ("rhs", rhs)):
    if np.dtype(aval.dtype) not in FP8_DTYPES:
      raise ValueError(f"fp8_dot {name} must be float8_e4m3fn or float8_e5m2, got {aval.dtype}")
  _check_scalar_scale(lhs_scale, "fp8_dot lhs_scale")
  _check_scalar_scale(rhs_scale, "fp8_dot rhs_scale")
  (lc, rc), (lb, rb) = dimension_numbers
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(
      f"fp8_dot dimension_numbers pair up unequal numbers of dims: {dimension_numbers}"
    )
  for dims, ndim, name in ((lc + lb, lhs.ndim, "lhs"), (rc + rb, rhs.ndim, "rhs")):
    if len(set(dims)) != len(dims) or any(not 0 <= d < ndim for d in dims):
      raise ValueError(f"fp8_dot {name} dims {dims} invalid for rank {ndim}")
  for l, r in zip(lc + lb, rc + rb):
    if lhs.shape[l] != rhs.shape[r]:
      raise ValueError(
        f"fp8_dot size mismatch: lhs dim {l} ({lhs.shape[l]}) vs rhs dim {r} "
        f"({rhs.shape[r]}) in {dimension_numbers}"
      )
  return tuple(
    [lhs.shape[d] for d in lb]
    + [lhs.shape[d] for d in _free_dims(lhs.ndim, lc, lb)]
    + [rhs.shape[d] for d in _free_dims(rhs.ndim, rc, rb)]
  )


def _fp8_dot_abstract_eval(lhs, rhs, lhs_scale, rhs_scale, *, dimension_numbers, out_dtype):
  shape = _fp8_dot_out_shape(lhs, rhs, lhs_scale, rhs_scale, dimension_numbers)
  # No varying-manual-axes propagation (JAX has no public rule registry for custom primitives):
  # inside shard_map use check_vma=False.
  return ShapedArray(shape, np.dtype(out_dtype))


def _shift(dims, by=1):
  return tuple(d + by for d in dims)


def _fp8_dot_batch(args, dims, *, dimension_numbers, out_dtype):
  lhs, rhs, lhs_scale, rhs_scale = args
  ld, rd, lsd, rsd = dims
  if lsd is not None or rsd is not None:
    # Per-example scales (vmap over independent models): express the batched computation with
    # the impl's own ops, which vmap knows how to batch.
    fn = functools.partial(_fp8_dot_impl, dimension_numbers=dimension_numbers, out_dtype=out_dtype)
    return jax.vmap(fn, in_axes=dims)(*args), 0
  (lc, rc), (lb, rb) = dimension_numbers
  if ld is not None and rd is not None:
    # Both mapped: the vmapped axis becomes a new leading dot batch dimension.
    lhs, rhs = jnp.moveaxis(lhs, ld, 0), jnp.moveaxis(rhs, rd, 0)
    new_dn = ((_shift(lc), _shift(rc)), ((0,) + _shift(lb), (0,) + _shift(rb)))
    out_dim = 0
  elif ld is not None:
    # Only lhs mapped: the axis is lhs's first free dim, which follows the batch dims in the output.
    lhs = jnp.moveaxis(lhs, ld, 0)
    new_dn = ((_shift(lc), rc), (_shift(lb), rb))
    out_dim = len(lb)
  else:
    # Only rhs mapped: rhs free dims come after all lhs free dims in the output.
    rhs = jnp.moveaxis(rhs, rd, 0)
    new_dn = ((lc, _shift(rc)), (lb, _shift(rb)))
    out_dim = len(lb) + len(_free_dims(lhs.ndim, lc, lb))
  out = fp8_dot_p.bind(
    lhs, rhs, lhs_scale, rhs_scale, dimension_numbers=new_dn, out_dtype=out_dtype
  )
  return out, out_dim


fp8_dot_p = _define_primitive(
  "fp8_dot",
  _fp8_dot_impl,
  _fp8_dot_abstract_eval,
  _fp8_dot_batch,
  ("dimension_numbers", "out_dtype"),
)


def fp8_dot(
  lhs_q: jax.Array,
  rhs_q: jax.Array,
  lhs_scale: jax.Array,
  rhs_scale: jax.Array,
  dimension_numbers,
  out_dtype=jnp.float32,
) -> jax.Array:
  """``dot_general(lhs_q, rhs_q) / (lhs_scale * rhs_scale)`` with float32 accumulation."""
  return fp8_dot_p.bind(
    lhs_q,
    rhs_q,
    jnp.asarray(lhs_scale, jnp.float32),
    jnp.asarray(rhs_scale, jnp.float32),
    dimension_numbers=_normalize_dimension_numbers(dimension_numbers),
    out_dtype=np.dtype(out_dtype),
  )


# ----------------------------------------------------------------------------------------------
# Per-tensor scaled storage (FP8 gradients on the wire, FP8/FP16 optimizer state).
# ----------------------------------------------------------------------------------------------


class ScaledTensor(NamedTuple):
  """A tensor stored as ``data`` in a narrow dtype with one float32 ``scale``: value = data / scale."""

  data: jax.Array
  scale: jax.Array


# Formats whose range is too narrow for unscaled storage of gradients, moments or weights.
_SCALED_DTYPES = FP8_DTYPES + (np.dtype(jnp.float16),)
STORAGE_DTYPES = _SCALED_DTYPES + (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))


def check_storage_dtype(dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype not in STORAGE_DTYPES:
    raise ValueError(
      f"storage dtype must be one of {[str(d) for d in STORAGE_DTYPES]}, got {dtype}"
    )
  return dtype


def encode_scaled(
  x: jax.Array, dtype, margin: float = 0.0, amax: jax.Array | None = None
) -> ScaledTensor:
  """``x`` in ``dtype`` with a just-in-time per-tensor scale (``dtype_max / amax / 2**margin``).

  FP8 and float16 are scaled so the tensor uses the format's whole range (float16 underflows at
  6e-8: squared gradients of 1e-4 would vanish unscaled); bfloat16 and float32 have float32's
  range and keep scale 1. ``amax`` overrides ``max |x|`` (e.g. a max over data-parallel ranks).
  """
  dtype = check_storage_dtype(dtype)
  x = jnp.asarray(x, jnp.float32)
  if dtype not in _SCALED_DTYPES:
    return ScaledTensor(x.astype(dtype), jnp.ones((), jnp.float32))
  fmax = float(jnp.finfo(dtype).max)
  amax = amax_of(x) if amax is None else jnp.asarray(amax, jnp.float32)
  scale = compute_scale(amax[None], fmax, margin)
  if dtype in FP8_DTYPES:
    return ScaledTensor(quantize(x, scale, dtype), scale)
  return ScaledTensor(jnp.clip(x * scale, -fmax, fmax).astype(dtype), scale)


def decode_scaled(t: ScaledTensor, dtype=jnp.float32) -> jax.Array:
  """``data / scale`` in ``dtype`` (computed in float32)."""
  return (t.data.astype(jnp.float32) * (1.0 / t.scale)).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Delayed scaling.
# ----------------------------------------------------------------------------------------------


class Fp8Meta(NamedTuple):
  """Delayed-scaling state of one tensor role.

  amax_history: [H] float32, newest first (index 0 is the latest step's amax).
  scale: [] float32, the scale used by the latest step (fallback when the history is all zero).
  """

  amax_history: jax.Array
  scale: jax.Array


def init_fp8_meta(history_length: int = 16) -> Fp8Meta:
  if history_length < 1:
    raise ValueError(f"amax history length must be >= 1, got {history_length}")
  return Fp8Meta(jnp.zeros((history_length,), jnp.float32), jnp.ones((), jnp.float32))


def compute_scale(
  amax_history: jax.Array,
  fp8_max: float,
  margin: float = 0.0,
  power_of_two: bool = False,
  prev_scale: jax.Array | None = None,
) -> jax.Array:
  """``fp8_max / max(amax_history) / 2**margin``, optionally rounded down to a power of two.

  Rounding *down* (MS-AMP) keeps ``amax * scale <= fp8_max`` and makes the rescale exact.  With
  no usable amax (all zero: nothing seen yet; or non-finite) the previous scale is kept, or 1.
  """
  amax_history = jnp.asarray(amax_history, jnp.float32)
  if amax_history.ndim < 1:
    raise ValueError(f"amax_history must have a history axis, got shape {amax_history.shape}")
  fallback = (
    jnp.ones((), jnp.float32) if prev_scale is None else jnp.asarray(prev_scale, jnp.float32)
  )
  amax = jnp.max(amax_history, axis=-1)
  safe_amax = jnp.where(amax > 0, amax, 1.0)
  scale = fp8_max / safe_amax / (2.0**margin)
  if power_of_two:
    scale = jnp.exp2(jnp.floor(jnp.log2(scale)))
  usable = (amax > 0) & jnp.isfinite(amax) & jnp.isfinite(scale) & (scale > 0)
  return jnp.where(usable, scale, fallback)


def update_amax_history(amax_history: jax.Array, amax: jax.Array) -> jax.Array:
  """Pushes ``amax`` to the front, dropping the oldest entry (the last one)."""
  amax_history = jnp.asarray(amax_history, jnp.float32)
  if amax_history.ndim != 1:
    raise ValueError(f"amax_history must be 1-D, got shape {amax_history.shape}")
  amax = jnp.asarray(amax, jnp.float32).reshape((1,))
  return jnp.concatenate([amax, amax_history[:-1]])


def amax_of(x: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Fp8Config:
  """Recipe knobs.  Hashable: it is a static (non-differentiable) argument of the custom VJP."""

  margin: float = 0.0  # extra headroom: scale is divided by 2**margin
  power_of_two: bool = False  # round scales down to powers of two (MS-AMP)
  fwd_dtype: Any = E4M3  # inputs and kernels
  bwd_dtype: Any = E5M2  # output gradients

  def __post_init__(self):
    _check_fp8_dtype(self.fwd_dtype)
    _check_fp8_dtype(self.bwd_dtype)
    if self.margin < 0:
      raise ValueError(f"fp8 margin must be >= 0, got {self.margin}")


def delayed_scale_step(
  meta: Fp8Meta, x: jax.Array, dtype, config: Fp8Config
) -> tuple[jax.Array, Fp8Meta]:
  """Scale for this step (from the history so far) and the meta after pushing ``amax(x)``."""
  scale = compute_scale(
    meta.amax_history, fp8_max(dtype), config.margin, config.power_of_two, prev_scale=meta.scale
  )
  return scale, Fp8Meta(update_amax_history(meta.amax_history, amax_of(x)), scale)


# ----------------------------------------------------------------------------------------------
# Hybrid-recipe dot_general (custom VJP over the primitives).
# ----------------------------------------------------------------------------------------------


def _scale_step(meta: Fp8Meta | None, x: jax.Array, dtype, config: Fp8Config):
  """``delayed_scale_step``, or with no meta "current scaling": the scale from ``x``'s own amax.

  Current scaling needs no state, which is what inference on a bare params tree has; it costs an
  extra reduction over ``x`` before the cast, which delayed scaling exists to avoid in training.
  """
  if meta is None:
    return compute_scale(amax_of(x)[None], fp8_max(dtype), config.margin, config.power_of_two), None
  return delayed_scale_step(meta, x, dtype, config)


def _transpose_lhs_dims(
  dimension_numbers: DimensionNumbers, lhs_ndim: int, rhs_ndim: int, swap_ans: bool = False
):
  """Dimension numbers for ``dot(g, rhs)`` and the permutation turning it into d(lhs).

  ``g`` has the layout of the forward output: batch dims, then lhs free dims, then rhs free dims
  (``swap_ans`` when computing d(rhs) with the operands' roles swapped).  Same algebra as
  ``lax.dot_general``'s transpose rule.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  l_free = _free_dims(lhs_ndim, lc, lb)
  r_free = _free_dims(rhs_ndim, rc, rb)
  n_batch = len(lb)
  ans_batch = tuple(range(n_batch))
  if swap_ans:
    ans_r = tuple(range(n_batch, n_batch + len(r_free)))
  else:
    ans_r = tuple(range(n_batch + len(l_free), n_batch + len(l_free) + len(r_free)))
  dims = ((ans_r, tuple(r_free)), (ans_batch, tuple(rb)))
  # dot(g, rhs) yields: batch, lhs free, then rhs's remaining (contracting) dims in rhs order.
  lc_sorted_by_rc = [lc[i] for i in np.argsort(rc)]
  perm = tuple(int(i) for i in np.argsort(list(lb) + l_free + lc_sorted_by_rc))
  return dims, perm


def _swap_dimension_numbers(dn: DimensionNumbers) -> DimensionNumbers:
  (lc, rc), (lb, rb) = dn
  return ((rc, lc), (rb, lb))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fp8_dot_general(lhs, rhs, lhs_meta, rhs_meta, grad_meta, dimension_numbers, dtypes, config):
  out, _ = _fp8_dot_general_fwd(
    lhs, rhs, lhs_meta, rhs_meta, grad_meta, dimension_numbers, dtypes, config
  )
  return out


def _fp8_dot_general_fwd(
  lhs, rhs, lhs_meta, rhs_meta, grad_meta, dimension_numbers, dtypes, config
):
  _, _, out_dtype = dtypes
  lhs_scale, new_lhs_meta = _scale_step(lhs_meta, lhs, config.fwd_dtype, config)
  rhs_scale, new_rhs_meta = _scale_step(rhs_meta, rhs, config.fwd_dtype, config)
  lhs_q = quantize(lhs, lhs_scale, config.fwd_dtype)
  rhs_q = quantize(rhs, rhs_scale, config.fwd_dtype)
  out = fp8_dot(lhs_q, rhs_q, lhs_scale, rhs_scale, dimension_numbers, out_dtype)
  # Residuals are the fp8 operands: a quarter of the float32 activation memory.
  res = (lhs_q, rhs_q, lhs_scale, rhs_scale, new_lhs_meta, new_rhs_meta, grad_meta)
  return out, res


def _fp8_dot_general_bwd(dimension_numbers, dtypes, config, res, g):
  lhs_dtype, rhs_dtype, _ = dtypes
  lhs_q, rhs_q, lhs_scale, rhs_scale, new_lhs_meta, new_rhs_meta, grad_meta = res
  g_scale, new_grad_meta = _scale_step(grad_meta, g, config.bwd_dtype, config)
  g_q = quantize(g, g_scale, config.bwd_dtype)

  dims, perm = _transpose_lhs_dims(dimension_numbers, lhs_q.ndim, rhs_q.ndim)
  d_lhs = lax.transpose(fp8_dot(g_q, rhs_q, g_scale, rhs_scale, dims, lhs_dtype), perm)
  dims, perm = _transpose_lhs_dims(
    _swap_dimension_numbers(dimension_numbers), rhs_q.ndim, lhs_q.ndim, swap_ans=True
  )
  d_rhs = lax.transpose(fp8_dot(g_q, lhs_q, g_scale, lhs_scale, dims, rhs_dtype), perm)
  # The meta "cotangents" are the updated meta (see the module docstring).
  return d_lhs, d_rhs, new_lhs_meta, new_rhs_meta, new_grad_meta


_fp8_dot_general.defvjp(_fp8_dot_general_fwd, _fp8_dot_general_bwd)


def fp8_dot_general(
  lhs: jax.Array,
  rhs: jax.Array,
  dimension_numbers,
  lhs_meta: Fp8Meta | None,
  rhs_meta: Fp8Meta | None,
  grad_meta: Fp8Meta | None,
  *,
  config: Fp8Config = Fp8Config(),
  out_dtype=None,
) -> jax.Array:
  """``lax.dot_general`` through FP8 with delayed scaling (hybrid recipe).

  Differentiable w.r.t. ``lhs`` and ``rhs`` (straight-through FP8 gradients) and w.r.t. the three
  metas, whose "gradients" are their updated values (see the module docstring).
  All three metas ``None``: current scaling (each tensor scaled by its own amax), no state.
  ``out_dtype`` defaults to the operands' result type.
  """
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  for name, x in (("lhs", lhs), ("rhs", rhs)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"fp8_dot_general {name} must be floating point, got {x.dtype}")
  metas = {"lhs_meta": lhs_meta, "rhs_meta": rhs_meta, "grad_meta": grad_meta}
  if not all(m is None for m in metas.values()):
    for name, meta in metas.items():
      if not isinstance(meta, Fp8Meta):
        raise ValueError(
          f"{name} must be an Fp8Meta (or all three metas None for current scaling), "
          f"got {type(meta).__name__}"
        )
  out_dtype = np.dtype(out_dtype if out_dtype is not None else jnp.result_type(lhs, rhs))
  dtypes = (np.dtype(lhs.dtype), np.dtype(rhs.dtype), out_dtype)
  return _fp8_dot_general(
    lhs,
    rhs,
    lhs_meta,
    rhs_meta,
    grad_meta,
    _normalize_dimension_numbers(dimension_numbers),
    dtypes,
    config,
  )


# ----------------------------------------------------------------------------------------------
# Flax linen integration.
# ----------------------------------------------------------------------------------------------


class Fp8DotGeneral(nn.Module):
  """Drop-in ``dot_general`` for ``nn.Dense`` / ``nn.DenseGeneral`` (``dot_general_cls=``).

  Flax instantiates ``dot_general_cls()`` with no arguments, so configure it with
  ``functools.partial(Fp8DotGeneral, amax_history_length=1024)``.  The lhs is the layer input,
  the rhs its kernel.  Meta lives in the ``fp8_meta`` collection as plain float32 arrays
  (``{role}_amax_history`` [H], ``{role}_scale`` []), so it checkpoints and shards like any
  other variable; update it with ``apply_fp8_meta_update``.

  Applied without an ``fp8_meta`` collection (a bare ``{'params': ...}``: scoring, sampling) it
  uses current scaling instead, so inference needs no training-time state; with the collection it
  reproduces the training-time (delayed) scales exactly.
  """

  amax_history_length: int = 16
  margin: float = 0.0
  power_of_two: bool = False

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision  # fp8 operands are exact at any precision; accumulation is always float32
    config = Fp8Config(margin=self.margin, power_of_two=self.power_of_two)
    if not self.is_mutable_collection(FP8_META_COLLECTION) and not self.has_variable(
      FP8_META_COLLECTION, f"{ROLES[0]}_scale"
    ):
      return fp8_dot_general(
        lhs,
        rhs,
        dimension_numbers,
        None,
        None,
        None,
        config=config,
        out_dtype=preferred_element_type,
      )
    init = init_fp8_meta(self.amax_history_length)
    metas = []
    for role in ROLES:
      history = self.variable(
        FP8_META_COLLECTION, f"{role}_amax_history", lambda: init.amax_history
      )
      scale = self.variable(FP8_META_COLLECTION, f"{role}_scale", lambda: init.scale)
      metas.append(Fp8Meta(history.value, scale.value))
    return fp8_dot_general(
      lhs, rhs, dimension_numbers, *metas, config=config, out_dtype=preferred_element_type
    )


def _overwrite_meta_tree(old: Mapping, new: Mapping, path: str) -> dict:
  if not isinstance(old, Mapping) or not isinstance(new, Mapping):
    raise ValueError(f"fp8 meta at {path!r} must be a mapping in both variables and grads")
  if set(old) != set(new):
    raise ValueError(f"fp8 meta keys differ at {path!r}: {sorted(old)} vs {sorted(new)}")
  out = {}
  for role in ROLES:
    h_key, s_key = f"{role}_amax_history", f"{role}_scale"
    if s_key in old:
      # A module that did not reach the loss gets a zero cotangent; real scales are > 0.
      reached = new[s_key] > 0
      out[s_key] = jnp.where(reached, new[s_key], old[s_key])
      out[h_key] = jnp.where(reached[..., None], new[h_key], old[h_key])
  for key in old:
    if key not in out:
      out[key] = _overwrite_meta_tree(old[key], new[key], f"{path}/{key}")
  return out


def apply_fp8_meta_update(variables: Mapping, grads: Mapping) -> dict:
  """Returns ``variables`` with the ``fp8_meta`` collection replaced by its "gradient".

  ``variables`` is the dict the model is applied to (``{'params': ..., 'fp8_meta': ...}``), and
  ``grads`` the gradient of the loss w.r.t. it (extra keys such as ``params`` are ignored: the
  optimizer handles those).  Without an ``fp8_meta`` collection it returns ``variables``
  unchanged, so train steps can call it unconditionally.
  """
  if FP8_META_COLLECTION not in variables:
    return dict(variables)
  if FP8_META_COLLECTION not in grads:
    raise ValueError(
      f"grads lack the {FP8_META_COLLECTION!r} collection: differentiate the loss w.r.t. the "
      f"variables dict including {FP8_META_COLLECTION!r}, not only 'params'"
    )
  out = dict(variables)
  out[FP8_META_COLLECTION] = _overwrite_meta_tree(
    variables[FP8_META_COLLECTION], grads[FP8_META_COLLECTION], FP8_META_COLLECTION
  )
  return out
