"""Reward-model overoptimization on real models and data (Gao et al. 2023; Coste et al. 2024).

A Pythia policy (Coste et al.: 1.4B), proxy RMs initialised from the Pythia ladder (70M ... 1.4B),
a gold RM from a local sequence-classification checkpoint, prompts and SFT data from a real
preference dataset. Nothing is downloaded: every file is read from ``root`` (layout below).

    python -m rmscale.main --config=configs/overopt_pythia.py:root=/data --workdir=/data/runs/pythia
    python -m rmscale.main --config=configs/overopt_pythia.py:root=/data,rm=pythia-70m+pythia-410m \
        --workdir=/data/runs/pythia-2rm
    python -m rmscale.main --config=configs/overopt_pythia.py:root=/data,dataset=tldr,gold=tldr-rm \
        --workdir=/data/runs/pythia-tldr

Directory layout under ``root`` (each path is also a config field, overridable on its own):

    <root>/ckpts/pythia-70m ... pythia-1.4b   config.json, model.safetensors, tokenizer files
                                              (huggingface-cli download EleutherAI/pythia-70m
                                               --include "*.json" "*.safetensors"
                                               --local-dir <root>/ckpts/pythia-70m)
    <root>/ckpts/<gold>                       a *ForSequenceClassification RM (GPT-NeoX, Llama or
                                              GPT-2) with num_labels=1; its tokenizer files too
                                              when it is not Pythia's (see gold.tokenizer_dir)
    <root>/raw/<dataset>/                     the published files (see preference_formats.py)
    <root>/tfds/                              the array_record datasets, built on first use

Arguments after ``:`` (comma-separated; lists joined with ``+``):
  root     base directory of checkpoints and data (default ``/data``).
  policy   policy checkpoint under <root>/ckpts (default ``pythia-1.4b``).
  rm       proxy sizes: checkpoint names under <root>/ckpts, ``+``-joined, or ``all`` (the ladder).
  gold     gold RM checkpoint under <root>/ckpts (default ``gold-rm``).
  dataset  hh_rlhf | tldr | ultrafeedback | unified_feedback (default ``hh_rlhf``).
  data     comparisons per proxy: ``46k``, ``2k+8k+46k``, or ``all``.
  seeds    number of proxy seeds.
  methods  alignment methods to run, ``+``-joined (default ``bon+ppo``, METHODS; ``all`` too).
  sft      SFT the policy on the dataset's chosen responses first (default True; False for an
           already fine-tuned policy checkpoint).
  shrink   seconds-scale run on tiny checkpoints (the tests): every stage, a few steps and prompts.

Steps and learning rates are starting points at the papers' scale, not tuned values.
"""

import os

import ml_collections

from rmscale import methods
from rmscale.configs import parse_arg, parse_count, parse_list
from rmscale.parallel.mesh import DEFAULT_RULES

LADDER = ("pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b")
DATA_LADDER = (2_000, 4_000, 8_000, 16_000, 32_000, 46_000)  # Coste et al. train on ~46k pairs.
# The alignment methods run by default (and by ``methods=all``), each registered in rmscale/methods/.
# Adding one (reinforce, remax, rloo, grpo, rejection, once registered) is one more name here, and
# its values at this scale in SECTIONS where its defaults do not fit.
METHODS = ("bon", "ppo")
# Each method's own section at this scale, over its defaults (rmscale/methods/<name>.py).
SECTIONS = {
  "bon": dict(
    num_n=16
  ),  # Points on the geometric grid of n from 1 to reference.samples_per_prompt.
  "ppo": dict(
    lr=1e-6,
    epochs=4,  # Passes over each rollout.
    clip_eps=0.2,
    value_clip=0.2,
    vf_coef=0.1,
    gae_lambda=0.95,
    entropy_coef=0.0,
    critic="shared",  # shared (value head on the policy) | separate.
    kl_mode="fixed",  # fixed | adaptive.
    kl_target=6.0,
  ),
}
# ... and under ``shrink``: enough movement in PPO's 4 updates (2 iterations x 2 epochs) for a
# KL > 0 to fit.
SHRINK_SECTIONS = {"bon": dict(num_n=3), "ppo": dict(epochs=2, lr=1e-2)}


def _count(text) -> int:
  return parse_count(text, "overopt_pythia")


def get_config(arg=None):
  a = parse_arg(
    arg,
    root="/data",
    policy="pythia-1.4b",
    rm="all",
    gold="gold-rm",
    dataset="hh_rlhf",
    data="all",
    seeds=1,
    methods="+".join(METHODS),
    sft=True,
    shrink=False,
  )
  ckpts = os.path.join(a.root, "ckpts")
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds every model init, sample and data order.
  # Stages to run, in order; finished ones are skipped.
  c.stages = "policy_init,gold,label,proxies,reference,optimise,fit"
  c.log_every = 50  # Steps between metric fetches (and NaN checks).
  c.save_every = 500  # Steps between orbax checkpoints of a training run.
  c.sample_batch_size = 256  # Rows per jitted sampler call; divisible by mesh data x fsdp.
  c.score_batch_size = 256  # Rows per jitted RM scoring call; divisible by mesh data x fsdp.

  c.mesh = dict(data=1, fsdp=-1, tensor=1)  # Fully sharded: the policy's Adam state needs it.
  # Logical axis -> mesh axes (rmscale/parallel/mesh.py).
  c.rules = [list(r) for r in DEFAULT_RULES]
  c.world = dict(seed=0)  # Unused with real data; kept so every config has the same sections.

  # Prompts, SFT data and held-out human labels: a preference dataset (rmscale/data/preferences.py).
  c.data = ml_collections.ConfigDict()
  c.data.kind = "preferences"  # preferences | world (the offline world of configs/quickstart.py).
  c.data.dataset = a.dataset  # hh_rlhf | tldr | ultrafeedback | unified_feedback.
  c.data.manual_dir = os.path.join(a.root, "raw", a.dataset)  # The published files, as downloaded.
  c.data.data_dir = os.path.join(a.root, "tfds")  # Built array_record datasets (written once).
  # The policy's tokenizer (all Pythia sizes share one).
  c.data.tokenizer_dir = os.path.join(ckpts, a.policy)
  c.data.prompt_len = 256  # Prompt tokens (left-padded); longer prompts are dropped (see truncate).
  c.data.response_len = 128  # Response tokens including EOS (Coste et al.: up to 128 new tokens).
  # True: cut long prompts (from the start) and responses (from the end) instead of dropping them.
  c.data.truncate = False
  c.data.max_prompts = 0  # Records read per split for prompts (0: all).

  c.model = ml_collections.ConfigDict()
  c.model.family = "neox"  # Ladder models only; checkpoints bring their own architecture.
  c.model.rotary_pct = 0.25  # Ladder models only (Pythia's value).
  c.model.reward_head = "linear"  # Head added to each proxy LM: linear | mlp.
  c.model.dtype = "bfloat16"  # Compute dtype (softmax, norms and losses stay float32).
  c.model.param_dtype = "float32"  # Parameter dtype (master weights for Adam).
  c.model.matmul = "default"  # "fp8": FP8 quantised matmuls in attention and MLP.
  # Ladder models' vocabulary padded to a multiple of this (checkpoints keep their own).
  c.model.vocab_multiple = 128

  # The policy: a local Hugging Face causal LM, SFT'd on the dataset's chosen responses (optional).
  c.policy = ml_collections.ConfigDict()
  c.policy.size = a.policy  # A name for results and plots; the shape comes from hf_dir.
  c.policy.hf_dir = os.path.join(ckpts, a.policy)  # config.json + model.safetensors (+ tokenizer).
  c.policy.sft = bool(a.sft)  # SFT before the experiment (False: use hf_dir as the initial policy).
  c.policy.num_examples = 100_000  # SFT (prompt, chosen response) pairs drawn from the train split.
  c.policy.steps = 2_000  # SFT optimizer steps.
  c.policy.batch_size = 64
  c.policy.lr = 1e-5
  c.policy.warmup_steps = 100
  c.policy.weight_decay = 0.0

  # Ladder LMs for 'pretrained' RM init (unused: proxies start from checkpoints, gold is given).
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_examples = 1_000
  c.pretrain.steps = 100
  c.pretrain.batch_size = 64
  c.pretrain.lr = 1e-5
  c.pretrain.warmup_steps = 10
  c.pretrain.weight_decay = 0.0

  # Gold RM: a local *ForSequenceClassification checkpoint; scored against the dataset's held-out
  # human labels in stage gold (as a sanity check of the judge).
  c.gold = ml_collections.ConfigDict()
  c.gold.kind = "hf"  # hf (with real data) | trained | oracle (offline world only).
  c.gold.size = a.gold  # A name for results.
  c.gold.hf_dir = os.path.join(ckpts, a.gold)  # The gold RM checkpoint.
  # "": the policy's tokenizer. Else the gold's own tokenizer directory: samples reach it as text.
  c.gold.tokenizer_dir = ""
  c.gold.prompt_len = 0  # Gold prompt tokens when it has its own tokenizer (0: data.prompt_len).
  # Gold response tokens when it has its own tokenizer (0: data.response_len).
  c.gold.response_len = 0
  c.gold.eval_comparisons = 2_000  # Held-out dataset comparisons the gold RM is measured on.
  c.gold.init = "scratch"  # Unused with kind 'hf'.
  c.gold.num_comparisons = 0  # Unused with kind 'hf'.
  c.gold.steps = 0  # Unused with kind 'hf'.
  c.gold.batch_size = 64  # Unused with kind 'hf'.
  c.gold.lr = 0.0  # Unused with kind 'hf'.
  c.gold.warmup_steps = 0  # Unused with kind 'hf'.
  c.gold.weight_decay = 0.0  # Unused with kind 'hf'.

  # Comparisons: two policy samples per train prompt, the gold RM picks the winner.
  c.label = ml_collections.ConfigDict()
  c.label.num_comparisons = 51_200  # 46k for training after the 10% hold-out, as Coste et al.
  c.label.val_fraction = 0.1  # Held out for proxy validation loss/accuracy.
  c.label.noise = 0.0  # Label flip probability (Coste et al. also study 0.25).

  # Proxy RMs: one per (size, data size, seed), each from the Pythia LM of its size.
  c.proxies = ml_collections.ConfigDict()
  c.proxies.sizes = parse_list(a.rm, LADDER, str)  # Checkpoint names under <root>/ckpts.
  c.proxies.data_sizes = parse_list(a.data, DATA_LADDER, _count)  # Training comparisons per proxy.
  c.proxies.seeds = tuple(range(a.seeds))
  c.proxies.init = "hf"  # hf (from hf_dir_template) | pretrained | scratch.
  c.proxies.hf_dir_template = os.path.join(ckpts, "{size}")  # {size}: a name in proxies.sizes.
  c.proxies.epochs = 1.0  # Gao et al.: one epoch.
  c.proxies.batch_size = 64  # Comparison pairs per step (Gao et al.: 64).
  c.proxies.lr = 1e-5
  c.proxies.warmup_steps = 50
  c.proxies.weight_decay = 0.0
  c.proxies.score_l2 = 0.0  # L2 on reward scores (Coste et al.: 1e-3 in their ensembles).

  # The initial policy on held-out (test-split) prompts: every curve's origin (recentring), the
  # prompts every method is evaluated on, and the samples best-of-n picks from. 512 prompts cover
  # both what best-of-n used (500) and what each PPO evaluation sampled (512).
  c.reference = ml_collections.ConfigDict()
  c.reference.num_prompts = 512
  c.reference.samples_per_prompt = 1_024  # Best-of-n's n runs over a geometric grid up to this.

  # Every method of optimise.methods against every proxy (rmscale/methods/), gold-evaluated along
  # the KL axis (Gao et al. Table 1 settings for PPO).
  c.optimise = ml_collections.ConfigDict()
  c.optimise.methods = parse_list(a.methods, METHODS, str)
  c.optimise.proxies = ()  # Proxy names to optimise against; () means every proxy.
  c.optimise.iterations = 500  # Iterations (one rollout each) of every iterative method.
  c.optimise.rollout_batch_size = 256
  c.optimise.minibatch_size = 64
  c.optimise.warmup_steps = 20
  c.optimise.kl_coef = 0.0  # KL penalty per token (Gao et al.: 0).
  c.optimise.eval_every = 25  # Iterations between gold evaluations on the reference prompts.
  c.optimise.log_every = 5
  c.optimise.save_every = 25
  # The KL-penalty study: one KL-penalised method (e.g. "ppo"; "" skips it) against one proxy name
  # with fixed KL coefficients, compared with optimise.kl_coef.
  c.optimise.kl_study = dict(method="", proxy="", coefs=(0.01, 0.05))
  for name in c.optimise.methods:  # Each method's defaults under its values at this scale.
    c.optimise[name] = {**methods.sections([name])[name], **SECTIONS.get(name, {})}

  c.sampling = ml_collections.ConfigDict()
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0
  c.sampling.top_p = 1.0

  c.fit = ml_collections.ConfigDict()
  c.fit.num_bootstrap = 1_000  # Bootstrap replicates over prompts for coefficient intervals.

  if a.shrink:  # Every stage, seconds-scale, on tiny checkpoints (tests/test_real_pipeline.py).
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.model.dtype = "float32"
    c.log_every, c.save_every = 1, 100
    c.sample_batch_size, c.score_batch_size = 32, 32
    c.data.prompt_len, c.data.response_len = 16, 8
    c.policy.num_examples, c.policy.steps, c.policy.batch_size = 32, 2, 8
    c.policy.lr, c.policy.warmup_steps = 1e-3, 1
    c.gold.eval_comparisons = 16
    c.label.num_comparisons, c.label.val_fraction = 64, 0.25
    c.proxies.data_sizes = (48,)
    c.proxies.batch_size, c.proxies.lr, c.proxies.warmup_steps = 8, 1e-3, 1
    # 8 prompts: what best-of-n (4) and each PPO evaluation (8) used before the reference stage.
    c.reference.num_prompts, c.reference.samples_per_prompt = 8, 8
    for name, values in SHRINK_SECTIONS.items():
      if name in c.optimise.methods:
        c.optimise[name].update(values)
    c.optimise.iterations, c.optimise.rollout_batch_size, c.optimise.minibatch_size = 2, 8, 8
    c.optimise.warmup_steps = 0  # With SHRINK_SECTIONS' lr, the 4 updates move the policy.
    c.optimise.eval_every, c.optimise.log_every, c.optimise.save_every = 1, 1, 1
    # One proxy: each iterative method's compiled step dominates the run time (every method of
    # optimise.methods runs against it, best-of-n too).
    c.optimise.proxies = (f"{c.proxies.sizes[0]}_d48_s0",)
    c.fit.num_bootstrap = 5
  return c
