"""Gao, Schulman & Hilton (2023) at real scale: 1.2B policy, ~7B gold RM, proxies over the 3M-3B ladder.

    python -m rmscale.main --config=configs/overopt.py:rm=85m,data=90k --workdir=/mnt/shared/overopt/rm85m
    python -m rmscale.main --config=configs/overopt.py:rm=all,data=90k,seeds=3 --workdir=...
    python -m rmscale.aot --config=configs/overopt.py:rm=3b        # per-device memory first
    python -m launch.sweep --config=configs/sweeps/rm_size.py --target=tpu --dry_run

Arguments after ``:`` (comma-separated; lists joined with ``+``):
  rm      proxy RM size(s): a ladder name (``85m``), ``3m+85m+3b``, or ``all`` (3m ... 3b).
  data    training comparisons per proxy: ``90k``, ``2k+8k+90k``, or ``all`` (2k ... 90k).
  seeds   number of proxy seeds (0 .. seeds-1).
  gold    gold RM size (default ``pythia-6.9b``: the GPT-NeoX shape of Pythia 6.9B, like Gao's 6B gold).
  policy  policy size (default ``1.2b``, Gao's policy; ``3b`` for a larger-policy study).
  n       the initial policy's samples per reference prompt: best-of-n's largest n (``10k``).
  methods alignment methods to run, ``+``-joined (default ``bon+ppo``; ``all``: every registered one).
  runlocal  the same protocol shrunk to CPU sizes (seconds-scale compiles and runs; tests, AOT smoke).

The world is the offline one (rmscale/data/world.py), so nothing is downloaded; only the scale of
models and data follows the paper. Steps and learning rates are starting points, not tuned values.
"""

import ml_collections

from rmscale import methods
from rmscale.configs import parse_arg, parse_count, parse_list
from rmscale.parallel.mesh import DEFAULT_RULES

LADDER = ("3m", "12m", "25m", "42m", "85m", "300m", "680m", "1.2b", "3b")  # Gao et al.'s proxies.
# Below ~2k comparisons, RMs are near chance.
DATA_LADDER = (2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 90_000)
# Every registered method (``methods=all``; rmscale/methods/) and the ones run by default: Gao et
# al.'s two. A new method needs its real-scale values in SECTIONS where its defaults are CPU-scale.
METHODS = tuple(methods.REGISTRY)
DEFAULT_METHODS = ("bon", "ppo")
# Real-scale values of each method's own section, over its defaults (rmscale/methods/<name>.py).
SECTIONS = {
  "bon": dict(
    num_n=20
  ),  # Points on the geometric grid of n from 1 to reference.samples_per_prompt.
  "ppo": dict(
    lr=3e-6,
    epochs=4,  # Passes over each rollout.
    clip_eps=0.2,  # Gao: 0.2.
    value_clip=0.2,
    vf_coef=0.1,
    gae_lambda=0.95,  # Gao: 0.95.
    entropy_coef=0.0,
    critic="shared",  # shared (value head on the policy) | separate (own model from the policy).
    kl_mode="fixed",  # fixed | adaptive (then optimise.kl_coef is the start and kl_target the aim).
    kl_target=6.0,
  ),
  # One on-policy pass of 4 minibatches per rollout (PPO: 16 updates), hence a larger lr.
  "reinforce": dict(lr=1e-5, baseline_decay=0.9),
  "remax": dict(lr=1e-5),
  "rloo": dict(lr=1e-5, k=4),  # Ahmadian et al.: k = 4.
  "grpo": dict(lr=1e-5, k=4, epochs=2, clip_eps=0.2, kl_beta=0.04),  # Shao et al.: beta 0.04.
  "rejection": dict(lr=1e-5, k=4, keep="best", sft_epochs=1, restart=False),  # Llama 2.
}
# ... and their CPU-sized values under ``runlocal``.
RUNLOCAL_SECTIONS = {
  "bon": dict(num_n=5),
  **{m: dict(lr=1e-3) for m in ("ppo", "reinforce", "remax", "rloo", "grpo", "rejection")},
  **{m: dict(lr=1e-3, k=2) for m in ("rloo", "grpo", "rejection")},  # 16 sequences: 8 prompts.
}


def _count(text) -> int:
  return parse_count(text, "overopt")


def get_config(arg=None):
  a = parse_arg(
    arg,
    rm="85m",
    data="90k",
    seeds=1,
    gold="pythia-6.9b",
    policy="1.2b",
    n="10k",
    methods="+".join(DEFAULT_METHODS),
    runlocal=False,
  )
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds the world's samples, every model init and every data order.
  # Stages to run, in order; finished ones are skipped.
  c.stages = "policy_init,gold,label,proxies,reference,optimise,fit"
  c.log_every = 100  # Steps between metric fetches (and NaN checks).
  c.save_every = 1000  # Steps between orbax checkpoints (a preempted pod loses at most this much).
  c.sample_batch_size = 1024  # Rows per jitted sampler call; divisible by mesh data x fsdp.
  c.score_batch_size = 1024  # Rows per jitted RM scoring call; divisible by mesh data x fsdp.

  # Fully sharded data parallel: the 7B gold RM's parameters and Adam moments (~16 bytes/param) do
  # not fit one device. Batches must divide by data x fsdp: beyond 64 devices (RM batch 64) set
  # tensor > 1, e.g. --config.mesh.tensor=4 on 256 chips.
  c.mesh = dict(
    data=1, fsdp=-1, tensor=1
  )  # Device mesh axis sizes; -1 takes the remaining devices.
  # Logical axis -> mesh axes (see rmscale/parallel/mesh.py). The world's 291-token vocabulary is not
  # divisible by a tensor axis and too small to be worth sharding: vocab dimensions stay replicated.
  c.rules = [
    [name, None if name in ("vocab", "act_vocab") else axes] for name, axes in DEFAULT_RULES
  ]

  # The offline world (rmscale/data/world.py: WorldConfig fields may be overridden here).
  c.world = dict(seed=0)

  c.model = ml_collections.ConfigDict()
  # Architecture preset for every model: neox | llama | gpt2 (Gao: GPT-style).
  c.model.family = "neox"
  c.model.rotary_pct = 0.25  # Fraction of each head rotated (Pythia: 0.25).
  c.model.reward_head = "linear"  # Reward-head type of gold and proxy RMs: linear | mlp.
  c.model.dtype = "bfloat16"  # Compute dtype (softmax, norms and losses stay float32).
  c.model.param_dtype = "float32"  # Parameter storage dtype (master weights for Adam).
  c.model.matmul = "default"  # "fp8": FP8 quantised matmuls in attention and MLP.
  # Vocabulary padded to a multiple of this: lane-aligned and divisible by any tensor axis.
  c.model.vocab_multiple = 128

  # Initial policy: SFT on the human writer's corpus (Gao: a 1.2B SFT policy).
  c.policy = ml_collections.ConfigDict()
  c.policy.size = a.policy  # Named size from rmscale/models/sizes.py.
  c.policy.num_examples = 400_000  # SFT corpus size.
  c.policy.steps = 10_000  # Optimizer steps (~6 epochs at batch 256).
  c.policy.batch_size = 256
  c.policy.lr = 3e-4
  c.policy.warmup_steps = 500
  c.policy.weight_decay = 0.0

  # LMs of other sizes than the policy, trained on the SFT corpus to initialise RMs ('pretrained' init):
  # the gold RM's and each proxy size's, each trained once per workdir.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_examples = 400_000
  c.pretrain.steps = 5_000
  c.pretrain.batch_size = 256
  c.pretrain.lr = 3e-4
  c.pretrain.warmup_steps = 250
  c.pretrain.weight_decay = 0.0

  # Gold RM (Gao: 6B, trained on human comparisons); here on comparisons labelled by the utility.
  c.gold = ml_collections.ConfigDict()
  c.gold.kind = "trained"  # trained | oracle (the utility itself; skips the 7B model).
  c.gold.size = a.gold
  c.gold.init = "pretrained"  # pretrained (from an LM of gold.size) | scratch.
  c.gold.num_comparisons = 400_000  # Human-utility comparisons to train on.
  c.gold.eval_comparisons = 20_000  # Held-out comparisons for the accuracy report.
  c.gold.steps = 6_000  # ~2 epochs at batch 128.
  c.gold.batch_size = 128  # Comparison pairs per step.
  c.gold.lr = 1e-4
  c.gold.warmup_steps = 300
  c.gold.weight_decay = 0.0
  c.gold.p_ramble = 0.3  # The raters' broader writer: rambling past the request ...
  c.gold.p_keyword_extra = 0.3  # ... keyword stuffing ...
  c.gold.p_wrong_keyword = 0.3  # ... the wrong keyword (as an untrained policy writes) ...
  c.gold.p_repeat = 0.15  # ... and repetition, so the gold RM learns where the utility turns down.

  # Comparisons: two policy samples per prompt, the gold RM picks the winner (Gao: 100k, 10% held out).
  c.label = ml_collections.ConfigDict()
  c.label.num_comparisons = 100_000
  # Held out for proxy validation loss/accuracy: 90k remain for training.
  c.label.val_fraction = 0.1
  c.label.noise = 0.0  # Probability of flipping a label (0: deterministic, as in the paper).

  # Proxy RMs: one per (size, data size, seed), each initialised from a pretrained LM of its size.
  c.proxies = ml_collections.ConfigDict()
  # Tuples, not lists: ml_collections can override tuples from the command line (--config.proxies.sizes='("3m",)').
  c.proxies.sizes = parse_list(a.rm, LADDER, str)
  c.proxies.data_sizes = parse_list(a.data, DATA_LADDER, _count)
  c.proxies.seeds = tuple(range(a.seeds))
  c.proxies.init = "pretrained"  # scratch | pretrained (Gao: every RM starts from a pretrained LM).
  c.proxies.epochs = 1.0  # Gao: one epoch (more overfits, see reference section 1).
  c.proxies.batch_size = 64  # Comparison pairs per step (Gao: 64).
  c.proxies.lr = 1e-4
  c.proxies.warmup_steps = 50
  c.proxies.weight_decay = 0.0
  c.proxies.score_l2 = 0.0  # L2 on reward scores (Coste et al.: 1e-3).

  # The initial policy on held-out prompts: every curve's origin (recentring), the prompts every
  # method is evaluated on, and the samples best-of-n picks from (Gao fitted n <= 1000 and checked
  # up to 60,000). 1024 prompts cover both what best-of-n used (1000) and what each PPO evaluation
  # sampled (1024, four rollout batches of 256).
  c.reference = ml_collections.ConfigDict()
  c.reference.num_prompts = 1024
  c.reference.samples_per_prompt = _count(a.n)  # Best-of-n's n runs over a geometric grid up to N.

  # Every method of optimise.methods against every proxy (rmscale/methods/), gold-evaluated along
  # the KL axis (Gao et al. Table 1 for PPO).
  c.optimise = ml_collections.ConfigDict()
  c.optimise.methods = parse_list(a.methods, METHODS, str)
  c.optimise.proxies = ()  # Proxy names to optimise against; () means every proxy.
  # Iterations (one rollout each) of every iterative method per proxy; RL spends far more KL than BoN.
  c.optimise.iterations = 2000
  c.optimise.rollout_batch_size = 256  # Prompts per rollout (Gao: RL batch 256).
  # Gao: 128 minibatches per epoch; 64 rows keep every data-parallel device busy.
  c.optimise.minibatch_size = 64
  c.optimise.warmup_steps = 20
  c.optimise.kl_coef = 0.0  # KL penalty per token (Gao: 0 except in the KL-penalty study).
  c.optimise.eval_every = 50  # Iterations between gold evaluations on the reference prompts.
  c.optimise.log_every = 10
  c.optimise.save_every = 50  # Iterations between checkpoints.
  # The KL-penalty study: one KL-penalised method (e.g. "ppo"; "" skips it) against one proxy (e.g.
  # "85m_d90000_s0") with fixed KL coefficients, compared with optimise.kl_coef.
  c.optimise.kl_study = dict(method="", proxy="", coefs=(0.01, 0.05))
  for name in c.optimise.methods:  # Each method's defaults under its real-scale values.
    c.optimise[name] = {**methods.sections([name])[name], **SECTIONS.get(name, {})}

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0
  c.sampling.top_p = 1.0

  c.fit = ml_collections.ConfigDict()
  c.fit.num_bootstrap = 1000  # Bootstrap replicates over prompts for coefficient intervals.

  if a.runlocal:  # Same stages and structure, CPU-sized: model sizes map down the tiny ladder.
    tiny = dict(zip(LADDER, ("100k", "200k", "400k", "800k", "1.6m") + ("1.6m",) * 4))
    c.model.dtype = "float32"
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every, c.save_every = 10, 100
    c.policy.size, c.gold.size = "200k", "400k"
    c.proxies.sizes = tuple(dict.fromkeys(tiny.get(s, s) for s in c.proxies.sizes))
    c.policy.num_examples, c.policy.steps, c.policy.batch_size, c.policy.warmup_steps = (
      2000,
      30,
      64,
      5,
    )
    c.gold.num_comparisons, c.gold.eval_comparisons, c.gold.steps, c.gold.batch_size = (
      1000,
      256,
      30,
      32,
    )
    c.gold.warmup_steps = 5
    c.label.num_comparisons = 1000
    c.proxies.data_sizes = tuple(
      dict.fromkeys(max(1, d * 900 // 90_000) for d in c.proxies.data_sizes)
    )
    c.proxies.batch_size, c.proxies.warmup_steps = 32, 5
    c.pretrain.num_examples, c.pretrain.steps, c.pretrain.batch_size, c.pretrain.warmup_steps = (
      1000,
      10,
      64,
      2,
    )
    # 16 prompts: what best-of-n (8) and each PPO evaluation (16) used before the reference stage.
    c.reference.num_prompts, c.reference.samples_per_prompt = 16, 16
    for name, values in RUNLOCAL_SECTIONS.items():
      if name in c.optimise.methods:
        c.optimise[name].update(values)
    c.optimise.iterations, c.optimise.rollout_batch_size, c.optimise.minibatch_size = 4, 16, 8
    c.optimise.eval_every, c.optimise.log_every, c.optimise.save_every = 2, 1, 2
    c.sample_batch_size, c.score_batch_size = 64, 128
    c.fit.num_bootstrap = 20
  return c
