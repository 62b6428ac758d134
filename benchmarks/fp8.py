"""FP8 vs bf16: GEMM and train-step time and memory, FP8 GEMMs in the compiled HLO, training quality.

    python -m benchmarks.fp8 --what=gemm --gemm_sizes=256,512,1024
    python -m benchmarks.fp8 --what=train_step --sizes=100k,1.6m --batch=16 --seq_len=128
    python -m benchmarks.fp8 --what=memory --sizes=100k,85m,1.2b
    python -m benchmarks.fp8 --what=quality

Prints one JSON line per measurement (``benchmarks/common.py``).

* ``gemm``: an [n,n] x [n,n] matmul with bf16 output: ``bf16`` (bf16 operands, float32
  accumulation), ``fp8`` (operands already E4M3: the GEMM alone) and ``fp8_quantize`` (quantising
  both operands first, as an FP8 layer does). ``speedup_vs_bf16`` compares medians of one run.
* ``train_step``: the real jitted LM train step (rmscale/train/state.py) at levels ``bf16`` (bf16
  compute, float32 params and Adam), ``fp8`` (+ FP8 attention/MLP matmuls), ``O1`` (+ FP8 gradient
  all-reduce; only with more than one device) and ``O2`` (+ FP8/FP16 Adam moments).
* ``memory``: bytes per parameter of the train state and of the gradient as communicated, from the
  actual pytrees (``jax.eval_shape``: nothing is allocated, so any size runs on a laptop).
* ``quality``: a tiny RM's validation accuracy and a tiny SFT run's loss curve, fp8 vs baseline,
  on a small version of the offline world (what ``tests/ops/test_fp8_train.py`` checks).

**On CPU the FP8 matmul is emulated**: XLA's CPU backend has no FP8 arithmetic and converts the
operands to float32, so FP8 is slower there and the records say ``"fp8_emulated": true``. On an
NVIDIA Hopper/Ada GPU, XLA's GEMM rewriter turns the ``dot(f8, f8) -> f32`` + rescale pattern that
``fp8_dot`` lowers to into cuBLASLt FP8 calls (``__cublas$lt$matmul$f8``); every record counts
them in the compiled HLO (``fp8_gemm_custom_calls``), so a speedup is only claimed where FP8
GEMMs really run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import re
import time
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from rmscale.data.world import World, WorldConfig
from rmscale.errors import UserError
from rmscale.models import sizes
from rmscale.models.config import TransformerConfig
from rmscale.ops import fp8, fp8_collectives, fp8_optim
from rmscale.parallel import mesh as mesh_lib
from rmscale.train import rm, sft
from rmscale.train.state import (
  OptimConfig,
  compile_train_step,
  init_state,
  loss_and_grads,
  make_optimizer,
  train_step,
)

WHAT = ("gemm", "train_step", "memory", "quality")
LEVELS = ("bf16", "fp8", "O1", "O2")
FP8_GEMM_CALL = "__cublas$lt$matmul$f8"
DN_MATMUL = (((1,), (0,)), ((), ()))
# A small world: 4 topics, requests of 2-6 words, sequences of 9 + 10 tokens; the raters' broad
# writer of the gold stage (rambles, keyword stuffing, repeats) so comparisons span the utility.
SMALL_WORLD = dict(
  num_topics=4,
  num_keywords=4,
  min_request=2,
  max_request=6,
  max_response_len=10,
  p_ramble=0.3,
  p_keyword_extra=0.3,
  p_repeat=0.15,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.fp8",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--what", default="gemm,train_step,memory", help=f"comma-separated: {', '.join(WHAT)}"
  )
  p.add_argument(
    "--gemm_sizes", default="256,512,1024", help="comma-separated n of n x n x n GEMMs"
  )
  p.add_argument("--sizes", default="100k,1.6m", help="model sizes for train_step and memory")
  p.add_argument(
    "--levels", default=",".join(LEVELS), help=f"train_step levels: {', '.join(LEVELS)}"
  )
  p.add_argument("--batch", type=int, default=16, help="train_step sequences per step, global")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--vocab_size", type=int, default=259)
  p.add_argument("--steps", type=int, default=10, help="timed steps / GEMM calls (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first compiles)")
  p.add_argument(
    "--quality_steps", type=int, default=400, help="optimizer steps of each quality run"
  )
  common.add_debug_flag(p)
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------ HLO checks


def fp8_gemm_calls(compiled_hlo: str) -> int:
  """cuBLASLt FP8 GEMM custom calls in compiled HLO text (0 wherever FP8 is emulated)."""
  return compiled_hlo.count(FP8_GEMM_CALL)


def hlo_record(compiled) -> dict:
  text = compiled.as_text()
  calls = fp8_gemm_calls(text)
  return {
    "fp8_gemm_custom_calls": calls,
    "fp8_emulated": calls == 0,
    "hlo_has_f8_types": bool(re.search(r"\bf8e[45]m[23]", text)),
  }


def _today() -> str:
  return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def _device() -> dict:
  d = jax.devices()[0]
  return {"kind": d.device_kind, "platform": d.platform, "count": len(jax.devices())}


# ------------------------------------------------------------------------------------------ GEMM


def gemm_functions():
  """The three GEMM variants, each ``fn(a_bf16, b_bf16, a_scale, b_scale) -> bf16``."""

  def bf16(a, b, sa, sb):
    del sa, sb
    return jax.lax.dot_general(a, b, DN_MATMUL, preferred_element_type=jnp.float32).astype(
      jnp.bfloat16
    )

  def fp8_only(aq, bq, sa, sb):
    return fp8.fp8_dot(aq, bq, sa, sb, DN_MATMUL, jnp.bfloat16)

  def fp8_quantize(a, b, sa, sb):
    return fp8.fp8_dot(fp8.quantize(a, sa), fp8.quantize(b, sb), sa, sb, DN_MATMUL, jnp.bfloat16)

  return {"bf16": bf16, "fp8": fp8_only, "fp8_quantize": fp8_quantize}


def run_gemm(n: int, warmup: int, repeats: int) -> list[dict]:
  ka, kb = jax.random.split(jax.random.key(n))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(jnp.bfloat16)
  sa = jnp.float32(fp8.fp8_max(fp8.E4M3)) / jnp.max(jnp.abs(a)).astype(jnp.float32)
  sb = jnp.float32(fp8.fp8_max(fp8.E4M3)) / jnp.max(jnp.abs(b)).astype(jnp.float32)
  operands = {
    "bf16": (a, b),
    "fp8": (fp8.quantize(a, sa), fp8.quantize(b, sb)),
    "fp8_quantize": (a, b),
  }
  records, base_time = [], None
  for variant, fn in gemm_functions().items():
    x, y = operands[variant]
    compiled = jax.jit(fn).lower(x, y, sa, sb).compile()
    call = functools.partial(compiled, x, y, sa, sb)
    times = common.time_calls(lambda _, call=call: jax.block_until_ready(call()), warmup, repeats)
    base_time = times["median_s"] if variant == "bf16" else base_time
    records.append(
      {
        "benchmark": "fp8_gemm",
        "device": _device(),
        "jax": jax.__version__,
        "date": _today(),
        "m": n,
        "n": n,
        "k": n,
        "variant": variant,
        "time_s": times["median_s"],
        "first_call_s": times["first_s"],
        "tflops_per_s": 2 * n**3 / times["median_s"] / 1e12,
        "speedup_vs_bf16": base_time / times["median_s"],
        "operand_bytes": int(x.nbytes + y.nbytes),
        **hlo_record(compiled),
      }
    )
  return records


# ------------------------------------------------------------------------------- train step, memory


def level_setup(level: str, size: str, vocab_size: int):
  """Model config, optimizer config and whether the gradients take the O1 FP8 all-reduce."""
  if level not in LEVELS:
    raise ValueError(f"level {level!r} is not one of {LEVELS}")
  cfg = sizes.model_config(
    size, vocab_size=vocab_size, dtype="bfloat16", matmul="default" if level == "bf16" else "fp8"
  )
  ocfg = OptimConfig(
    learning_rate=1e-4, total_steps=1000, moments="fp8" if level == "O2" else "float32"
  )
  return cfg, ocfg, level in ("O1", "O2")


def abstract_memory(level: str, size: str, vocab_size: int, seq_len: int = 8) -> dict:
  """Bytes per parameter of a level's train state and communicated gradient, from eval_shape."""
  cfg, ocfg, o1 = level_setup(level, size, vocab_size)
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  tx = make_optimizer(ocfg)
  state = jax.eval_shape(
    lambda r: init_state(cfg, tx, r, mesh, seq_len=seq_len)[0], jax.random.key(0)
  )
  grads = state["params"]  # Gradients have the params' dtypes (float32) unless O1 encodes them.
  if o1:
    mask = fp8_collectives.fp8_gemm_kernel_mask(state["params"], state["fp8_meta"])
    grads = jax.eval_shape(lambda g: fp8_collectives.gradient_payload(g, mask), grads)
  return fp8_optim.bytes_per_param(state, grads)


def compiled_memory(compiled) -> dict | None:
  """XLA's buffer assignment of one compiled program: arguments, outputs, temporaries (bytes)."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}


def run_train_step(level: str, size: str, args: argparse.Namespace) -> dict | None:
  """Times ``train_step`` jitted as ``compile_train_step`` does, compiled once ahead of time so the
  same executable is timed and inspected (FP8 GEMM calls, buffer sizes)."""
  cfg, ocfg, o1 = level_setup(level, size, args.vocab_size)
  n_dev = len(jax.devices())
  if level == "O1" and n_dev == 1:
    return None  # An all-reduce over one device is the identity: nothing to measure.
  mesh = mesh_lib.make_mesh({"data": -1})
  mesh_lib.check_batch_divisible(args.batch, mesh, "--batch")
  tx = make_optimizer(ocfg)
  state, shardings = init_state(cfg, tx, jax.random.key(0), mesh, seq_len=args.seq_len)
  grads_fn = loss_and_grads
  if o1 and n_dev > 1:
    grads_fn = fp8_collectives.fp8_data_parallel(loss_and_grads, mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  batch = mesh_lib.put_batch({"tokens": tokens, "mask": mask, "loss_mask": mask}, mesh)
  jitted = jax.jit(
    functools.partial(train_step, loss_fn=sft.make_sft_loss(cfg), tx=tx, grads_fn=grads_fn),
    in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
    out_shardings=(shardings, mesh_lib.replicated(mesh)),
    donate_argnums=0,
  )
  t0 = time.perf_counter()
  with mesh_lib.sharding_context(mesh):
    compiled = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state, "metrics": None}

  def one_step(_):
    holder["state"], holder["metrics"] = compiled(holder["state"], batch)
    jax.block_until_ready(holder["metrics"])

  times = common.time_calls(one_step, args.warmup, args.steps)
  loss = float(holder["metrics"]["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"{size} {level}: non-finite loss {loss}")
  record = common.base_record("fp8_train_step", size, cfg, args.batch, args.seq_len, n_dev)
  record.update(
    {
      "level": level,
      "matmul": cfg.matmul,
      "moments": ocfg.moments,
      "fp8_grad_all_reduce": o1 and n_dev > 1,
      "step_time_s": times["median_s"],
      "compile_s": compile_s,
      "tokens_per_s": args.batch * args.seq_len / times["median_s"],
      "final_loss": loss,
      "bytes_per_param": abstract_memory(level, size, args.vocab_size),
      "step_buffers_bytes": compiled_memory(compiled),
      "process_peak_memory_bytes": common.peak_memory_bytes(),
      **hlo_record(compiled),
    }
  )
  return record


# --------------------------------------------------------------------------------------- quality


def small_world() -> World:
  return World(WorldConfig(**SMALL_WORLD))


def preference_pairs(world: World, n: int, seed: int, split: str) -> dict[str, np.ndarray]:
  """``n`` comparisons of two writer responses per prompt, the higher human utility chosen."""
  from rmscale.stages.gold import comparison_arrays

  rng = np.random.default_rng(seed)
  prompts = world.sample_prompts(rng, n, split)
  a, b = (
    world.sample_responses(rng, prompts["index"]),
    world.sample_responses(rng, prompts["index"]),
  )
  ua = world.utility(prompts["ids"], a["ids"], a["mask"])
  ub = world.utility(prompts["ids"], b["ids"], b["mask"])
  return comparison_arrays(prompts["ids"], prompts["mask"], a, b, ua >= ub)


def _tiny_setup(cfg: TransformerConfig, loss_fn, steps: int, lr: float, seed: int):
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  tx = make_optimizer(
    OptimConfig(
      learning_rate=lr, warmup_steps=min(20, steps // 10), total_steps=steps, end_lr_fraction=0.0
    )
  )
  state, shardings = init_state(cfg, tx, jax.random.key(seed), mesh)
  return state, compile_train_step(loss_fn, tx, shardings, mesh)


def train_rm(
  world: World,
  matmul: str,
  *,
  steps: int,
  batch: int = 32,
  lr: float = 3e-3,
  n_train: int = 8000,
  n_eval: int = 4000,
  size: str = "100k",
  dtype: str = "float32",
  seed: int = 0,
  **overrides,
) -> dict:
  """Trains a linear-head RM; held-out accuracy scored on params alone (FP8: current scaling) and,
  for FP8, also with the trained delayed-scaling meta."""
  cfg = sizes.model_config(
    size,
    vocab_size=world.tokenizer.vocab_size,
    lm_head=False,
    reward_head="linear",
    max_len=world.prompt_len + world.response_len,
    matmul=matmul,
    dtype=dtype,
    **overrides,
  )
  state, step = _tiny_setup(cfg, rm.make_rm_loss(cfg), steps, lr, seed)
  train = preference_pairs(world, n_train, seed + 1, "train")
  held_out = preference_pairs(world, n_eval, seed + 2, "eval")
  order = np.random.default_rng(seed)
  t0 = time.perf_counter()
  for _ in range(steps):
    idx = order.integers(0, n_train, batch)
    state, metrics = step(state, {k: v[idx] for k, v in train.items()})
  jax.block_until_ready(metrics)
  train_s = time.perf_counter() - t0
  score = jax.jit(lambda p, t, m: rm._reward(p, t, m, model_cfg=cfg))

  def accuracy(params):
    return float(
      jnp.mean(
        score(params, held_out["chosen"], held_out["chosen_mask"])
        > score(params, held_out["rejected"], held_out["rejected_mask"])
      )
    )

  out = {
    "accuracy": accuracy(state["params"]),
    "train_s": train_s,
    "final_loss": float(metrics["loss"]),
  }
  if "fp8_meta" in state:
    out["accuracy_with_meta"] = accuracy({**state["params"], "fp8_meta": state["fp8_meta"]})
  return out


def train_sft(
  world: World,
  matmul: str,
  *,
  steps: int,
  batch: int = 32,
  lr: float = 3e-3,
  size: str = "100k",
  dtype: str = "float32",
  seed: int = 0,
  **overrides,
) -> dict:
  """Trains an LM on the world's writer; returns the per-step training loss."""
  cfg = sizes.model_config(
    size,
    vocab_size=world.tokenizer.vocab_size,
    max_len=world.prompt_len + world.response_len,
    matmul=matmul,
    dtype=dtype,
    **overrides,
  )
  state, step = _tiny_setup(cfg, sft.make_sft_loss(cfg), steps, lr, seed)
  ex = world.sft_examples(seed + 1, steps * batch)
  tokens = np.concatenate([ex["prompt_ids"], ex["response_ids"]], 1)
  mask = np.concatenate([ex["prompt_mask"], ex["response_mask"]], 1)
  loss_mask = np.concatenate([np.zeros_like(ex["prompt_mask"]), ex["response_mask"]], 1)
  losses = []
  t0 = time.perf_counter()
  for s in range(steps):
    rows = slice(s * batch, (s + 1) * batch)
    batch_rows = {"tokens": tokens[rows], "mask": mask[rows], "loss_mask": loss_mask[rows]}
    state, metrics = step(state, batch_rows)
    losses.append(metrics["loss"])
  losses = [float(x) for x in jax.device_get(losses)]
  return {"losses": losses, "train_s": time.perf_counter() - t0}


def curve_deviation(reference: Sequence[float], other: Sequence[float], window: int = 10) -> dict:
  """Relative deviation of a loss curve from a reference: per step, and of ``window``-step means."""
  a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size < window:
    raise ValueError(
      f"curves must be 1-D, equally long and >= window={window}: {a.shape}, {b.shape}"
    )
  n = a.size // window * window
  wa, wb = a[:n].reshape(-1, window).mean(1), b[:n].reshape(-1, window).mean(1)
  return {
    "max_step_rel_dev": float(np.max(np.abs(b - a) / a)),
    "max_window_rel_dev": float(np.max(np.abs(wb - wa) / wa)),
    "final_window_rel_dev": float(abs(wb[-1] - wa[-1]) / wa[-1]),
  }


def run_quality(steps: int) -> list[dict]:
  world = small_world()
  records = []
  base = {
    "benchmark": "fp8_quality",
    "device": _device(),
    "jax": jax.__version__,
    "date": _today(),
    "steps": steps,
    "world": SMALL_WORLD,
    "model_size": "100k",
  }
  rm_runs = {m: train_rm(world, m, steps=steps) for m in ("default", "fp8")}
  records.append(
    {
      **base,
      "task": "rm",
      "baseline": rm_runs["default"],
      "fp8": rm_runs["fp8"],
      "accuracy_gap_points": 100 * (rm_runs["fp8"]["accuracy"] - rm_runs["default"]["accuracy"]),
    }
  )
  sft_runs = {m: train_sft(world, m, steps=steps) for m in ("default", "fp8")}
  deviation = curve_deviation(sft_runs["default"]["losses"], sft_runs["fp8"]["losses"])
  records.append(
    {
      **base,
      "task": "sft",
      **deviation,
      "final_loss": {m: float(np.mean(r["losses"][-10:])) for m, r in sft_runs.items()},
    }
  )
  return records


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  what = common.parse_list(args.what, "what")
  common.check_choices(what, WHAT, "what")
  size_names = common.parse_list(args.sizes, "sizes")
  common.check_choices(size_names, list(sizes.SIZES), "sizes")
  levels = common.parse_list(args.levels, "levels")
  common.check_choices(levels, LEVELS, "levels")
  gemm_sizes = common.parse_list(args.gemm_sizes, "gemm_sizes")
  if not all(n.isdigit() and int(n) > 0 for n in gemm_sizes):
    raise UserError(f"--gemm_sizes={args.gemm_sizes!r}: give positive whole numbers, e.g. 256,512")
  records = []
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    if "gemm" in what:
      for n in map(int, gemm_sizes):
        records += [common.emit(r) for r in run_gemm(n, args.warmup, args.steps)]
    if "train_step" in what:
      for size in size_names:
        for level in levels:
          record = run_train_step(level, size, args)
          if record is not None:
            records.append(common.emit(record))
    if "memory" in what:
      for size in size_names:
        for level in ("bf16", "O1", "O2"):
          records.append(
            common.emit(
              {
                "benchmark": "fp8_memory",
                "date": _today(),
                "model_size": size,
                "level": level,
                "bytes_per_param": abstract_memory(level, size, args.vocab_size),
              }
            )
          )
    if "quality" in what:
      records += [common.emit(r) for r in run_quality(args.quality_steps)]
  return records


if __name__ == "__main__":
  common.run(main)
