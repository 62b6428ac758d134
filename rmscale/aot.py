"""Ahead-of-time compilation of a config's jitted steps, with per-device memory: see an OOM before
paying for a pod.

    python -m rmscale.aot --config=configs/overopt.py:rm=3b --num_devices=64
    python -m rmscale.aot --config=configs/overopt.py:rm=85m --config.mesh.tensor=4 \
        --topology=v5e:16x16 --hbm_gib=16        # a TPU pod you do not have (needs libtpu)

Every step the stages run (SFT/LM steps, RM steps, the sampler, RM scoring) is lowered on abstract
inputs (``ShapeDtypeStruct``s carrying the run's shardings; nothing is allocated) and compiled by XLA
for the target devices; ``compiled.memory_analysis()`` then gives each device's bytes for arguments,
outputs, temporaries and donated (aliased) buffers.

Targets:
- the attached devices (the default); on a CPU host ``--num_devices=N`` fakes N devices, which checks
  that the mesh, shardings and shapes of an N-device pod fit together (CPU byte counts are close to
  TPU/GPU ones for arguments and outputs; temporaries depend on the backend's fusion).
- ``--topology``: a Cloud TPU slice by name (``v4:2x2x2``, ``v5e:16x16``, ...) through
  ``jax.experimental.topologies``; this needs libtpu (``pip install -e '.[tpu]'``) but no TPU: it
  compiles for the real chips. GPU clusters have no such compile-only path in JAX; run this on one node
  of the target GPU type with the mesh of the full job instead (``--config.mesh.*``) where it fits, or on
  CPU with ``--num_devices``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp

from rmscale.errors import UserError

STEP_KINDS = ("sft", "rm", "pretrain", "sampler", "score", "optimise")


@dataclasses.dataclass(frozen=True)
class StepReport:
  """Per-device memory of one compiled step (bytes)."""

  step: str  # e.g. "rm gold", "score proxy"
  size: str  # Named model size.
  batch: int  # Global batch rows (comparison pairs for RM steps).
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int  # Outputs written into donated arguments: counted once.
  code_bytes: int

  @property
  def peak_bytes(self) -> int:
    """Live at once at worst: inputs, outputs that do not reuse a donated input, and temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def report(step: str, size: str, batch: int, compiled) -> StepReport:
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError(f"{step} {size}: this backend gives no memory analysis")
  return StepReport(
    step,
    size,
    batch,
    int(m.argument_size_in_bytes),
    int(m.output_size_in_bytes),
    int(m.temp_size_in_bytes),
    int(m.alias_size_in_bytes),
    int(m.generated_code_size_in_bytes),
  )


def _with_shardings(abstract, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def abstract_train_state(model_cfg, tx, mesh, rules):
  """The train state ``init_state`` would build, as sharded ShapeDtypeStructs (nothing allocated)."""
  from rmscale.train.state import init_state

  shardings = {}

  def build(key):
    state, shardings["state"] = init_state(model_cfg, tx, key, mesh, rules)
    return state

  abstract = jax.eval_shape(build, jax.random.key(0))
  return _with_shardings(abstract, shardings["state"]), shardings["state"]


def _batch(spec: dict[str, tuple[tuple[int, ...], object]], sharding) -> dict:
  return {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in spec.items()
  }


def compile_train_step(model_cfg, loss_fn, tx, batch_spec: dict, mesh, rules):
  """Compiles ``rmscale.train.state.train_step`` exactly as ``state.compile_train_step`` jits it."""
  from rmscale.parallel import mesh as mesh_lib
  from rmscale.train import state as state_lib

  abstract, shardings = abstract_train_state(model_cfg, tx, mesh, rules)
  data = mesh_lib.batch_sharding(mesh)
  jitted = jax.jit(
    functools.partial(state_lib.train_step, loss_fn=loss_fn, tx=tx),
    in_shardings=(shardings, data),
    out_shardings=(shardings, mesh_lib.replicated(mesh)),
    donate_argnums=0,
  )
  with mesh_lib.sharding_context(mesh, rules):
    return jitted.lower(abstract, _batch(batch_spec, data)).compile()


def _abstract_params(ctx, model_cfg):
  from rmscale.models.transformer import abstract_params
  from rmscale.stages import common

  shapes, _ = abstract_params(model_cfg)
  shardings = common.param_shardings(ctx, model_cfg)
  return _with_shardings(shapes, shardings), shardings


def compile_sampler(ctx, model_cfg, batch: int):
  from rmscale.parallel import mesh as mesh_lib
  from rmscale.sampling import SamplingConfig, make_sampler

  c = ctx.config
  scfg = SamplingConfig(
    max_new_tokens=ctx.response_len,
    temperature=c.sampling.temperature,
    top_k=c.sampling.top_k,
    top_p=c.sampling.top_p,
    eos_id=ctx.world.tokenizer.eos_id,
    pad_id=ctx.world.tokenizer.pad_id,
  )
  params, pshard = _abstract_params(ctx, model_cfg)
  data, rep = mesh_lib.batch_sharding(ctx.mesh), mesh_lib.replicated(ctx.mesh)
  sampler = make_sampler(
    model_cfg, scfg, in_shardings=(pshard, data, data, rep), out_shardings=data
  )
  prompts = _batch(
    {"ids": ((batch, ctx.prompt_len), jnp.int32), "mask": ((batch, ctx.prompt_len), jnp.bool_)},
    data,
  )
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
  with mesh_lib.sharding_context(ctx.mesh, ctx.rules):
    return sampler.lower(params, prompts["ids"], prompts["mask"], key).compile()


def compile_scorer(ctx, model_cfg, batch: int):
  """The jitted reward of ``rm.make_scorer`` (same function, same shardings)."""
  from rmscale.parallel import mesh as mesh_lib
  from rmscale.train import rm

  params, pshard = _abstract_params(ctx, model_cfg)
  data = mesh_lib.batch_sharding(ctx.mesh)
  jitted = jax.jit(
    functools.partial(rm._reward, model_cfg=model_cfg),
    in_shardings=(pshard, data, data),
    out_shardings=mesh_lib.replicated(ctx.mesh),
  )
  seq = ctx.prompt_len + ctx.response_len
  inputs = _batch({"tokens": ((batch, seq), jnp.int32), "mask": ((batch, seq), jnp.bool_)}, data)
  with mesh_lib.sharding_context(ctx.mesh, ctx.rules):
    return jitted.lower(params, inputs["tokens"], inputs["mask"]).compile()


def plan_steps(config) -> list[tuple[str, str, str, int, object]]:
  """(kind, label, size, batch, config section) of every distinct step the config's stages compile."""
  stages = {s.strip() for s in config.stages.split(",")}
  p = config.proxies
  out = []
  if "policy_init" in stages:
    out.append(("sft", "sft policy", config.policy.size, config.policy.batch_size, config.policy))
  if "gold" in stages and config.gold.kind == "trained":
    if config.gold.get("init") == "pretrained":
      out.append(
        ("pretrain", "sft gold-LM", config.gold.size, config.pretrain.batch_size, config.pretrain)
      )
    out.append(("rm", "rm gold", config.gold.size, config.gold.batch_size, config.gold))
  if "proxies" in stages:
    for size in p.sizes:
      if p.init == "pretrained":
        out.append(("pretrain", "sft proxy-LM", size, config.pretrain.batch_size, config.pretrain))
      out.append(("rm", "rm proxy", size, p.batch_size, p))
  if stages & {"label", "reference"}:
    out.append(("sampler", "sample policy", config.policy.size, config.sample_batch_size, None))
  if stages & {"gold", "label", "reference", "optimise"} and config.gold.kind == "trained":
    out.append(("score", "score gold", config.gold.size, config.score_batch_size, None))
  if stages & {"proxies", "reference"}:
    out += [("score", "score proxy", size, config.score_batch_size, None) for size in p.sizes]
  if "optimise" in stages:  # Each method's own programs (rmscale/methods/), per proxy size.
    from rmscale import methods

    o = config.optimise
    rm_sizes = [
      s for s in p.sizes if not o.proxies or any(n.startswith(f"{s}_") for n in o.proxies)
    ]
    for name in o.methods:
      if methods.get(name).programs is not None:
        out += [("optimise", name, size, o.rollout_batch_size, None) for size in rm_sizes]
  seen, unique = set(), []
  for item in out:
    if item[0] == "pretrain" and item[2] == config.policy.size:
      continue  # pretrained_lm reuses the initial policy for its own size.
    # Same kind, size and batch (and, for a method's programs, the same method): the same program.
    key = ("sft" if item[0] == "pretrain" else item[0], item[2], item[3])
    key += (item[1],) if item[0] == "optimise" else ()
    if key not in seen:
      seen.add(key)
      unique.append(item)
  return unique


def compile_config(config, devices=None, kinds=STEP_KINDS, log=None) -> list[StepReport]:
  """Compiles every step of ``config`` for ``devices`` (default: the attached ones); per-device memory."""
  return [
    report(label, size, batch, compiled)
    for label, size, batch, compiled in compile_steps(config, devices, kinds, log)
  ]


def compile_steps(config, devices=None, kinds=STEP_KINDS, log=None):
  """Yields ``(label, size, batch, compiled)`` for every step of ``config`` (see ``plan_steps``)."""
  from rmscale import pipeline
  from rmscale.parallel import mesh as mesh_lib
  from rmscale.stages import common, roles
  from rmscale.train import rm, sft
  from rmscale.train.state import make_optimizer

  unknown = set(kinds) - set(STEP_KINDS)
  if unknown:
    raise UserError(f"unknown steps {sorted(unknown)}; known: {STEP_KINDS}")
  devices = list(devices if devices is not None else jax.devices())
  pipeline.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
  ctx = common.Context(
    config=config,
    workdir="",
    mesh=mesh,
    rules=mesh_lib.rules_from_config(config.rules),
    world=pipeline.make_world(config),  # The dataset's own sequence lengths for preference data.
  )
  seq = ctx.prompt_len + ctx.response_len
  for kind, label, size, batch, section in plan_steps(config):
    if kind not in kinds:
      continue
    if log:
      log(f"compiling {label} {size} (batch {batch}) for {len(devices)} devices ...")
    if kind in ("sft", "pretrain"):
      cfg = roles.model_config(ctx, size, "policy")
      spec = {
        "tokens": ((batch, seq), jnp.int32),
        "mask": ((batch, seq), jnp.bool_),
        "loss_mask": ((batch, seq), jnp.bool_),
      }
      tx = make_optimizer(common.optim_config(section, 1000))
      compiled = compile_train_step(cfg, sft.make_sft_loss(cfg), tx, spec, mesh, ctx.rules)
    elif kind == "rm":
      cfg = roles.model_config(ctx, size, "rm")
      spec = {
        k: ((batch, seq), jnp.bool_ if k.endswith("mask") else jnp.int32) for k in rm.BATCH_KEYS
      }
      tx = make_optimizer(common.optim_config(section, 1000))
      compiled = compile_train_step(
        cfg, rm.make_rm_loss(cfg, section.get("score_l2", 0.0)), tx, spec, mesh, ctx.rules
      )
    elif kind == "optimise":  # label is the method's name.
      from rmscale import methods

      m = methods.get(label)
      for step_label, rows, compiled in m.programs(m, ctx, methods.section(config, label), size):
        yield step_label, size, rows, compiled
      continue
    elif kind == "sampler":
      compiled = compile_sampler(ctx, roles.model_config(ctx, size, "policy"), batch)
    else:
      compiled = compile_scorer(ctx, roles.model_config(ctx, size, "rm"), batch)
    yield label, size, batch, compiled


def topology_devices(name: str, num_slices: int = 1) -> list:
  """Compile-only devices of a Cloud TPU slice (``v5e:16x16``), or a ValueError saying what is missing."""
  try:
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
  except (
    Exception
  ) as e:  # No libtpu, or a name libtpu does not know: both arrive as various errors.
    raise UserError(
      f"cannot describe TPU topology {name!r} ({type(e).__name__}: {str(e)[:300]}). Compiling for a TPU "
      "topology needs libtpu installed (pip install -e '.[tpu]'; no TPU is needed) and a name such as "
      "v4:2x2x2 or v5e:16x16. Without --topology, this compiles for the attached devices (on CPU, fake "
      "a pod's device count with --num_devices)."
    ) from e


def device_memory_limit(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # Compile-only and CPU devices have none.
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _fmt(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def format_table(reports: list[StepReport], limit: int | None, devices: int, target: str) -> str:
  head = f"per-device memory on {devices} x {target}" + (f" (limit {_fmt(limit)})" if limit else "")
  rows = [("step", "size", "batch", "arguments", "outputs", "donated", "temporaries", "peak", "")]
  for r in reports:
    verdict = "" if limit is None else ("OOM" if r.peak_bytes > limit else "ok")
    rows.append(
      (
        r.step,
        r.size,
        str(r.batch),
        _fmt(r.argument_bytes),
        _fmt(r.output_bytes),
        _fmt(r.alias_bytes),
        _fmt(r.temp_bytes),
        _fmt(r.peak_bytes),
        verdict,
      )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  return "\n".join(lines)


def main(argv):
  """The command line; an error in the user's input (flags, config, topology): one line, exit 2."""
  from absl import flags

  from rmscale import errors

  with errors.reported(flags.FLAGS.debug):
    _main(argv)


def _main(argv):
  from absl import flags

  from rmscale import fs

  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {argv[1:]}")
  json_path = fs.resolve(FLAGS.json) if FLAGS.json else None  # ~ expanded, relative made absolute.
  if FLAGS.num_devices and not FLAGS.topology:
    # Must precede the first use of the backend; only the CPU backend can fake devices.
    jax.config.update("jax_num_cpu_devices", FLAGS.num_devices)
    jax.config.update("jax_platforms", "cpu")
  if FLAGS.topology:
    devices, target = topology_devices(FLAGS.topology, FLAGS.num_slices), FLAGS.topology
  else:
    devices = jax.devices()
    target = devices[0].device_kind
  limit = int(FLAGS.hbm_gib * 2**30) if FLAGS.hbm_gib else device_memory_limit(devices[0])
  kinds = [k.strip() for k in FLAGS.steps.split(",") if k.strip()]
  reports = compile_config(
    _CONFIG.value, devices, kinds, log=lambda m: print(m, file=sys.stderr, flush=True)
  )
  print(format_table(reports, limit, len(devices), target))
  if json_path:
    from rmscale import results

    results.write_json(  # Atomic: a reader sees the old file or the whole new one.
      json_path,
      {
        "devices": len(devices),
        "target": target,
        "limit_bytes": limit,
        "steps": [{**dataclasses.asdict(r), "peak_bytes": r.peak_bytes} for r in reports],
      },
    )
  if limit is not None and any(r.peak_bytes > limit for r in reports):
    print(
      "predicted OOM: shard further (--config.mesh.fsdp / tensor), lower batch sizes, or use bfloat16 "
      "parameters",
      file=sys.stderr,
    )
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  from rmscale import cli

  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg)).", lock_config=True
  )
  flags.mark_flags_as_required(["config"])
  flags.DEFINE_string(
    "topology", None, "Cloud TPU topology to compile for, e.g. v5e:16x16 (needs libtpu)."
  )
  flags.DEFINE_integer("num_slices", 1, "Slices of --topology (multi-slice).")
  flags.DEFINE_integer("num_devices", None, "Fake this many CPU devices (without --topology).")
  flags.DEFINE_string("steps", ",".join(STEP_KINDS), f"Comma-separated subset of {STEP_KINDS}.")
  flags.DEFINE_float(
    "hbm_gib", None, "Device memory to check against (default: the attached device's)."
  )
  flags.DEFINE_string("json", None, "Also write the report to this JSON file (local or gs://).")
  flags.DEFINE_bool("debug", False, "Show the traceback of errors in the user's input too.")
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config=_CONFIG))
