"""Runs an experiment config's stages in order; each is skipped when its done-marker exists.

A stage reads the artefacts of earlier stages from the workdir and writes its own atomically, then
writes ``stages/<name>.json`` (its summary figures). A killed run therefore resumes at the stage it
was in, and inside long stages from the last orbax checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections

from rmscale import fs, provenance, results, run_log
from rmscale.data.world import World, WorldConfig
from rmscale.models import sizes
from rmscale.parallel import distributed
from rmscale.parallel import mesh as mesh_lib
from rmscale.stages import bon_stage, common, fit, gold, label, policy_init, proxies, rl

STAGES = {
  "policy_init": policy_init.run,
  "gold": gold.run,
  "label": label.run,
  "proxies": proxies.run,
  "bon": bon_stage.run,
  "rl": rl.run,
  "fit": fit.run,
}
ORDER = tuple(STAGES)
_log = logging.getLogger(__name__)


def stage_list(config) -> list[str]:
  names = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise ValueError(f"config.stages names unknown stages {unknown}; known: {list(ORDER)}")
  if names != sorted(names, key=ORDER.index):
    raise ValueError(f"config.stages must follow the order {list(ORDER)}, got {names}")
  return names


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Start-up checks; every error names the config key at fault."""
  stage_list(config)
  mesh_shape = mesh_lib.mesh_shape(dict(config.mesh), num_devices)
  dp = mesh_shape[0] * mesh_shape[1]
  world = WorldConfig(**config.world)  # Validates the world's fields.
  del world
  validate_checkpoints(config)
  # Sizes of models loaded from Hugging Face directories are names only (their shape is the file's).
  from_hf = {
    "policy.size": bool(config.policy.get("hf_dir")),
    "gold.size": config.gold.kind == "hf",
  }
  for key in ("policy.size", "gold.size"):
    section, field = key.split(".")
    if config[section][field] not in sizes.SIZES and not from_hf[key]:
      raise ValueError(
        f"config.{key}={config[section][field]!r} is not a known size; known: {list(sizes.SIZES)}"
      )
  for s in config.proxies.sizes:
    if s not in sizes.SIZES and config.proxies.init != "hf":
      raise ValueError(f"config.proxies.sizes has unknown size {s!r}; known: {list(sizes.SIZES)}")
  if config.gold.kind not in ("trained", "oracle", "hf"):
    raise ValueError(f"config.gold.kind={config.gold.kind!r} must be 'trained', 'oracle' or 'hf'")
  for key in ("proxies", "gold"):
    allowed = ("scratch", "pretrained", "hf") if key == "proxies" else ("scratch", "pretrained")
    if config[key].init not in allowed:
      raise ValueError(f"config.{key}.init={config[key].init!r} must be one of {allowed}")
  for key in (
    "policy.batch_size",
    "gold.batch_size",
    "proxies.batch_size",
    "pretrain.batch_size",
    "sample_batch_size",
    "score_batch_size",
  ):
    value = config
    for part in key.split("."):
      value = value[part]
    if value <= 0 or value % dp:
      raise ValueError(f"config.{key}={value} is not divisible by the {dp} data-parallel devices")
  if not 0.0 <= config.label.noise < 0.5:
    raise ValueError(f"config.label.noise={config.label.noise} must be in [0, 0.5)")
  if not 0.0 < config.label.val_fraction < 1.0:
    raise ValueError(f"config.label.val_fraction={config.label.val_fraction} must be in (0, 1)")
  n_train = config.label.num_comparisons - round(
    config.label.val_fraction * config.label.num_comparisons
  )
  for d in config.proxies.data_sizes:
    if not 0 < d <= n_train:
      raise ValueError(
        f"config.proxies.data_sizes has {d}, but label gives {n_train} training comparisons"
      )
  if config.bon.n_samples < 2 or config.bon.num_n < 2:
    raise ValueError("config.bon.n_samples and config.bon.num_n must be >= 2")
  r = config.rl
  for key in ("rollout_batch_size", "minibatch_size", "eval_prompts"):
    if r[key] <= 0 or r[key] % dp:
      raise ValueError(
        f"config.rl.{key}={r[key]} is not divisible by the {dp} data-parallel devices"
      )
  if r.rollout_batch_size % r.minibatch_size:
    raise ValueError(
      f"config.rl.minibatch_size={r.minibatch_size} does not divide rl.rollout_batch_size"
    )
  if r.eval_prompts % r.rollout_batch_size:
    raise ValueError(
      f"config.rl.eval_prompts={r.eval_prompts} is not a multiple of rl.rollout_batch_size"
    )
  names = {
    proxies.proxy_name(s, d, x)
    for s in config.proxies.sizes
    for d in config.proxies.data_sizes
    for x in config.proxies.seeds
  }
  unknown = [n for n in r.proxies if n not in names]
  if unknown:
    raise ValueError(
      f"config.rl.proxies names {unknown}, which are not proxies of this config: {sorted(names)}"
    )
  if r.kl_study_proxy and r.kl_study_proxy not in names:
    raise ValueError(
      f"config.rl.kl_study_proxy={r.kl_study_proxy!r} is not one of the proxies {sorted(names)}"
    )
  for m in ("dtype", "param_dtype"):
    if config.model[m] not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"config.model.{m}={config.model[m]!r} is not float32, bfloat16 or float16")


def data_kind(config) -> str:
  """'world' (the offline world; configs without a data section) or 'preferences'."""
  return config.get("data", {}).get("kind", "world")


def validate_checkpoints(config) -> None:
  """The data source and the Hugging Face checkpoint fields fit together (files are checked later,
  where they are read, with the same config keys in the errors)."""
  kind = data_kind(config)
  if kind not in ("world", "preferences"):
    raise ValueError(f"config.data.kind={kind!r} must be 'world' or 'preferences'")
  if kind == "preferences":
    from rmscale.data.preferences import data_config

    data_config(config.data)  # Validates the data fields.
    if config.gold.kind in ("trained", "oracle"):
      raise ValueError(
        f"config.gold.kind={config.gold.kind!r} needs the offline world's human utility; with "
        "config.data.kind='preferences' use gold.kind='hf' (a local gold RM checkpoint)"
      )
  elif config.gold.kind == "hf" or config.policy.get("hf_dir") or config.proxies.init == "hf":
    raise ValueError(
      "Hugging Face checkpoints (policy.hf_dir, gold.kind='hf', proxies.init='hf') need a real "
      "tokenizer and data: set config.data.kind='preferences'"
    )
  if config.gold.kind == "hf" and not config.gold.get("hf_dir"):
    raise ValueError(
      "config.gold.kind='hf' needs config.gold.hf_dir (a local checkpoint directory)"
    )
  if config.proxies.init == "hf" and "{size}" not in config.proxies.get("hf_dir_template", ""):
    raise ValueError(
      "config.proxies.init='hf' needs config.proxies.hf_dir_template with a '{size}' placeholder"
    )


def make_world(config):
  """The prompt source: the offline world, or a real preference dataset (``config.data``)."""
  if data_kind(config) == "preferences":
    from rmscale.data import preferences

    return preferences.from_config(config.data)
  return World(WorldConfig(**config.world))


def make_context(config, workdir: str) -> common.Context:
  mesh = mesh_lib.make_mesh(dict(config.mesh))
  writer = None
  if jax.process_index() == 0:
    writer = fs.summary_writer(os.path.join(workdir, "tensorboard"))
  return common.Context(
    config=config,
    workdir=workdir,
    mesh=mesh,
    rules=mesh_lib.rules_from_config(config.rules),
    world=make_world(config),
    writer=writer,
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs the configured stages; returns summary.md's text (or a short status).

  ``workdir`` may be relative (to the current directory), start with ``~``, or be a ``gs://`` URL.
  """
  validate(config, jax.device_count())
  workdir = fs.resolve(workdir)
  fs.makedirs(workdir)
  with run_log.log_file(workdir, jax.process_index()) as log:
    return _run_stages(config, workdir, log)


def _run_stages(config: ml_collections.ConfigDict, workdir: str, log: run_log.LogFile) -> str:
  names = stage_list(config)
  if jax.process_index() == 0:
    results.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    record = provenance.collect(config.seed, names)
    path = os.path.join(workdir, provenance.FILE)
    results.write_jsonl(path, (results.read_jsonl(path) if fs.exists(path) else []) + [record])
  _log.info("workdir %s (log: %s)", workdir, log.path)
  ctx = make_context(config, workdir)
  info: dict[str, dict] = {}
  for i, name in enumerate(names, 1):
    tag = f"[{i}/{len(names)}] {name}"
    marker = ctx.path("stages", f"{name}.json")
    # Process 0 decides for all, so every host runs (or skips) the same stages and collectives.
    if distributed.agree(fs.exists(marker)):
      info[name] = results.read_json(marker)
      _log.info("%s: done already, skipped%s", tag, _headline(info[name]))
      continue
    start = time.time()
    _log.info("%s: starting", tag)
    out = STAGES[name](ctx)
    out = {**out, "seconds": round(time.time() - start, 1)}
    results.write_json(marker, out)
    # Process 0 alone writes artefacts; the other hosts read them only after this point.
    distributed.barrier(f"stage {name} done")
    info[name] = out
    _log.info("%s: done in %s%s", tag, _duration(out["seconds"]), _headline(out))
    _log.info("stage %s: %s", name, json.dumps(out), extra=run_log.FILE_ONLY)
    log.sync()
  if ctx.writer is not None:
    ctx.writer.close()
  summary = ctx.path("summary.md")
  if fs.exists(summary):
    _log.info("summary: %s", summary)
    return fs.read_text(summary)
  return json.dumps(info, indent=2)


def _headline(out: dict) -> str:
  return f": {out['headline']}" if out.get("headline") else ""


def _duration(seconds: float) -> str:
  return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"
