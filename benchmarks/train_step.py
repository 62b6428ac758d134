"""Train-step throughput and model FLOPs utilisation of the LM (SFT) and reward-model steps.

    python -m benchmarks.train_step --sizes=100k,1.6m --kind=lm,rm --batch=16 --seq_len=128 --steps=10

Times the real jitted, sharded, donated step from ``rmscale.train.state`` (AdamW and gradient
clipping included) on a data-parallel mesh over every visible device. An RM step takes ``batch``
*pairs*, so 2 x batch sequences go through the model; tokens/s and FLOPs count both sides.
Prints one JSON line per (size, kind); see ``benchmarks/common.py`` for the FLOPs formula.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence

import jax
import numpy as np

from benchmarks import common
from rmscale.errors import UserError
from rmscale.models import sizes
from rmscale.models.config import TransformerConfig
from rmscale.parallel import mesh as mesh_lib
from rmscale.train import rm, sft
from rmscale.train.state import OptimConfig, compile_train_step, init_state, make_optimizer

KINDS = ("lm", "rm")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.train_step",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--sizes", default="100k", help="comma-separated names from rmscale/models/sizes.py"
  )
  p.add_argument(
    "--kind",
    default="lm,rm",
    help="comma-separated: lm (next-token loss), rm (Bradley-Terry pairs)",
  )
  p.add_argument(
    "--batch", type=int, default=16, help="sequences (lm) or pairs (rm) per step, global"
  )
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16", "float16"),
    help="compute dtype of the matmuls; parameters stay float32",
  )
  p.add_argument(
    "--vocab_size",
    type=int,
    default=259,
    help="vocabulary of sizes not tied to a checkpoint (259: the byte tokenizer)",
  )
  p.add_argument(
    "--remat", action="store_true", help="rematerialise each block (memory for compute)"
  )
  common.add_debug_flag(p)
  return p.parse_args(argv)


def benchmark_config(
  size: str, kind: str, vocab_size: int, dtype: str, remat: bool
) -> TransformerConfig:
  """The model a step of ``kind`` trains: LM head only for lm, linear reward head only for rm."""
  cfg = sizes.model_config(size, vocab_size=vocab_size, dtype=dtype, remat=remat)
  if kind == "rm":
    cfg = cfg.replace(lm_head=False, tie_embeddings=False, reward_head="linear")
  return cfg


def synthetic_batch(kind: str, batch: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
  """Random tokens, no padding: every position is real work, as in a packed production batch."""
  rng = np.random.default_rng(0)
  tokens = lambda: rng.integers(1, vocab_size, (batch, seq_len)).astype(np.int32)  # noqa: E731
  mask = np.ones((batch, seq_len), bool)
  if kind == "lm":
    return {"tokens": tokens(), "mask": mask, "loss_mask": mask}
  return {
    "chosen": tokens(),
    "chosen_mask": mask,
    "rejected": tokens(),
    "rejected_mask": mask.copy(),
  }


def run_one(size: str, kind: str, args: argparse.Namespace, mesh) -> dict:
  cfg = benchmark_config(size, kind, args.vocab_size, args.dtype, args.remat)
  tx = make_optimizer(OptimConfig(learning_rate=1e-4, total_steps=args.warmup + args.steps))
  state, shardings = init_state(cfg, tx, jax.random.key(0), mesh, seq_len=args.seq_len)
  loss_fn = sft.make_sft_loss(cfg) if kind == "lm" else rm.make_rm_loss(cfg)
  step = compile_train_step(loss_fn, tx, shardings, mesh)
  batch = mesh_lib.put_batch(synthetic_batch(kind, args.batch, args.seq_len, cfg.vocab_size), mesh)

  holder = {"state": state, "metrics": None}

  def one_step(_):
    holder["state"], holder["metrics"] = step(holder["state"], batch)
    jax.block_until_ready((holder["state"], holder["metrics"]))

  times = common.time_calls(one_step, args.warmup, args.steps)
  loss = float(holder["metrics"]["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(
      f"{size} {kind}: non-finite loss {loss}; the timing would be meaningless"
    )

  n_sequences = args.batch * (2 if kind == "rm" else 1)
  tokens = n_sequences * args.seq_len
  flops = common.train_flops_per_step(cfg, n_sequences, args.seq_len)
  n_devices = mesh.devices.size
  device = jax.devices()[0]
  peak = common.peak_flops_per_device(
    device.device_kind, device.platform, cfg.dtype, jax.config.jax_default_matmul_precision
  )
  achieved = flops / times["median_s"]
  record = common.base_record("train_step", size, cfg, args.batch, args.seq_len, n_devices)
  record.update(
    {
      "kind": kind,
      "sequences_per_step": n_sequences,
      "steps_timed": args.steps,
      "step_time_s": times["median_s"],
      "step_time_min_s": times["min_s"],
      "first_step_s": times["first_s"],  # Includes compilation.
      "tokens_per_s": tokens / times["median_s"],
      "model_flops_per_token": common.train_flops_per_token(cfg, args.seq_len),
      "model_flops_per_step": flops,
      "achieved_flops_per_s": achieved,
      "peak_flops_per_s": None if peak is None else peak * n_devices,
      "mfu": None if peak is None else achieved / (peak * n_devices),
      "remat": cfg.remat,
      "final_loss": loss,
      "process_peak_memory_bytes": common.peak_memory_bytes(),  # Since start-up: monotone over records.
    }
  )
  return record


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  size_names = common.parse_list(args.sizes, "sizes")
  common.check_choices(size_names, list(sizes.SIZES), "sizes")
  kinds = common.parse_list(args.kind, "kind")
  common.check_choices(kinds, KINDS, "kind")
  for name in ("batch", "seq_len", "vocab_size", "steps", "warmup"):
    if getattr(args, name) <= 0:
      raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
  mesh = mesh_lib.make_mesh({"data": -1})
  mesh_lib.check_batch_divisible(args.batch, mesh, "--batch")
  records = []
  with warnings.catch_warnings():
    # CPU cannot donate buffers; the step still donates where the backend can.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    for size in size_names:
      for kind in kinds:
        records.append(common.emit(run_one(size, kind, args, mesh)))
  return records


if __name__ == "__main__":
  common.run(main)
