"""New tokens/s of the jitted KV-cache sampler (``rmscale.sampling``).

    python -m benchmarks.sampler --sizes=100k,1.6m --batch=16 --prompt_len=32 --new_tokens=64

EOS is disabled, so every row generates exactly ``new_tokens`` tokens and the figure does not depend
on when a random model happens to emit EOS. The time of one call covers the prefill of the prompt
and all decode steps (what best-of-n and PPO rollouts pay); it runs on one device. Prints one JSON
line per size.

``--peer`` also times PyTorch + transformers ``generate()`` (sampling, min = max new tokens, no
top-k/top-p) on the same model, exported with the same weights through ``rmscale.hf``, the two
timed alternately call by call; the record gains ``peer_*`` figures and ``ratio_vs_peer``
(rmscale's tokens/s over the peer's). torch is a test-only dependency (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import numpy as np

from benchmarks import common
from rmscale.errors import UserError
from rmscale.models import sizes
from rmscale.models.transformer import init_params
from rmscale.sampling import SamplingConfig, make_sampler


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.sampler",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--sizes", default="100k", help="comma-separated names from rmscale/models/sizes.py"
  )
  p.add_argument("--batch", type=int, default=16, help="prompts sampled in parallel")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls first (the first compiles)")
  p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16", "float16"),
    help="compute dtype (and KV-cache dtype); parameters stay float32",
  )
  p.add_argument(
    "--vocab_size",
    type=int,
    default=259,
    help="vocabulary of sizes not tied to a checkpoint (259: the byte tokenizer)",
  )
  p.add_argument(
    "--peer", action="store_true", help="also time transformers generate() (needs torch)"
  )
  common.add_debug_flag(p)
  return p.parse_args(argv)


def peer_generate(cfg, params, prompt_BxP: np.ndarray, args: argparse.Namespace):
  """``call(i)``: transformers ``generate()`` with ``params`` (via an exported HF directory)."""
  import tempfile

  import torch
  import transformers

  from rmscale import hf

  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(cfg, params, tmp)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
  model.eval()
  ids = torch.from_numpy(prompt_BxP.astype(np.int64))
  kwargs = dict(
    attention_mask=torch.ones_like(ids),
    min_new_tokens=args.new_tokens,
    max_new_tokens=args.new_tokens,
    do_sample=args.temperature > 0,
    top_k=0,
    top_p=1.0,
    pad_token_id=0,
  )
  if args.temperature > 0:
    kwargs["temperature"] = args.temperature

  def call(i):
    torch.manual_seed(i)
    with torch.inference_mode():
      out = model.generate(ids, **kwargs)
    if out.shape != (args.batch, args.prompt_len + args.new_tokens):
      raise RuntimeError(f"generate() returned shape {tuple(out.shape)}")

  return call


def run_one(size: str, args: argparse.Namespace) -> dict:
  cfg = sizes.model_config(size, vocab_size=args.vocab_size, dtype=args.dtype)
  params, _ = init_params(cfg, jax.random.key(0), seq_len=args.prompt_len)
  scfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=args.temperature, eos_id=None)
  sampler = make_sampler(cfg, scfg)
  rng = np.random.default_rng(0)
  prompt = jax.device_put(
    rng.integers(1, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  )
  prompt_mask = jax.device_put(np.ones((args.batch, args.prompt_len), bool))
  key = jax.random.key(1)
  out = {}

  def one_call(i):
    out["samples"] = jax.block_until_ready(
      sampler(params, prompt, prompt_mask, jax.random.fold_in(key, i))
    )

  peer = peer_generate(cfg, params, np.asarray(prompt), args) if args.peer else None
  if peer is None:
    times = common.time_calls(one_call, args.warmup, args.repeats)
  else:  # Alternate call by call, so both see the same machine load.
    times, peer_times = common.time_interleaved(one_call, peer, args.warmup, args.repeats)
  generated = int(np.asarray(out["samples"]["mask"]).sum())
  expected = args.batch * args.new_tokens
  if generated != expected:  # EOS is off: anything else means the figure counts the wrong tokens.
    raise RuntimeError(f"{size}: sampler generated {generated} tokens, expected {expected}")

  record = common.base_record(
    "sampler", size, cfg, args.batch, args.prompt_len + args.new_tokens, n_devices=1
  )
  record.update(
    {
      "prompt_len": args.prompt_len,
      "new_tokens": args.new_tokens,
      "temperature": args.temperature,
      "repeats_timed": args.repeats,
      "call_time_s": times["median_s"],
      "call_time_min_s": times["min_s"],
      "first_call_s": times["first_s"],  # Includes compilation.
      "new_tokens_per_s": expected / times["median_s"],
      "ms_per_decode_step": 1e3 * times["median_s"] / args.new_tokens,  # Prefill amortised in.
      "process_peak_memory_bytes": common.peak_memory_bytes(),
    }
  )
  if peer is not None:
    import torch
    import transformers

    record.update(
      {
        "peer": f"transformers {transformers.__version__} + torch {torch.__version__}",
        "peer_threads": torch.get_num_threads(),
        "peer_call_time_s": peer_times["median_s"],
        "peer_new_tokens_per_s": expected / peer_times["median_s"],
        "ratio_vs_peer": peer_times["median_s"] / times["median_s"],
      }
    )
  return record


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  size_names = common.parse_list(args.sizes, "sizes")
  common.check_choices(size_names, list(sizes.SIZES), "sizes")
  for name in ("batch", "prompt_len", "new_tokens", "vocab_size", "repeats", "warmup"):
    if getattr(args, name) <= 0:
      raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
  return [common.emit(run_one(size, args)) for size in size_names]


if __name__ == "__main__":
  common.run(main)
