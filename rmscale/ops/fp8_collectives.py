"""FP8-LM level O1: FP8 weight gradients, all-reduced across the data-parallel ranks in FP8.

The collective (``fp8_all_reduce_sum``), inside ``shard_map`` over the data axes:

1. **Shared scale.** Every rank must quantise with the *same* scale, or the FP8 payloads cannot be
   added: ``s = min_r s_r = fp8_max / max_r amax_r`` (one ``pmax`` of a scalar).
2. **Reduce-scatter with FP8 on the wire.** Each rank quantises its gradient with ``s``, cuts it
   into n chunks and sends chunk j to rank j (``all_to_all`` of the bytes); rank j adds the n FP8
   chunks it received in float32 and dequantises (divides by ``s``). Summing in float32 cannot
   overflow, so FP8-LM's automatic gradient scaling factor (which guards an FP8 sum) is not needed.
3. **All-gather with FP8 on the wire.** Each rank requantises its reduced chunk with a second
   shared scale (``pmax`` of the chunk amaxes) and all-gathers the FP8 chunks.

The format defaults to E4M3: with one scale per tensor set by its amax, range is taken care of and
the extra mantissa bit halves the rounding error of the sum (E5M2 is accepted for wide tensors).

Bytes on the wire per element: 2(n-1)/n, against 8(n-1)/n for a float32 ring all-reduce and
4(n-1)/n for bfloat16. Two roundings: the result is within
``sum_r (u |g_r| + d/s) + u |sum| + d/s2`` of the exact sum (u the format's relative rounding error,
d half its subnormal spacing), which ``tests/ops/test_fp8_train.py`` checks elementwise.

``fp8_data_parallel`` turns a train step's ``grads_fn`` into the O1 one: each rank differentiates
its batch shard, the weight gradients of FP8 GEMMs (the kernels whose layer has FP8 meta) take the
FP8 all-reduce, every other gradient a float32 ``pmean``; FP8 meta is reduced with ``pmax``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from rmscale.ops import fp8

DATA_AXES = ("data", "fsdp")  # The mesh axes the batch is split over (rmscale.parallel.mesh).


def _to_bytes(q: jax.Array) -> jax.Array:
  # Collectives move bytes; uint8 keeps them away from any backend's fp8 arithmetic support.
  return lax.bitcast_convert_type(q, jnp.uint8)


def fp8_all_reduce_sum(x: jax.Array, axis_name, dtype=fp8.E4M3, margin: float = 0.0) -> jax.Array:
  """Sum of ``x`` over ``axis_name`` (inside ``shard_map``) with FP8 payloads and float32 adds.

  Returns ``x``'s shape and dtype on every rank. See the module docstring for the algorithm.
  """
  dtype = fp8._check_fp8_dtype(dtype)
  n = lax.axis_size(axis_name)
  x32 = jnp.asarray(x, jnp.float32)
  shared = fp8.encode_scaled(x32, dtype, margin, amax=lax.pmax(fp8.amax_of(x32), axis_name))
  flat = shared.data.reshape(-1)
  pad = (-flat.size) % n
  chunks = jnp.pad(_to_bytes(flat), (0, pad)).reshape(n, -1)
  # Row r of `received` is this rank's chunk as quantised by rank r.
  received = lax.all_to_all(chunks, axis_name, split_axis=0, concat_axis=0)
  received = lax.bitcast_convert_type(received, dtype)
  chunk_sum = jnp.sum(received.astype(jnp.float32), axis=0) / shared.scale
  gathered = fp8.encode_scaled(
    chunk_sum, dtype, margin, amax=lax.pmax(fp8.amax_of(chunk_sum), axis_name)
  )
  data = lax.all_gather(_to_bytes(gathered.data), axis_name, tiled=True)
  data = lax.bitcast_convert_type(data, dtype)[: flat.size]
  return fp8.decode_scaled(fp8.ScaledTensor(data, gathered.scale), x.dtype).reshape(x.shape)


def fp8_gemm_kernel_mask(params: Mapping, fp8_meta: Mapping) -> dict:
  """``params``-shaped tree of bools: True for the kernels of layers that run FP8 GEMMs.

  A layer runs FP8 GEMMs when its module has an ``Fp8DotGeneral`` child holding meta
  (``{role}_scale`` leaves) at the same path in the ``fp8_meta`` tree.
  """
  fp8_layers = set()
  for path in traverse_util.flatten_dict(fp8_meta):
    if path[-1].endswith("_scale"):
      fp8_layers.add(path[:-2])  # Drop the Fp8DotGeneral child's name and the leaf's.
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
    {path: path[-1] == "kernel" and path[:-1] in fp8_layers for path in flat}
  )


def gradient_payload(grads, mask, dtype=fp8.E4M3):
  """The gradient tree as O1 communicates it: ``ScaledTensor`` FP8 leaves where ``mask``, else as is.

  Used to measure bytes per parameter from the actual arrays (``jax.eval_shape`` of this).
  """
  return jax.tree.map(lambda g, m: fp8.encode_scaled(g, dtype) if m else g, grads, mask)


def fp8_data_parallel(
  grads_fn, mesh: Mesh, *, dtype=fp8.E4M3, margin: float = 0.0, axes: Sequence[str] = DATA_AXES
):
  """A train-step ``grads_fn`` (rmscale.train.state.GradsFn) reducing gradients as FP8-LM O1.

  Pure data parallelism: every rank holds all parameters during the step (FSDP-sharded ones are
  gathered on entry) and the tensor-parallel axis must have size 1. Each rank averages the loss over
  its own shard, and the ranks' gradients are averaged, as in PyTorch DDP: for a loss normalised by
  a per-batch count (tokens) this weights shards equally rather than tokens. Metrics are averaged.
  """
  axes = tuple(axes)
  other = [a for a in mesh.axis_names if a not in axes and mesh.shape[a] != 1]
  if other:
    raise ValueError(
      f"FP8 data-parallel gradients (O1) shard only the batch over {axes}; mesh axes "
      f"{other} have size > 1 ({dict(mesh.shape)}): set them to 1"
    )
  dtype = fp8._check_fp8_dtype(dtype)

  def per_rank(loss_fn, params, fp8_meta, batch, rng):
    # Independent dropout per rank, as each example of the global batch would get.
    rng = jax.random.fold_in(rng, lax.axis_index(axes))
    with nn.logical_axis_rules(()):  # The body is per device: no activation sharding constraints.
      (loss, metrics), grads, meta_grads = grads_fn(loss_fn, params, fp8_meta, batch, rng)
    if meta_grads is None:
      raise ValueError(
        "FP8 data-parallel gradients (O1) need a model with FP8 matmuls "
        "(model.matmul='fp8'): the train state has no fp8_meta"
      )
    mask = fp8_gemm_kernel_mask(params, fp8_meta)
    n = lax.axis_size(axes)
    grads = jax.tree.map(
      lambda g, m: fp8_all_reduce_sum(g, axes, dtype, margin) / n if m else lax.pmean(g, axes),
      grads,
      mask,
    )
    # A layer's new amax is the max over all ranks' shards, as under a global-batch jit.
    meta_grads = lax.pmax(meta_grads, axes)
    return (lax.pmean(loss, axes), lax.pmean(metrics, axes)), grads, meta_grads

  def o1_grads_fn(loss_fn, params, fp8_meta, batch, rng):
    batch_specs = jax.tree.map(lambda _: P(axes), batch)
    mapped = jax.shard_map(
      functools.partial(per_rank, loss_fn),
      mesh=mesh,
      in_specs=(P(), P(), batch_specs, P()),
      out_specs=P(),
      check_vma=False,
    )  # The FP8 primitives declare no varying axes.
    return mapped(params, fp8_meta, batch, rng)

  return o1_grads_fn
