"""Device meshes, logical-axis rules and the shardings derived from them.

Model code names axes logically (``embed``, ``mlp``, ``batch``...); the rules below (or the config's)
map them onto mesh axes (``data``, ``fsdp``, ``tensor``). Changing a parallelism layout is a config
change, never a model change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rmscale.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # The global batch is split over both data-parallel axes.

# Parameters: FSDP shards the model dimension, tensor parallelism the heads/MLP/vocab dimensions.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", BATCH_AXES),
  ("length", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("vocab", "tensor"),
  ("norm", None),
  ("act_embed", None),
  ("act_mlp", "tensor"),
  ("act_heads", "tensor"),
  ("act_vocab", "tensor"),
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves one ``-1`` entry to fill the devices; errors name ``mesh.<axis>``."""
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {fill}")
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{a}={s} must be a positive size or -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
        f"mesh: {num_devices} devices are not divisible by the fixed axes "
        f"(product {known}) so mesh.{fill[0]}=-1 cannot be filled"
      )
    sizes[MESH_AXES.index(fill[0])] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
      f"but {num_devices} are available"
    )
  return tuple(sizes)


def make_mesh(
  axes: Mapping[str, int] | None = None,
  devices: Sequence | None = None,
  dcn: Mapping[str, int] | None = None,
) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; ``dcn`` gives per-axis slice counts for multi-slice pods."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(axes or {"data": -1}, len(devices))
  if dcn and any(v != 1 for v in dcn.values()):
    from jax.experimental import mesh_utils

    dcn_shape = tuple(int(dcn.get(a, 1)) for a in MESH_AXES)
    ici_shape = tuple(s // d for s, d in zip(shape, dcn_shape))
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules) -> tuple:
  """Rules as hashable tuples (configs hold them as lists)."""
  if rules is None:
    return DEFAULT_RULES
  return tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax) for name, ax in rules)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules=DEFAULT_RULES):
  """Tracing context in which the model's logical activation constraints resolve on ``mesh``."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_shardings(abstract_tree, logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree from its logical specs, checking every sharded dim divides evenly."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)

  def check(path, leaf, spec):
    for dim, axes in zip(getattr(leaf, "shape", ()), spec):
      if dim % _axis_size(mesh, axes):
        raise ValueError(
          f"{jax.tree_util.keystr(path)} has shape {leaf.shape}: dimension {dim} is not "
          f"divisible by mesh axes {axes} (size {_axis_size(mesh, axes)}); change the "
          f"mesh or the logical-axis rules (a vocabulary can be padded instead: "
          f"model.vocab_multiple)"
        )
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
    check, abstract_tree, mesh_specs, is_leaf=lambda x: isinstance(x, P)
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, mesh: Mesh, name: str) -> None:
  n = _axis_size(mesh, BATCH_AXES)
  if batch_size % n:
    raise UserError(
      f"{name}={batch_size} is not divisible by the {n} data-parallel devices "
      f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})"
    )


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh):
  """Places a host-local batch (this process's rows) as global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }
