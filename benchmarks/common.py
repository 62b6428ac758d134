"""What every benchmark shares: the JSON record, model FLOPs, peak FLOP/s per device, timing.

A benchmark prints one JSON object per line on stdout so runs on different machines can be
concatenated and compared; every record names the device, date, model size and shapes it measured.
A bad flag ends the command in one line, ``error: ...``, exit status 2 (``--debug``: its traceback).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax

from rmscale import errors
from rmscale.errors import UserError
from rmscale.models.config import TransformerConfig
from rmscale.models.sizes import count_params

# Dense (no sparsity) peak FLOP/s per device from the vendors' datasheets, keyed by the arithmetic the
# matmuls actually use: "bf16" (also fp16), "tf32" (fp32 inputs on NVIDIA tensor cores, what JAX's
# default matmul precision gives on Ampere and later) and "fp32" (full-precision CUDA cores).
# A device absent here, or an arithmetic without a figure, gives MFU null: we never guess a peak
# (in particular not for CPUs, whose peak depends on the SKU, clocks and vector units in use).
_NVIDIA_PEAKS: tuple[tuple[str, dict[str, float] | None], ...] = (
  # Matched in order on the lower-cased device_kind, first hit wins.
  ("h100 nvl", None),  # Datasheets quote per-pair and per-GPU figures inconsistently: unknown.
  ("h200 nvl", None),
  ("h100 pcie", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
  ("h100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM ("H100 80GB HBM3").
  ("h200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # Same compute as H100 SXM.
  ("a100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),  # SXM and PCIe alike.
)
# TPUs: per chip (JAX exposes one device per chip from v4 on). With JAX's default precision an fp32
# matmul is a single bf16 pass, so it runs at the bf16 peak; higher precisions take several passes
# and have no datasheet figure.
_TPU_PEAKS: dict[str, float] = {
  "tpu v4": 275e12,
  "tpu v5 lite": 197e12,
  "tpu v5e": 197e12,
  "tpu v5": 459e12,
  "tpu v5p": 459e12,
  "tpu v6 lite": 918e12,
  "tpu v6e": 918e12,
}
# jax_default_matmul_precision values under which fp32 matmuls run on the fast units.
_FAST_FP32 = (None, "default", "fastest", "bfloat16", "tensorfloat32")


def matmul_arithmetic(platform: str, dtype: str, precision: str | None) -> str | None:
  """The arithmetic the model's matmuls run in on this device ('bf16', 'tf32', 'fp32'), or None."""
  if dtype in ("bfloat16", "float16"):
    return "bf16"
  if dtype != "float32":
    raise ValueError(f"dtype={dtype!r} is not one of float32, bfloat16, float16")
  if platform == "tpu":
    return "bf16" if precision in _FAST_FP32 else None
  if platform == "gpu":
    if precision in _FAST_FP32:
      return "tf32"
    return "fp32" if precision in ("highest", "float32") else None
  return None


def peak_flops_per_device(
  device_kind: str, platform: str, dtype: str, precision: str | None = None
) -> float | None:
  """Datasheet dense peak FLOP/s of one device for matmuls in ``dtype``; None where unknown."""
  arithmetic = matmul_arithmetic(platform, dtype, precision)
  if arithmetic is None:
    return None
  kind = device_kind.lower().strip()
  if platform == "tpu":
    return _TPU_PEAKS.get(kind) if arithmetic == "bf16" else None
  if platform == "gpu":
    for pattern, peaks in _NVIDIA_PEAKS:
      if pattern in kind:
        return None if peaks is None else peaks.get(arithmetic)
  return None


def train_flops_per_token(cfg: TransformerConfig, seq_len: int) -> dict[str, int]:
  """Model FLOPs of one training step per token (forward + backward), PaLM appendix B / Chinchilla.

  - ``dense``: 6 * N, N the non-embedding parameters (count_params): 2 FLOPs per weight per token
    forward, 4 backward (input and weight gradients). N includes biases and norm scales, which do
    no matmul: an overcount of ~2% at 0.1M parameters, negligible at scale.
  - ``attention``: 12 * n_layers * n_heads * head_dim * seq_len: the QK^T and AV products (2
    FLOPs per multiply-add, x3 for the backward) over the full sequence. Like PaLM we count the full
    LxL score matrix, not the causal half; this model computes it masked, so it is also real work.
  - ``lm_head``: 6 * d_model * vocab_size when the model has an LM head (tied or not); the input
    embedding is a gather and costs no FLOPs.
  - ``value_head``: 6 * d_model per token when present.

  The reward head reads one token per sequence, see ``train_flops_per_step``.
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  n = count_params(cfg)["non_embedding"]
  return {
    "dense": 6 * n,
    "attention": 12 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len,
    "lm_head": 6 * cfg.d_model * cfg.vocab_size if cfg.lm_head else 0,
    "value_head": 6 * cfg.d_model if cfg.value_head else 0,
  }


def train_flops_per_step(cfg: TransformerConfig, n_sequences: int, seq_len: int) -> int:
  """Model FLOPs of one training step over ``n_sequences`` sequences of ``seq_len`` tokens."""
  per_token = sum(train_flops_per_token(cfg, seq_len).values())
  reward_head = 0
  if cfg.reward_head == "linear":
    reward_head = 6 * cfg.d_model
  elif cfg.reward_head == "mlp":
    reward_head = 6 * (cfg.d_model * cfg.reward_head_hidden + cfg.reward_head_hidden)
  return n_sequences * (seq_len * per_token + reward_head)


def device_info(n_devices: int | None = None) -> dict:
  d = jax.devices()[0]
  return {
    "kind": d.device_kind,
    "platform": d.platform,
    "count": len(jax.devices()) if n_devices is None else n_devices,
  }


def peak_memory_bytes() -> int | None:
  """Peak bytes allocated on device 0 since start-up, where the backend reports it (GPU, TPU)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def base_record(
  benchmark: str,
  size: str,
  cfg: TransformerConfig,
  batch: int,
  seq_len: int,
  n_devices: int | None = None,
) -> dict:
  counts = count_params(cfg)
  return {
    "benchmark": benchmark,
    "device": device_info(n_devices),
    "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    "jax": jax.__version__,
    "model_size": size,
    "params": {"non_embedding": counts["non_embedding"], "total": counts["total"]},
    "batch": batch,
    "seq_len": seq_len,
    "dtype": cfg.dtype,
    "matmul_precision": jax.config.jax_default_matmul_precision,
  }


def emit(record: dict) -> dict:
  """One JSON line on stdout (flushed, so a killed run keeps what it measured)."""
  print(json.dumps(record, sort_keys=False), flush=True)
  return record


def time_calls(fn: Callable[[int], object], warmup: int, repeats: int) -> dict[str, float]:
  """Wall times of ``fn(i)`` (which must block until its result is ready), after ``warmup`` calls.

  The first warm-up call includes compilation; it is returned as ``first_s`` so compile cost is
  visible without polluting the median.
  """
  if warmup < 1:
    raise UserError(f"--warmup must be >= 1 (the first call compiles), got {warmup}")
  if repeats < 1:
    raise UserError(f"--steps/--repeats must be >= 1, got {repeats}")
  times = []
  for i in range(warmup + repeats):
    t0 = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - t0)
  return _summary(times, warmup)


def _summary(times: list[float], warmup: int) -> dict[str, float]:
  timed = times[warmup:]
  return {
    "first_s": times[0],
    "median_s": statistics.median(timed),
    "min_s": min(timed),
    "max_s": max(timed),
  }


def time_interleaved(
  fn_a: Callable[[int], object], fn_b: Callable[[int], object], warmup: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
  """`time_calls` of two functions whose calls alternate (a, b, a, b, ...), so that both see the
  same machine load; returns the two timing dicts."""
  calls = {"a": [], "b": []}

  def timed(fn, key):
    def call(i):
      t0 = time.perf_counter()
      fn(i)
      calls[key].append(time.perf_counter() - t0)

    return call

  def pair(i):
    timed(fn_a, "a")(i)
    timed(fn_b, "b")(i)

  time_calls(pair, warmup, repeats)
  return tuple(_summary(calls[k], warmup) for k in ("a", "b"))


def parse_list(text: str, name: str) -> list[str]:
  items = [s.strip() for s in text.split(",") if s.strip()]
  if not items:
    raise UserError(f"--{name} is empty")
  return items


def check_choices(items: Sequence[str], choices: Sequence[str], name: str) -> None:
  bad = [x for x in items if x not in choices]
  if bad:
    raise UserError(f"--{name}: {bad} not in {list(choices)}")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--debug", action="store_true", help="show the traceback of flag errors")


def run(main: Callable[[], object]) -> None:
  """``main()`` as the command line: a UserError (a bad flag) is one line, ``error: ...``, exit
  status 2; ``--debug`` shows its traceback."""
  with errors.reported(debug="--debug" in sys.argv[1:]):
    main()
