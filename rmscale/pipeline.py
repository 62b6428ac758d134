"""Runs an experiment config's stages in order; each is skipped when its done-marker exists (and
matches the stage's fingerprint of the config, for stages that have one), until one runs: every
later stage then runs too.

A stage reads the artefacts of earlier stages from the workdir and writes its own atomically, then
writes ``stages/<name>.json`` (its summary figures). A killed run therefore resumes at the stage it
was in, and inside long stages from the last orbax checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax
import ml_collections

from rmscale import checks, fs, provenance, results, run_log
from rmscale.errors import UserError
from rmscale.data.world import World, WorldConfig
from rmscale.parallel import distributed
from rmscale.parallel import mesh as mesh_lib
from rmscale.stages import common, fit, gold, label, optimise, policy_init, proxies, reference

# Each stage is a module with ``validate(config, devices)`` (its config section, checked before
# anything is written) and ``run(ctx) -> dict`` (its summary figures, the stage's done-marker), and
# optionally ``fingerprint(config)``: what its results depend on, kept in the marker, so that a
# changed value (e.g. more methods in ``optimise.methods``) reruns the stage.
STAGES = {
  "policy_init": policy_init,
  "gold": gold,
  "label": label,
  "proxies": proxies,
  "reference": reference,
  "optimise": optimise,
  "fit": fit,
}
ORDER = tuple(STAGES)
_log = logging.getLogger(__name__)


def stage_list(config) -> list[str]:
  names = [s.strip() for s in checks.value(config, "stages").split(",") if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise UserError(f"config.stages names unknown stages {unknown}; known: {list(ORDER)}")
  if names != sorted(names, key=ORDER.index):
    raise UserError(f"config.stages must follow the order {list(ORDER)}, got {names}")
  return names


@contextlib.contextmanager
def _section(key: str):
  """A ValueError or TypeError from a section's own validation, as a UserError naming the section."""
  try:
    yield
  except UserError:
    raise
  except (ValueError, TypeError) as e:
    message = str(e)
    if not message.startswith("config."):
      message = f"config.{message}" if message.startswith(key) else f"config.{key}: {message}"
    raise UserError(message) from e


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Start-up checks, before anything is written; every error is a UserError naming the key.

  The shared sections (mesh, world or data, model, batch sizes) are checked here; each stage checks
  its own section (``validate`` in its module), whether or not it runs this time, so a config that
  would fail in a later invocation fails now.
  """
  stage_list(config)
  checks.count(config, "seed", minimum=0)
  with _section("mesh"):
    mesh_shape = mesh_lib.mesh_shape(dict(config.mesh), num_devices)
  dp = mesh_shape[0] * mesh_shape[1]
  with _section("world"):
    WorldConfig(**config.world)  # Validates the world's fields.
  with _section("data"):
    validate_checkpoints(config)  # data_config's own errors name config.data fields
  for key in ("model.dtype", "model.param_dtype"):
    checks.one_of(config, key, ("float32", "bfloat16", "float16"))
  for key in ("sample_batch_size", "score_batch_size"):
    checks.divisible(config, key, dp)
  for key in ("log_every", "save_every"):
    checks.count(config, key)
  for stage in STAGES.values():
    stage.validate(config, dp)


def data_kind(config) -> str:
  """'world' (the offline world; configs without a data section) or 'preferences'."""
  return config.get("data", {}).get("kind", "world")


def validate_checkpoints(config) -> None:
  """The data source and the Hugging Face checkpoint fields fit together (files are checked later,
  where they are read, with the same config keys in the errors)."""
  kind = data_kind(config)
  if kind not in ("world", "preferences"):
    raise UserError(f"config.data.kind={kind!r} must be 'world' or 'preferences'")
  if kind == "preferences":
    from rmscale.data.preferences import data_config

    data_config(config.data)  # Validates the data fields.
    if config.gold.kind in ("trained", "oracle"):
      raise UserError(
        f"config.gold.kind={config.gold.kind!r} needs the offline world's human utility; with "
        "config.data.kind='preferences' use gold.kind='hf' (a local gold RM checkpoint)"
      )
  elif config.gold.kind == "hf" or config.policy.get("hf_dir") or config.proxies.init == "hf":
    raise UserError(
      "Hugging Face checkpoints (policy.hf_dir, gold.kind='hf', proxies.init='hf') need a real "
      "tokenizer and data: set config.data.kind='preferences'"
    )
  if config.gold.kind == "hf" and not config.gold.get("hf_dir"):
    raise UserError("config.gold.kind='hf' needs config.gold.hf_dir (a local checkpoint directory)")
  if config.proxies.init == "hf" and "{size}" not in config.proxies.get("hf_dir_template", ""):
    raise UserError(
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
  ran = False  # Once a stage runs, every later stage runs too: its inputs may have changed.
  for i, name in enumerate(names, 1):
    tag = f"[{i}/{len(names)}] {name}"
    marker = ctx.path("stages", f"{name}.json")
    fingerprint = _fingerprint(STAGES[name], config)
    # Process 0 decides for all, so every host runs (or skips) the same stages and collectives.
    if distributed.agree(not ran and _done(marker, fingerprint)):
      info[name] = results.read_json(marker)
      _log.info("%s: done already, skipped%s", tag, _headline(info[name]))
      continue
    ran = True
    start = time.time()
    _log.info("%s: starting", tag)
    out = STAGES[name].run(ctx)
    out = {**out, "seconds": round(time.time() - start, 1)}
    if fingerprint is not None:
      out["fingerprint"] = fingerprint
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


def _fingerprint(stage, config):
  """The stage's fingerprint of ``config`` as JSON would store it (None: the stage has none)."""
  fn = getattr(stage, "fingerprint", None)
  return None if fn is None else json.loads(json.dumps(fn(config), default=str))


def _done(marker: str, fingerprint) -> bool:
  """The stage's marker exists and was written for this fingerprint."""
  if not fs.exists(marker):
    return False
  return fingerprint is None or results.read_json(marker).get("fingerprint") == fingerprint


def _headline(out: dict) -> str:
  return f": {out['headline']}" if out.get("headline") else ""


def _duration(seconds: float) -> str:
  return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"
