"""Wall time and per-device memory of one iteration of each iterative alignment method.

    python -m benchmarks.methods --policy=200k --rm=400k \
        --methods=ppo,reinforce,remax,rloo,grpo,rejection --rollout=64 --minibatch=16 \
        --iterations=5 --warmup=1

Times the real jitted, sharded, donated iteration each method's pipeline runs (``make_ppo_step``,
``make_pg_step``, ``make_rejection_step``): sampling, scoring by the reward model, the reference's
log-probs and the method's updates, on one data-parallel mesh over ``--devices`` (default: every
visible device). The settings mirror the pipeline's: each method's defaults from
``rmscale/methods/`` (PPO: 4 epochs, shared critic; GRPO: k=4, 2 epochs; RLOO and rejection: k=4;
...), the quickstart's models (neox, rotary 0.5, vocabulary padded to a multiple of 8, a linear
reward head), sampling temperature 1 and no KL penalty in the reward (the reference's log-probs are
computed all the same). ``--rollout`` counts *sequences* per iteration for every method, so at k
samples per prompt an iteration takes ``rollout / k`` prompts: every method samples the same number
of responses (ReMax also decodes one greedy response per sampled one).

Prompt, response and vocabulary sizes default to the quickstart's world (``rmscale.data.world``:
9-token prompts, 24-token responses, 291 words padded to 296). The policy and the reward model are
random (untrained): an iteration's cost does not depend on the weights except through the lengths
of the responses, so EOS is disabled (``eos_id=None``) and every response is exactly
``response_len`` tokens, for every method alike (checked after timing).

Memory is per device, from XLA's ``memory_analysis()`` of the compiled ``step.jitted`` (lowered on
the very arrays the step is then called with): arguments, outputs, temporaries, outputs aliased
into donated arguments, and ``peak = argument + output - alias + temp`` (``rmscale.aot``'s
``StepReport.peak_bytes``). It measures the program, not the allocator, so it is the same whether
methods are timed one after the other or side by side. The compile (``compile_s``) is that AOT
compile; the first call then reuses it.

Methods are timed interleaved by default (one iteration of each in turn, so all see the same machine
load), which keeps every method's state resident at once; ``--sequential`` builds, times and frees
one method at a time (for sizes whose states do not all fit). PPO, when among ``--methods``, runs
first and every record gains ``ratio_vs_ppo``: this method's median time and peak memory over
PPO's, measured in the same process on the same mesh. Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import numpy as np

from benchmarks import common
from rmscale import aot
from rmscale import methods as method_registry
from rmscale.errors import UserError
from rmscale.models import sizes
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import init_params
from rmscale.parallel import mesh as mesh_lib
from rmscale.train import pg, policy, ppo, rejection
from rmscale.train.state import OptimConfig, make_optimizer

METHODS = ("ppo", "reinforce", "remax", "rloo", "grpo", "rejection")
# The quickstart's (configs/quickstart.py) settings every method shares.
FAMILY, ROTARY_PCT, VOCAB_MULTIPLE, REWARD_HEAD = "neox", 0.5, 8, "linear"
TEMPERATURE = 1.0  # sampling.temperature
KL_COEF = 0.0  # optimise.kl_coef
WARMUP_STEPS = 10  # optimise.warmup_steps
PAD_ID = 0  # The world's tokenizer.
MEMORY_SOURCE = "memory_analysis() of the compiled step.jitted (XLA), per device"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.methods",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--policy", default="200k", help="policy size (rmscale/models/sizes.py)")
  p.add_argument("--rm", default="400k", help="reward-model size (rmscale/models/sizes.py)")
  p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {METHODS}")
  p.add_argument("--rollout", type=int, default=64, help="sequences sampled per iteration")
  p.add_argument("--minibatch", type=int, default=16, help="sequences per gradient step")
  p.add_argument(
    "--k",
    type=int,
    default=None,
    help="samples per prompt of rloo, grpo and rejection (default: each method's own, 4)",
  )
  p.add_argument(
    "--ppo_critic",
    default=None,
    choices=ppo.CRITICS,
    help="PPO's critic (default: the method's, shared): 'separate' trains a second model",
  )
  p.add_argument("--prompt_len", type=int, default=None, help="default: the quickstart world's")
  p.add_argument("--response_len", type=int, default=None, help="default: the quickstart world's")
  p.add_argument(
    "--vocab_size",
    type=int,
    default=None,
    help="real tokens, padded to a multiple of 8 (default: the quickstart world's, 291)",
  )
  p.add_argument("--iterations", type=int, default=5, help="timed iterations; the median is kept")
  p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16", "float16"),
    help="compute dtype of the matmuls; parameters stay float32",
  )
  p.add_argument(
    "--devices", type=int, default=None, help="data-parallel devices (default: all visible)"
  )
  p.add_argument(
    "--sequential",
    action="store_true",
    help="time one method after another, each state freed before the next is built",
  )
  common.add_debug_flag(p)
  return p.parse_args(argv)


def world_shapes(args: argparse.Namespace) -> tuple[int, int, int]:
  """(prompt_len, response_len, vocab_size): the flags, else the quickstart world's."""
  if None in (args.prompt_len, args.response_len, args.vocab_size):
    from rmscale.data.world import World, WorldConfig

    world = World(WorldConfig(seed=0))
    args.prompt_len = args.prompt_len or world.prompt_len
    args.response_len = args.response_len or world.response_len
    args.vocab_size = args.vocab_size or world.tokenizer.vocab_size
  return args.prompt_len, args.response_len, args.vocab_size


def model_configs(args: argparse.Namespace) -> tuple[TransformerConfig, TransformerConfig]:
  """The policy and reward model as ``rmscale.stages.roles.model_config`` builds them."""
  shared = dict(
    vocab_size=args.vocab_size,
    vocab_multiple=VOCAB_MULTIPLE,
    family=FAMILY,
    rotary_pct=ROTARY_PCT,
    max_len=args.prompt_len + args.response_len,
    dtype=args.dtype,
  )
  policy_cfg = sizes.model_config(args.policy, **shared)
  rm_cfg = sizes.model_config(args.rm, lm_head=False, reward_head=REWARD_HEAD, **shared)
  return policy_cfg, rm_cfg


def method_config(name: str, args: argparse.Namespace):
  """The method's config as its ``rmscale/methods/`` builder makes it, with EOS off."""
  s = dict(method_registry.get(name).defaults)
  if args.k is not None and "k" in s:
    s["k"] = args.k
  rollout = dict(
    rollout_batch_size=args.rollout,
    minibatch_size=args.minibatch,
    temperature=TEMPERATURE,
    max_new_tokens=args.response_len,
    eos_id=None,
    pad_id=PAD_ID,
  )
  try:
    if name == "ppo":
      return ppo.PPOConfig(
        epochs=s["epochs"],
        clip_eps=s["clip_eps"],
        value_clip=s["value_clip"],
        vf_coef=s["vf_coef"],
        gae_lambda=s["gae_lambda"],
        kl_coef=KL_COEF,
        kl_mode=s["kl_mode"],
        kl_target=s["kl_target"],
        entropy_coef=s["entropy_coef"],
        critic=args.ppo_critic or s["critic"],
        **rollout,
      )
    if name == "rejection":
      return rejection.RejectionConfig(
        k=s["k"],
        keep=s["keep"],
        keep_fraction=s["keep_fraction"],
        sft_epochs=s["sft_epochs"],
        restart=s["restart"],
        **rollout,
      )
    return pg.PGConfig(  # rmscale/methods/policy_gradient.py's builder.
      estimator=name,
      k=s.get("k", 1),
      epochs=s.get("epochs", 1),
      clip_eps=s.get("clip_eps", 0.2),
      kl_beta=s.get("kl_beta", 0.0),
      baseline_decay=s.get("baseline_decay", 0.9),
      kl_coef=KL_COEF,
      entropy_coef=s["entropy_coef"],
      **rollout,
    )
  except ValueError as e:  # Sizes that do not fit together: name the flags.
    raise UserError(f"--methods={name} with --rollout, --minibatch, --k: {e}") from None


def check_mesh(name: str, cfg, mesh) -> None:
  """The batch divisibility each step checks, up front (before any state is built)."""
  for what, rows in (
    ("--rollout", cfg.rollout_batch_size),
    ("--minibatch", cfg.minibatch_size),
    ("prompts per iteration (--rollout / k)", prompts_per_iteration(cfg)),
  ):
    mesh_lib.check_batch_divisible(rows, mesh, f"{name}: {what}")


def prompts_per_iteration(cfg) -> int:
  return getattr(cfg, "prompts_per_iteration", cfg.rollout_batch_size)


def samples_per_prompt(cfg) -> int:
  return getattr(cfg, "k", 1)


def sharded_params(cfg: TransformerConfig, key, mesh) -> dict:
  """Random parameters laid out as the pipeline loads them (``stages.common.param_shardings``)."""
  shardings = policy.model_param_shardings(cfg, mesh)
  return jax.jit(lambda k: init_params(cfg, k)[0], out_shardings=shardings)(key)


@dataclasses.dataclass
class Bench:
  """One method's step, its state and what was measured of it."""

  name: str
  cfg: object  # PPOConfig | PGConfig | RejectionConfig.
  step: Callable
  state: dict | None
  args: tuple  # (ref_params, reward_params, prompts).
  compile_s: float = 0.0
  memory: aot.StepReport | None = None
  metrics: dict | None = None
  times: dict | None = None

  def __call__(self, _i: int) -> None:
    self.state, self.metrics = self.step(self.state, *self.args)
    jax.block_until_ready((self.state, self.metrics))


def build(name: str, cfg, policy_cfg, rm_cfg, models: dict, mesh, args) -> Bench:
  """The method's state and jitted step (as its pipeline builder makes them), compiled ahead of
  time on the arrays it will be called with; the compiled program's memory."""
  rules = mesh_lib.DEFAULT_RULES
  n_updates = (args.warmup + args.iterations) * cfg.updates_per_iteration
  tx = make_optimizer(
    OptimConfig(
      learning_rate=method_registry.get(name).defaults["lr"],
      warmup_steps=min(WARMUP_STEPS, n_updates - 1),
      total_steps=n_updates,
    )
  )
  reward_fn = policy.rm_reward_fn(rm_cfg)
  key = jax.random.key(2)
  init, reward_shardings = models["init"], models["reward_shardings"]
  if name == "ppo":
    shared = cfg.critic == "shared"
    train_cfg = policy_cfg.replace(value_head=True) if shared else policy_cfg
    critic_cfg = None if shared else ppo.critic_config(policy_cfg)
    state, shardings = ppo.init_ppo_state(
      cfg, train_cfg, init, tx, key, mesh, rules, critic_cfg=critic_cfg, critic_params=init
    )
    step = ppo.make_ppo_step(
      cfg,
      train_cfg,
      reward_fn,
      tx,
      shardings,
      mesh,
      rules,
      critic_cfg=critic_cfg,
      reward_shardings=reward_shardings,
    )
  else:
    init_fn = rejection.init_rejection_state if name == "rejection" else pg.init_pg_state
    make_fn = rejection.make_rejection_step if name == "rejection" else pg.make_pg_step
    state, shardings = init_fn(cfg, policy_cfg, init, tx, key, mesh, rules)
    step = make_fn(
      cfg, policy_cfg, reward_fn, tx, shardings, mesh, rules, reward_shardings=reward_shardings
    )
  prompts = models["prompts"][: prompts_per_iteration(cfg)]
  batch = {"ids": prompts, "mask": np.ones_like(prompts, bool)}
  bench = Bench(name, cfg, step, state, (init, models["reward"], batch))

  jitted = getattr(step, "jitted", None)
  if jitted is None:
    raise RuntimeError(
      f"{name}: its step has no .jitted attribute (the jitted function), so its program's "
      "memory cannot be analysed; set step.jitted = jitted in its make_*_step"
    )
  global_batch = policy.global_batch(batch, mesh_lib.batch_sharding(mesh))
  t0 = time.perf_counter()
  with mesh_lib.sharding_context(mesh, rules):
    compiled = jitted.lower(state, init, models["reward"], global_batch).compile()
  bench.compile_s = time.perf_counter() - t0
  bench.memory = aot.report(name, args.policy, cfg.rollout_batch_size, compiled)
  return bench


def time_round_robin(fns: Sequence[Callable[[int], object]], warmup: int, repeats: int):
  """``common.time_calls`` of several functions called in turn (a, b, c, a, b, c, ...), so all see
  the same machine load; one timing dict per function."""
  times = [[] for _ in fns]

  def one_round(i):
    for fn, out in zip(fns, times):
      t0 = time.perf_counter()
      fn(i)
      out.append(time.perf_counter() - t0)

  common.time_calls(one_round, warmup, repeats)
  return [common._summary(t, warmup) for t in times]


def check_finished(bench: Bench, response_len: int) -> None:
  """Every response was ``response_len`` tokens (EOS is off) and the iteration's figures finite."""
  m = bench.metrics
  length, score = float(m["response_len"]), float(m["score_mean"])
  if length != response_len:
    raise RuntimeError(
      f"{bench.name}: responses averaged {length} tokens, expected {response_len}: the methods "
      "would not be timed on the same work"
    )
  if not math.isfinite(score):
    raise FloatingPointError(f"{bench.name}: non-finite score_mean {score}")


def make_record(bench: Bench, ppo_bench: Bench | None, policy_cfg, rm_cfg, mesh, args) -> dict:
  cfg, t, mem = bench.cfg, bench.times, bench.memory
  seq_len = args.prompt_len + args.response_len
  record = common.base_record(
    "methods", args.policy, policy_cfg, cfg.rollout_batch_size, seq_len, mesh.devices.size
  )
  rm_counts = sizes.count_params(rm_cfg)
  decodes = 2 if bench.name == "remax" else 1  # ReMax's greedy baseline response.
  ratio = None
  if ppo_bench is not None:
    ratio = {
      "time": t["median_s"] / ppo_bench.times["median_s"],
      "peak_memory": mem.peak_bytes / ppo_bench.memory.peak_bytes,
    }
  record.update(
    {
      "method": bench.name,
      "rm_size": args.rm,
      "rm_params": {"non_embedding": rm_counts["non_embedding"], "total": rm_counts["total"]},
      "prompt_len": args.prompt_len,
      "response_len": args.response_len,
      "vocab_size": policy_cfg.vocab_size,
      "padded_vocab": policy_cfg.padded_vocab,
      "rollout": cfg.rollout_batch_size,  # Sequences sampled per iteration.
      "samples_per_prompt": samples_per_prompt(cfg),
      "prompts_per_iteration": prompts_per_iteration(cfg),
      "minibatch": cfg.minibatch_size,
      "updates_per_iteration": cfg.updates_per_iteration,
      "decoded_tokens_per_iteration": decodes * cfg.rollout_batch_size * args.response_len,
      "settings": dataclasses.asdict(cfg),
      "schedule": "sequential" if args.sequential else "interleaved",
      "iterations_timed": args.iterations,
      "iteration_time_s": t["median_s"],
      "iteration_time_min_s": t["min_s"],
      "iteration_time_max_s": t["max_s"],
      "first_iteration_s": t["first_s"],  # After the AOT compile below, which it reuses.
      "compile_s": bench.compile_s,
      "memory_per_device": {
        "argument_bytes": mem.argument_bytes,
        "output_bytes": mem.output_bytes,
        "temp_bytes": mem.temp_bytes,
        "alias_bytes": mem.alias_bytes,
        "peak_bytes": mem.peak_bytes,
        "code_bytes": mem.code_bytes,
      },
      "memory_source": MEMORY_SOURCE,
      "ratio_vs_ppo": ratio,  # This method's over PPO's; None without ppo in --methods.
      "process_peak_memory_bytes": common.peak_memory_bytes(),  # Allocator, since start-up.
    }
  )
  return record


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  common.check_choices([args.policy], list(sizes.SIZES), "policy")
  common.check_choices([args.rm], list(sizes.SIZES), "rm")
  names = common.parse_list(args.methods, "methods")
  common.check_choices(names, METHODS, "methods")
  if len(set(names)) != len(names):
    raise UserError(f"--methods lists a method twice: {names}")
  names = sorted(names, key=lambda n: n != "ppo")  # PPO first: the others' ratios need it.
  for name in ("prompt_len", "response_len", "vocab_size", "k", "devices"):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
      raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
  for name in ("rollout", "minibatch", "iterations", "warmup"):
    if getattr(args, name) <= 0:
      raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
  if args.devices is not None and args.devices > len(jax.devices()):
    raise UserError(f"--devices={args.devices}: only {len(jax.devices())} devices are visible")
  world_shapes(args)
  mesh = mesh_lib.make_mesh({"data": -1}, jax.devices()[: args.devices or len(jax.devices())])
  configs = {name: method_config(name, args) for name in names}
  for name, cfg in configs.items():
    check_mesh(name, cfg, mesh)

  policy_cfg, rm_cfg = model_configs(args)
  rng = np.random.default_rng(0)
  models = {
    "init": sharded_params(policy_cfg, jax.random.key(0), mesh),
    "reward": sharded_params(rm_cfg, jax.random.key(1), mesh),
    "reward_shardings": policy.model_param_shardings(rm_cfg, mesh),
    # Real tokens, no padding (the world's prompts all have the same length).
    "prompts": rng.integers(1, args.vocab_size, (args.rollout, args.prompt_len)).astype(np.int32),
  }
  records, ppo_bench = [], None

  def finish(bench: Bench) -> None:
    nonlocal ppo_bench
    check_finished(bench, args.response_len)
    bench.state = None  # Frees the state (and lets --sequential build the next one).
    ppo_bench = bench if bench.name == "ppo" else ppo_bench
    records.append(common.emit(make_record(bench, ppo_bench, policy_cfg, rm_cfg, mesh, args)))

  with warnings.catch_warnings():
    # CPU cannot donate buffers; the steps still donate where the backend can.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    if args.sequential:
      for name in names:
        bench = build(name, configs[name], policy_cfg, rm_cfg, models, mesh, args)
        bench.times = common.time_calls(bench, args.warmup, args.iterations)
        finish(bench)
    else:
      benches = [build(n, configs[n], policy_cfg, rm_cfg, models, mesh, args) for n in names]
      for bench, times in zip(benches, time_round_robin(benches, args.warmup, args.iterations)):
        bench.times = times
        finish(bench)
  return records


if __name__ == "__main__":
  common.run(main)
