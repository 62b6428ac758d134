"""Quickstart: the whole overoptimization experiment in miniature, on a CPU, with no downloads.

    python -m rmscale.main --config=configs/quickstart.py --workdir=runs/qs
    python -m rmscale.main --config=configs/quickstart.py:tiny --workdir=/tmp/qs   # seconds (tests)

Arguments after ``:``: ``tiny`` shrinks every stage to a seconds-scale smoke run; ``oracle`` uses the
human utility itself as the gold RM instead of training one.
"""

import ml_collections

from rmscale import methods
from rmscale.configs import parse_arg
from rmscale.parallel.mesh import DEFAULT_RULES


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, oracle=False)
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds the world's samples, every model init and every data order.
  c.stages = (
    "policy_init,gold,label,proxies,reference,optimise,fit"  # Run in order; finished ones skipped.
  )
  c.log_every = 50  # Steps between metric fetches (and NaN checks).
  c.save_every = 500  # Steps between orbax checkpoints of a training run (and always at its end).
  c.sample_batch_size = 512  # Rows per jitted sampler call.
  c.score_batch_size = 1024  # Rows per jitted RM scoring call.

  # Device mesh axis sizes; -1 takes the remaining devices.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # Logical axis -> mesh axes (see rmscale/parallel/mesh.py).
  c.rules = [list(r) for r in DEFAULT_RULES]

  # The offline world (rmscale/data/world.py: WorldConfig fields may be overridden here).
  c.world = dict(seed=0)

  c.model = ml_collections.ConfigDict()
  c.model.family = "neox"  # Architecture preset for every model: neox | llama | gpt2.
  # Fraction of each head rotated (Pythia: 0.25). Half leaves the 16-dim heads 8 position-free dims
  # to match words by content (keyword, repeats), and half to find positions.
  c.model.rotary_pct = 0.5
  c.model.reward_head = "linear"  # Reward-head type of gold and proxy RMs: linear | mlp.
  c.model.dtype = "float32"  # Compute dtype.
  c.model.param_dtype = "float32"  # Parameter storage dtype.
  c.model.matmul = "default"  # "fp8": FP8 quantised matmuls in attention and MLP.
  # Vocabulary padded to a multiple of this (291 words -> 296), so tensor axes of up to 8 split it.
  c.model.vocab_multiple = 8

  # Initial policy: SFT on the human writer's corpus.
  c.policy = ml_collections.ConfigDict()
  c.policy.size = "200k"  # Named size from rmscale/models/sizes.py.
  c.policy.num_examples = 40_000  # SFT corpus size.
  c.policy.steps = 1000  # Optimizer steps.
  c.policy.batch_size = 64
  c.policy.lr = 3e-3
  c.policy.warmup_steps = 100
  c.policy.weight_decay = 0.0

  # LMs of other sizes than the policy, trained on the SFT corpus to initialise RMs ('pretrained' init).
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_examples = 20_000
  c.pretrain.steps = 500
  c.pretrain.batch_size = 64
  c.pretrain.lr = 3e-3
  c.pretrain.warmup_steps = 50
  c.pretrain.weight_decay = 0.0

  # Gold RM: trained on comparisons labelled by the human utility, or the utility itself.
  c.gold = ml_collections.ConfigDict()
  c.gold.kind = "oracle" if a.oracle else "trained"  # trained | oracle.
  c.gold.size = "200k"
  # pretrained (from an LM of gold.size: the policy's own when equal) | scratch.
  c.gold.init = "pretrained"
  c.gold.num_comparisons = 80_000  # Human-utility comparisons to train on (each seen once).
  c.gold.eval_comparisons = 4000  # Held-out comparisons for the accuracy report.
  c.gold.steps = 2500
  c.gold.batch_size = 32  # Comparison pairs per step.
  c.gold.lr = 2e-3
  c.gold.warmup_steps = 100
  c.gold.weight_decay = 0.0
  c.gold.p_ramble = 0.3  # The raters' broader writer: rambling past the request ...
  c.gold.p_keyword_extra = 0.3  # ... keyword stuffing ...
  c.gold.p_wrong_keyword = 0.3  # ... the wrong keyword (as an untrained policy writes) ...
  c.gold.p_repeat = 0.15  # ... and repetition, so the gold RM learns where the utility turns down.

  # Comparisons: two policy samples per prompt, the gold RM picks the winner.
  c.label = ml_collections.ConfigDict()
  c.label.num_comparisons = 10_000
  c.label.val_fraction = 0.1  # Held out for proxy validation loss/accuracy (Gao et al.: 10%).
  c.label.noise = 0.0  # Probability of flipping a label (0: deterministic, as in the paper).

  # Proxy RMs: one per (size, data size, seed).
  c.proxies = ml_collections.ConfigDict()
  c.proxies.sizes = ("25k", "100k", "400k")  # Width x2 per step at fixed depth.
  c.proxies.data_sizes = (1000, 9000)
  c.proxies.seeds = (0,)
  c.proxies.init = "scratch"  # scratch | pretrained (an LM of each size trained on the SFT corpus).
  #                             Scratch keeps the CPU quickstart within minutes; Gao et al. pretrain.
  c.proxies.epochs = 2.0
  c.proxies.batch_size = 32  # Comparison pairs per step (Gao et al.: 64).
  c.proxies.lr = 1e-3
  c.proxies.warmup_steps = 20
  c.proxies.weight_decay = 0.0
  c.proxies.score_l2 = 0.0  # L2 on reward scores (Coste et al.: 1e-3).
  # The initial policy on the held-out evaluation prompts: every curve's origin (recentring), the
  # prompts every method is evaluated on, and the samples best-of-n picks from.
  c.reference = ml_collections.ConfigDict()
  c.reference.num_prompts = 128
  c.reference.samples_per_prompt = 192  # Best-of-n's n runs over a geometric grid up to this.

  # Every method of optimise.methods against every proxy (rmscale/methods/), on one gold-vs-KL axis.
  c.optimise = ml_collections.ConfigDict()
  c.optimise.methods = ("bon", "ppo")  # configs/methods.py runs every registered method.
  c.optimise.proxies = ()  # Proxy names to optimise against; () means every proxy.
  c.optimise.iterations = 20  # Iterations (one rollout each) of every iterative method.
  c.optimise.rollout_batch_size = 64  # Sequences per rollout (Gao et al.: 256).
  c.optimise.minibatch_size = 16  # Sequences per gradient step.
  c.optimise.warmup_steps = 10
  c.optimise.kl_coef = 0.0  # KL penalty in the reward (0: Gao et al.'s default).
  c.optimise.eval_every = 2  # Iterations between gold evaluations on the reference prompts.
  c.optimise.log_every = 5
  c.optimise.save_every = 10  # Iterations between checkpoints.
  # The KL study: one KL-penalised method against one proxy with fixed KL coefficients.
  c.optimise.kl_study = dict(method="ppo", proxy="25k_d1000_s0", coefs=(0.05, 0.2))
  # Each method's own section (defaults: rmscale/methods/<method>.py); lr 1e-4 is slow enough
  # that evaluations every other iteration resolve PPO's gold peak.
  c.optimise.bon = methods.sections(["bon"])["bon"]
  c.optimise.ppo = methods.sections(["ppo"])["ppo"]

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0
  c.sampling.top_p = 1.0

  c.fit = ml_collections.ConfigDict()
  c.fit.num_bootstrap = 200  # Bootstrap replicates over prompts for coefficient intervals.

  if a.tiny:
    c.log_every = 10
    c.policy.num_examples, c.policy.steps = 2000, 30
    c.gold.num_comparisons, c.gold.eval_comparisons, c.gold.steps = 1000, 256, 30
    c.label.num_comparisons = 400
    c.proxies.sizes, c.proxies.data_sizes, c.proxies.epochs = ("100k", "200k"), (100, 300), 1.0
    c.pretrain.num_examples, c.pretrain.steps = 1000, 10
    c.reference.num_prompts, c.reference.samples_per_prompt = 16, 16
    c.optimise.bon.num_n = 5
    c.optimise.iterations, c.optimise.rollout_batch_size, c.optimise.minibatch_size = 4, 16, 8
    c.optimise.eval_every, c.optimise.log_every, c.optimise.save_every = 2, 1, 2
    c.optimise.proxies = ("100k_d300_s0", "200k_d300_s0")
    c.optimise.kl_study = dict(method="ppo", proxy="100k_d300_s0", coefs=(0.1,))
    c.sample_batch_size, c.score_batch_size = 64, 128
    c.fit.num_bootstrap = 20
  return c
