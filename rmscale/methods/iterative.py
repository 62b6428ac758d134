"""The run every iterative policy method shares: PPO, REINFORCE, ReMax, RLOO, GRPO and
rejection-sampling finetuning differ only in the jitted step a method builds (``Trainer``).

A run against one proxy starts from the initial policy, draws its training prompts from one named
stream (every method sees the same prompts in the same order), and every ``optimise.eval_every``
iterations samples the reference stage's evaluation prompts once each, measuring KL(pi || pi_init)
per sequence, the proxy in the jit, and gold and human utility on the host; each evaluation is one
record of ``rmscale.curves``, recentred by the reference. Runs resume from orbax checkpoints under
``optimise/<method>/<run>/ckpt`` and cache their records in ``records.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rmscale import curves, fs, results, rng
from rmscale.errors import UserError
from rmscale.methods.base import Method, Run
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import abstract_params
from rmscale.parallel import mesh as mesh_lib
from rmscale.stages import common, reference, roles
from rmscale.train import policy
from rmscale.train.loop import train_loop
from rmscale.train.state import OptimConfig, make_optimizer

EVAL_SAMPLES = {"initial": "initial_samples.npz", "final": "final_samples.npz"}
_EVALUATORS: dict = {}
_STEPS: dict = {}  # Runs of one shape share their compiled step (per method and proxy size).


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What an iterative method builds for one run.

  ``step(state, init_params, reward_params, prompts) -> (state, metrics)`` is one iteration on
  ``prompts_per_iteration`` prompts; ``policy_cfg`` is the trained model (e.g. the policy with PPO's
  value head) whose parameters are ``state['params']``; ``rollout`` sets how it is evaluated.
  """

  state: dict
  shardings: dict
  step: Callable
  policy_cfg: TransformerConfig
  rollout: policy.RolloutConfig
  prompts_per_iteration: int


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a method's ``build`` gets: the run context, its section, the models and the KL coefficient."""

  ctx: common.Context
  section: object
  policy_cfg: TransformerConfig  # The initial policy's architecture.
  init_params: object
  rm_cfg: TransformerConfig
  kl_coef: float

  def optimizer(self, updates_per_iteration: int, *, per_round: bool = False):
    """The method's optimizer: its ``lr``, the shared warm-up, decayed over the whole run (or, for
    a method that restarts every iteration from fresh optimizer state, over one iteration)."""
    o = self.ctx.config.optimise
    rounds = 1 if per_round else o.iterations
    optim = OptimConfig(
      learning_rate=self.section.lr,
      warmup_steps=min(o.warmup_steps, rounds * updates_per_iteration - 1),
      total_steps=rounds * updates_per_iteration,
    )
    return optim, make_optimizer(optim)

  def rollout_fields(self) -> dict:
    """The rollout options every method shares (sampling temperature, response layout)."""
    tok = self.ctx.world.tokenizer
    return dict(
      temperature=self.ctx.config.sampling.temperature,
      max_new_tokens=self.ctx.response_len,
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
    )

  def init_key(self, method: str, run: str):
    return rng.key(self.ctx.config.seed, "optimise", method, run, "init")

  def trainer(
    self,
    name: str,
    cfg,
    init_state: Callable,
    make_step: Callable,
    *,
    policy_cfg: TransformerConfig | None = None,
    per_round: bool = False,
    step_key=None,
  ) -> Trainer:
    """A method's Trainer from its config and its module's two functions, in one shape:
    ``init_state(cfg, policy_cfg, init_params, tx, rng, mesh, rules)`` and
    ``make_step(cfg, policy_cfg, reward_fn, tx, shardings, mesh, rules, *, reward_shardings)``
    (bind extra arguments with ``functools.partial``). ``policy_cfg`` is the trained model
    (default: the initial policy's); the compiled step is shared by every run of the same
    ``step_key`` (default: ``cfg``) and shapes."""
    ctx, policy_cfg = self.ctx, policy_cfg or self.policy_cfg
    optim, tx = self.optimizer(cfg.updates_per_iteration, per_round=per_round)
    state, shardings = init_state(
      cfg, policy_cfg, self.init_params, tx, self.init_key(name, "state"), ctx.mesh, ctx.rules
    )
    key = (name, step_key or cfg, policy_cfg, self.rm_cfg, optim, ctx.mesh, ctx.rules)
    if key not in _STEPS:
      _STEPS[key] = make_step(
        cfg,
        policy_cfg,
        policy.rm_reward_fn(self.rm_cfg),
        tx,
        shardings,
        ctx.mesh,
        ctx.rules,
        reward_shardings=common.param_shardings(ctx, self.rm_cfg),
      )
    return Trainer(
      state=state,
      shardings=shardings,
      step=_STEPS[key],
      policy_cfg=policy_cfg,
      rollout=cfg.rollout_config(),
      prompts_per_iteration=getattr(cfg, "prompts_per_iteration", cfg.rollout_batch_size),
    )


def evaluator(ctx: common.Context, trainer: Trainer, rm_cfg: TransformerConfig):
  """The jitted evaluator of a run's policy (cached: runs of one shape share it)."""
  key = (trainer.rollout, trainer.policy_cfg, rm_cfg, ctx.mesh, ctx.rules)
  if key not in _EVALUATORS:
    _EVALUATORS[key] = policy.make_evaluator(
      trainer.rollout,
      trainer.policy_cfg,
      trainer.shardings["params"],
      ctx.mesh,
      ctx.rules,
      reward_fn=policy.rm_reward_fn(rm_cfg),
      reward_shardings=common.param_shardings(ctx, rm_cfg),
    )
  return _EVALUATORS[key]


def save_eval_samples(path: str, samples: dict, prompt_len: int, gold_raw, utility_raw) -> None:
  """One evaluation's samples with their raw scores (prompt/response tokens and masks, gold, utility,
  proxy, KL), so a notebook can show side by side what the initial and the final policy wrote."""
  tokens, mask = np.asarray(samples["tokens"]), np.asarray(samples["mask"])
  results.write_npz(
    path,
    prompt_ids=tokens[:, :prompt_len],
    prompt_mask=mask[:, :prompt_len],
    response_ids=tokens[:, prompt_len:],
    response_mask=np.asarray(samples["response_mask"]),
    gold=np.asarray(gold_raw),
    utility=np.asarray(utility_raw),
    proxy=np.asarray(samples["score"]),
    kl=np.asarray(samples["kl"]),
  )


def settings(ctx: common.Context, section, spec: Run) -> dict:
  """What a run's results depend on (beyond the earlier stages): the shared optimise options, the
  method's section, the proxy and the KL coefficient."""
  shared = {  # Scalars and lists: the method sections and the KL study are dicts.
    k: v
    for k, v in ctx.config.optimise.to_dict().items()
    if not isinstance(v, dict) and k not in ("methods", "proxies", "log_every", "save_every")
  }
  wanted = {
    "optimise": shared,
    "method": section.to_dict(),
    "proxy": spec.proxy["name"],
    "kl_coef": spec.kl_coef,
  }
  return json.loads(json.dumps(wanted, default=str))


def _check_settings(path: str, wanted: dict) -> None:
  """A run directory is reused (resumed, or its records read back) only for the same settings."""
  if not fs.exists(path):
    results.write_json(path, wanted)
    return
  had = results.read_json(path)
  if had != wanted:
    changed = sorted(
      f"{section}.{k}"
      for section in ("optimise", "method")
      for k in set(had.get(section, {})) | set(wanted.get(section, {}))
      if had.get(section, {}).get(k) != wanted.get(section, {}).get(k)
    ) + [k for k in ("proxy", "kl_coef") if had.get(k) != wanted.get(k)]
    raise UserError(
      f"{os.path.dirname(path)} was run with other settings ({', '.join(changed)} differ); "
      "delete that directory to rerun it, or use another workdir"
    )


def runner(build: Callable[[Setup], Trainer]) -> Callable[..., list[dict]]:
  """A ``Method.run`` for an iterative method whose step ``build`` makes."""
  return functools.partial(run, build)


def programs(build: Callable[[Setup], Trainer]) -> Callable[..., list]:
  """A ``Method.programs`` for an iterative method: its one jitted iteration."""
  return functools.partial(compile_iteration, build)


def compile_iteration(
  build: Callable[[Setup], Trainer], method: Method, ctx: common.Context, section, rm_size: str
) -> list[tuple[str, int, object]]:
  """``[(label, batch, compiled)]``: the method's iteration against a proxy of ``rm_size``,
  lowered on abstract sharded inputs and compiled for ``ctx.mesh`` (nothing is allocated)."""
  policy_cfg = roles.model_config(ctx, ctx.config.policy.size, "policy")
  rm_cfg = roles.model_config(ctx, rm_size, "rm")
  held = {}

  def init(params):  # Traced by eval_shape: the state's shapes, and the Trainer with its step.
    held["trainer"] = build(
      Setup(ctx, section, policy_cfg, params, rm_cfg, ctx.config.optimise.kl_coef)
    )
    return held["trainer"].state

  abstract = lambda cfg: abstract_params(cfg)[0]  # noqa: E731
  state = jax.eval_shape(init, abstract(policy_cfg))
  trainer = held["trainer"]
  if not hasattr(trainer.step, "jitted"):
    raise ValueError(f"method {method.name!r}: its step has no .jitted program to compile")
  sharded = lambda tree, shardings: jax.tree.map(  # noqa: E731
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )
  ref_cfg = policy.reference_config(policy_cfg)
  data = mesh_lib.batch_sharding(ctx.mesh)
  rows = trainer.prompts_per_iteration
  args = (
    sharded(state, trainer.shardings),
    sharded(abstract(ref_cfg), common.param_shardings(ctx, ref_cfg)),
    sharded(abstract(rm_cfg), common.param_shardings(ctx, rm_cfg)),
    {
      "ids": jax.ShapeDtypeStruct((rows, ctx.prompt_len), jnp.int32, sharding=data),
      "mask": jax.ShapeDtypeStruct((rows, ctx.prompt_len), jnp.bool_, sharding=data),
    },
  )
  with mesh_lib.sharding_context(ctx.mesh, ctx.rules):
    compiled = trainer.step.jitted.lower(*args).compile()
  return [(f"{method.name} iteration", trainer.rollout.rollout_batch_size, compiled)]


def run(
  build: Callable[[Setup], Trainer],
  method: Method,
  ctx: common.Context,
  section,
  spec: Run,
  ref: curves.Reference,
) -> list[dict]:
  """One run of an iterative method against ``spec.proxy``; its curve's records (cached)."""
  o, seed, P = ctx.config.optimise, ctx.config.seed, ctx.prompt_len
  run_dir = ("optimise", method.name, spec.name)
  _check_settings(ctx.path(*run_dir, "settings.json"), settings(ctx, section, spec))
  done = ctx.path(*run_dir, "records.json")
  if fs.exists(done):
    return results.read_json(done)
  proxy = spec.proxy
  policy_cfg = roles.model_config(ctx, ctx.config.policy.size, "policy")
  init = common.load_params(ctx, ctx.path("policy_init", "params"), policy_cfg)
  rm_cfg = roles.model_config(ctx, proxy["rm_size"], "rm")
  rm_params = common.load_params(ctx, ctx.path("proxies", proxy["name"], "params"), rm_cfg)
  trainer = build(Setup(ctx, section, policy_cfg, init, rm_cfg, spec.kl_coef))
  evaluate_policy = evaluator(ctx, trainer, rm_cfg)
  eval_prompts = reference.prompts(ctx)
  gold = roles.gold_fn(ctx)

  def prompts(it: int) -> dict:
    p = ctx.world.sample_prompts(
      rng.numpy(seed, "optimise", "prompts", it), trainer.prompts_per_iteration, "train"
    )
    return {"ids": p["ids"], "mask": p["mask"]}

  def evaluate(state, it: int) -> dict:
    s = policy.evaluate(
      evaluate_policy,
      state["params"],
      init,
      eval_prompts["ids"],
      eval_prompts["mask"],
      rng.key(seed, "optimise", "eval"),  # The same draws at every evaluation: common noise.
      reward_params=rm_params,
    )
    gold_raw = gold(s["tokens"], s["mask"])
    util_raw = ctx.world.utility(s["tokens"][:, :P], s["tokens"][:, P:], s["response_mask"])
    last = it == o.iterations  # Samples written before that iteration's checkpoint: kept on resume.
    if it == 0 or last:
      which = "final" if last else "initial"
      save_eval_samples(ctx.path(*run_dir, EVAL_SAMPLES[which]), s, P, gold_raw, util_raw)
    if it == 0:  # The initial policy: every curve's common origin, from all reference samples.
      return curves.point(**ref.origin(proxy["name"]), length=s["length"])
    return curves.point(
      kl=s["kl_mean"],
      kl_se=s["kl_se"],
      proxy=ref.proxy_scores(proxy["name"], s["score"]),
      gold=ref.gold_scores(gold_raw),
      utility=ref.utility_scores(util_raw),
      length=s["length"],
    )

  _, history, evals = train_loop(
    trainer.state,
    trainer.shardings,
    lambda st, batch: trainer.step(st, init, rm_params, batch),
    prompts,
    o.iterations,
    ckpt_dir=ctx.path(*run_dir, "ckpt"),
    save_every=o.save_every,
    log_every=o.log_every,
    eval_every=o.eval_every,
    evaluate=evaluate,
    writer=ctx.writer,
    desc=f"{method.name}/{spec.name}",
    postfix=("score_mean", "kl_mean"),
  )
  train_by_step = {h["step"]: h for h in history}
  meta = {k: proxy[k] for k in ("rm_size", "rm_params", "data_size", "seed")}
  records = []
  for e in evals:
    it = e.pop("step")
    h = train_by_step.get(it, {})
    records.append(
      {
        "method": method.name,
        "form": method.form,
        "x": method.x,
        "name": spec.name,
        "proxy_name": proxy["name"],
        **meta,
        "kl_coef": spec.kl_coef,
        "iteration": it,
        **e,
        **{f"train_{k}": v for k, v in h.items() if k != "step"},
      }
    )
  results.write_json(done, records)
  return records
