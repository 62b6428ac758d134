"""Benchmarks: records carry what they claim, and the FLOPs formula is the real matmul work."""

import datetime
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

# benchmarks/ is a top-level folder of the repository, not part of the installed package.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from benchmarks import common, sampler, train_step  # noqa: E402
from benchmarks import methods as methods_bench  # noqa: E402
from rmscale.models import sizes  # noqa: E402
from rmscale.models.transformer import abstract_params  # noqa: E402
from rmscale.train import rm, sft  # noqa: E402
from rmscale.train.state import OptimConfig, make_optimizer  # noqa: E402
from rmscale.train.state import train_step as rmscale_train_step  # noqa: E402

# Size "100k" (neox family): d_model 64, 2 layers, 4 heads, d_ff 256, biases everywhere, LayerNorm.
# Per layer: attention 4*64*64 weights + 3*64 qkv bias + 64 out bias; MLP 2*64*256 + 256 + 64;
# two LayerNorms 2*(64+64). Plus the final LayerNorm.
HAND_NON_EMBEDDING_100K = 2 * (4 * 64 * 64 + 4 * 64 + 2 * 64 * 256 + 256 + 64 + 2 * 128) + 128
HAND_NON_MATMUL_100K = 2 * (4 * 64 + 256 + 64 + 2 * 128) + 128  # Biases and norm parameters.
BYTE_VOCAB = 259
COMMON_FIELDS = (
  "benchmark",
  "device",
  "date",
  "jax",
  "model_size",
  "params",
  "batch",
  "seq_len",
  "dtype",
  "matmul_precision",
)


def _today():
  return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def _lines(capsys):
  return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def _check_common(rec, benchmark, n_devices):
  for field in COMMON_FIELDS:
    assert field in rec, field
  assert rec["benchmark"] == benchmark
  assert rec["device"] == {
    "kind": jax.devices()[0].device_kind,
    "platform": "cpu",
    "count": n_devices,
  }
  assert rec["date"] == _today()
  assert rec["model_size"] == "100k"
  assert rec["params"]["non_embedding"] == HAND_NON_EMBEDDING_100K == 100096


def test_train_step_records(capsys):
  B, L = 8, 16
  records = train_step.main(
    ["--sizes=100k", "--kind=lm,rm", f"--batch={B}", f"--seq_len={L}", "--steps=2", "--warmup=1"]
  )
  assert (
    _lines(capsys) == records
  )  # What main returns is exactly what it printed, one JSON per line.
  assert [r["kind"] for r in records] == ["lm", "rm"]
  lm, rmr = records
  for rec in records:
    _check_common(rec, "train_step", n_devices=len(jax.devices()))
    assert rec["batch"] == B and rec["seq_len"] == L
    assert 0 < rec["step_time_min_s"] <= rec["step_time_s"]
    assert rec["peak_flops_per_s"] is None and rec["mfu"] is None  # No invented CPU peak.
    assert math.isfinite(rec["final_loss"])
    tokens = rec["sequences_per_step"] * L
    assert rec["tokens_per_s"] == pytest.approx(tokens / rec["step_time_s"], rel=1e-12)
    assert rec["achieved_flops_per_s"] == pytest.approx(
      rec["model_flops_per_step"] / rec["step_time_s"], rel=1e-12
    )

  # LM: untied embedding and LM head of 259 x 64 each.
  assert lm["params"]["total"] == 100096 + 2 * BYTE_VOCAB * 64
  assert lm["sequences_per_step"] == B
  # 6N + 12 * layers * d_model * L + 6 * d_model * V per token, x B*L tokens.
  assert lm["model_flops_per_token"] == {
    "dense": 600576,
    "attention": 24576,
    "lm_head": 99456,
    "value_head": 0,
  }
  assert lm["model_flops_per_step"] == B * L * (600576 + 24576 + 99456)
  # RM: pairs, so 2B sequences; no LM head; a linear reward head (64 weights) read once per sequence.
  assert rmr["params"]["total"] == 100096 + BYTE_VOCAB * 64 + 64
  assert rmr["sequences_per_step"] == 2 * B
  assert rmr["model_flops_per_step"] == 2 * B * (L * (600576 + 24576) + 6 * 64)


def test_sampler_records(capsys):
  records = sampler.main(
    ["--sizes=100k", "--batch=4", "--prompt_len=8", "--new_tokens=8", "--repeats=2"]
  )
  assert _lines(capsys) == records
  (rec,) = records
  _check_common(rec, "sampler", n_devices=1)
  assert (rec["batch"], rec["prompt_len"], rec["new_tokens"], rec["seq_len"]) == (4, 8, 8, 16)
  assert rec["new_tokens_per_s"] == pytest.approx(4 * 8 / rec["call_time_s"], rel=1e-12)
  assert rec["ms_per_decode_step"] == pytest.approx(1e3 * rec["call_time_s"] / 8, rel=1e-12)
  assert 0 < rec["call_time_min_s"] <= rec["call_time_s"]


def test_sampler_times_the_transformers_peer_on_the_same_model(capsys):
  (rec,) = sampler.main(
    ["--sizes=100k", "--batch=2", "--prompt_len=4", "--new_tokens=3", "--repeats=2", "--peer"]
  )
  capsys.readouterr()
  assert rec["peer"].startswith("transformers ") and " + torch " in rec["peer"]
  assert rec["peer_new_tokens_per_s"] == pytest.approx(2 * 3 / rec["peer_call_time_s"], rel=1e-12)
  assert rec["ratio_vs_peer"] == pytest.approx(
    rec["new_tokens_per_s"] / rec["peer_new_tokens_per_s"], rel=1e-12
  )


def test_interleaved_timing_alternates_the_two_functions():
  order = []
  a, b = common.time_interleaved(
    lambda i: order.append(("a", i)), lambda i: order.append(("b", i)), 1, 2
  )
  assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
  assert set(a) == set(b) == {"first_s", "median_s", "min_s", "max_s"}


def test_methods_records(capsys):
  """One record per method, PPO first (the ratios' reference); memory is the compiled program's."""
  R, K, N = 8, 2, 4
  records = methods_bench.main(
    [
      "--policy=25k",
      "--rm=25k",
      "--methods=rloo,ppo,rejection",
      f"--rollout={R}",
      "--minibatch=4",
      f"--k={K}",
      f"--response_len={N}",
      "--iterations=1",
      "--warmup=1",
      "--devices=2",  # 4 prompts per iteration at k=2: 2 devices split them.
    ]
  )
  assert _lines(capsys) == records
  assert [r["method"] for r in records] == ["ppo", "rloo", "rejection"]
  by = {r["method"]: r for r in records}
  ppo_rec = by["ppo"]
  for rec in records:
    for field in COMMON_FIELDS:
      assert field in rec, field
    assert rec["benchmark"] == "methods" and rec["device"]["count"] == 2
    assert (rec["model_size"], rec["rm_size"]) == ("25k", "25k")
    # The quickstart world's prompts and vocabulary (291 words padded to 296) unless flagged.
    assert (rec["prompt_len"], rec["response_len"], rec["seq_len"]) == (9, N, 9 + N)
    assert (rec["vocab_size"], rec["padded_vocab"]) == (291, 296)
    assert rec["rollout"] == rec["batch"] == R
    assert rec["settings"]["eos_id"] is None  # Fixed-length responses: the same decode work.
    assert rec["decoded_tokens_per_iteration"] == R * N
    assert rec["iterations_timed"] == 1 and rec["schedule"] == "interleaved"
    assert 0 < rec["iteration_time_min_s"] <= rec["iteration_time_s"] <= rec["iteration_time_max_s"]
    assert rec["compile_s"] > 0
    mem = rec["memory_per_device"]
    for field in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes"):
      assert isinstance(mem[field], int) and mem[field] > 0, field
    assert isinstance(mem["code_bytes"], int) and mem["code_bytes"] >= 0
    assert mem["peak_bytes"] == (
      mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
    )
    assert "memory_analysis()" in rec["memory_source"]
    assert rec["ratio_vs_ppo"]["time"] == pytest.approx(
      rec["iteration_time_s"] / ppo_rec["iteration_time_s"], rel=1e-12
    )
    assert rec["ratio_vs_ppo"]["peak_memory"] == pytest.approx(
      mem["peak_bytes"] / ppo_rec["memory_per_device"]["peak_bytes"], rel=1e-12
    )
  assert ppo_rec["ratio_vs_ppo"] == {"time": 1.0, "peak_memory": 1.0}
  # PPO: one response per prompt, 4 epochs x 2 minibatches; its shared critic's value head (and
  # Adam moments) make its state, the step's largest argument, bigger than RLOO's.
  assert (ppo_rec["samples_per_prompt"], ppo_rec["prompts_per_iteration"]) == (1, R)
  assert ppo_rec["updates_per_iteration"] == 4 * 2 and ppo_rec["settings"]["critic"] == "shared"
  assert (
    ppo_rec["memory_per_device"]["argument_bytes"]
    > by["rloo"]["memory_per_device"]["argument_bytes"]
  )
  # RLOO: k samples of R / k prompts, one pass; rejection: finetunes on R / k kept, one minibatch.
  for name, updates in (("rloo", 2), ("rejection", 1)):
    assert by[name]["samples_per_prompt"] == K
    assert by[name]["prompts_per_iteration"] == R // K
    assert by[name]["updates_per_iteration"] == updates


def test_methods_bad_flags_name_the_problem():
  # Rejection's default k=4 keeps 8 / 4 = 2 sequences: no minibatch of 4 fits (before any compile).
  with pytest.raises(ValueError, match="--methods=rejection with --rollout, --minibatch, --k"):
    methods_bench.main(["--methods=rejection", "--rollout=8", "--minibatch=4", "--response_len=2"])
  with pytest.raises(ValueError, match=r"--methods: \['dpo'\]"):
    methods_bench.main(["--methods=ppo,dpo"])
  with pytest.raises(ValueError, match="rloo: prompts per iteration .* not divisible by the 8"):
    methods_bench.main(["--methods=rloo", "--rollout=16", "--minibatch=8"])


def _jaxpr_matmul_flops(jaxpr) -> int:
  """Brute force: 2 * (output elements) * (contracted size) over every dot_general, sub-jaxprs too."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += (
        2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
      )
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          total += _jaxpr_matmul_flops(sub)
        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
          total += _jaxpr_matmul_flops(sub.jaxpr)
  return total


# (family overrides, hand-counted parameters that do no matmul: biases and norm scales/offsets).
VARIANTS = {
  "neox": ({}, HAND_NON_MATMUL_100K),
  # Llama with GQA (2 KV heads): no biases, RMSNorm has 64 scales; 2 per layer + final.
  "llama_gqa": ({"family": "llama", "n_kv_heads": 2}, 2 * 2 * 64 + 64),
}


@pytest.mark.parametrize("kind", ["lm", "rm"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flops_formula_matches_matmul_count_of_the_real_step(variant, kind):
  """The formula's FLOPs equal the dot_general FLOPs of the jaxpr of the real train step.

  The only allowed difference is the formula's documented overcount: 6 FLOPs per token for each
  bias/norm parameter, which 6N includes but no matmul performs.
  """
  overrides, non_matmul = VARIANTS[variant]
  B, L, V = 4, 16, 48
  cfg = sizes.model_config("100k", vocab_size=V, **overrides)
  if kind == "rm":
    cfg = cfg.replace(lm_head=False, reward_head="linear")
  tx = make_optimizer(OptimConfig())
  params, _ = abstract_params(cfg, seq_len=L)
  state = {
    "params": params,
    "opt_state": jax.eval_shape(tx.init, params),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  tok = jax.ShapeDtypeStruct((B, L), jnp.int32)
  mask = jax.ShapeDtypeStruct((B, L), jnp.bool_)
  if kind == "lm":
    batch, loss_fn, n_seq = (
      {"tokens": tok, "mask": mask, "loss_mask": mask},
      sft.make_sft_loss(cfg),
      B,
    )
  else:
    batch = {"chosen": tok, "chosen_mask": mask, "rejected": tok, "rejected_mask": mask}
    loss_fn, n_seq = rm.make_rm_loss(cfg), 2 * B
  jaxpr = jax.make_jaxpr(functools.partial(rmscale_train_step, loss_fn=loss_fn, tx=tx))(
    state, batch
  )
  counted = _jaxpr_matmul_flops(jaxpr.jaxpr)
  formula = common.train_flops_per_step(cfg, n_seq, L)
  assert formula - 6 * non_matmul * n_seq * L == counted


def test_peak_table_and_mfu():
  peak = common.peak_flops_per_device
  assert peak("NVIDIA H100 80GB HBM3", "gpu", "bfloat16") == 989.4e12
  assert peak("NVIDIA H100 PCIe", "gpu", "bfloat16") == 756e12
  assert peak("NVIDIA H100 NVL", "gpu", "bfloat16") is None  # Ambiguous datasheet: no guess.
  assert peak("NVIDIA H200", "gpu", "float32") == 494.7e12  # fp32 at default precision is TF32.
  assert peak("NVIDIA H200", "gpu", "float32", "highest") == 66.9e12
  assert peak("NVIDIA A100-SXM4-40GB", "gpu", "float16") == 312e12
  assert peak("NVIDIA GeForce RTX 4090", "gpu", "bfloat16") is None
  assert peak("TPU v5 lite", "tpu", "bfloat16") == 197e12
  assert peak("TPU v5p", "tpu", "float32") == 459e12  # One bf16 pass at default precision.
  assert peak("TPU v4", "tpu", "float32", "highest") is None
  assert peak("cpu", "cpu", "bfloat16") is None
  with pytest.raises(ValueError, match="dtype='int8'"):
    peak("TPU v4", "tpu", "int8")


def test_bad_flags_name_the_problem():
  with pytest.raises(ValueError, match=r"--sizes: \['9z'\]"):
    train_step.main(["--sizes=9z"])
  with pytest.raises(ValueError, match=r"--kind: \['ppo'\]"):
    train_step.main(["--sizes=100k", "--kind=ppo"])
  with pytest.raises(ValueError, match="--batch=12 is not divisible by the 8"):
    train_step.main(["--sizes=100k", "--batch=12"])
  with pytest.raises(ValueError, match="--new_tokens must be positive"):
    sampler.main(["--sizes=100k", "--new_tokens=0"])
