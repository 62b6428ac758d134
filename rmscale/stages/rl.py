"""Stage ``rl``: PPO against every proxy, with gold evaluation along the KL axis, and the KL-penalty study.

Each run is a resumable unit under ``rl/<name>/`` (orbax checkpoints every ``rl.save_every``
iterations); its evaluation records, taken every ``rl.eval_every`` iterations on a fixed set of
held-out prompts, are recentred exactly like best-of-n (gold and utility: mean 0 and unit variance
under the initial policy; proxy: mean 0), using the initial policy's scores from the ``bon`` stage,
so RL and best-of-n curves share axes. The KL-penalty study reruns one proxy with several fixed KL
coefficients (Gao et al. find the penalty acts like early stopping rather than moving the frontier).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from rmscale import checks, fs, results
from rmscale.errors import UserError
from rmscale.rl_losses import mean_and_se
from rmscale.stages import bon_stage, common, proxies
from rmscale.train import ppo
from rmscale.train.state import OptimConfig, make_optimizer

RESULTS = ("results", "rl.jsonl")
_PROGRAMS: dict = {}  # (configs, mesh, rules) -> (jitted PPO step, jitted evaluator).
STUDY = ("results", "rl_kl_study.jsonl")
EVAL_SAMPLES = {"initial": "initial_samples.npz", "final": "final_samples.npz"}  # Under rl/<name>/.


def validate(config, devices: int) -> None:
  """config.rl: batches that split over the devices and divide each other, PPO's hyper-parameters,
  the KL options, and proxies that this config trains."""
  for key in ("rollout_batch_size", "minibatch_size", "eval_prompts"):
    checks.divisible(config, f"rl.{key}", devices)
  r = config.rl
  if r.rollout_batch_size % r.minibatch_size:
    checks.fail("rl.minibatch_size", r.minibatch_size, "does not divide rl.rollout_batch_size")
  if r.eval_prompts % r.rollout_batch_size:
    checks.fail("rl.eval_prompts", r.eval_prompts, "is not a multiple of rl.rollout_batch_size")
  checks.optimizer(config, "rl", steps_key="iterations")
  for key in ("epochs", "eval_every", "log_every", "save_every"):
    checks.count(config, f"rl.{key}")
  for key in ("clip_eps", "value_clip", "kl_target"):
    checks.positive(config, f"rl.{key}")
  for key in ("vf_coef", "entropy_coef", "kl_coef"):
    checks.non_negative(config, f"rl.{key}")
  checks.in_range(config, "rl.gae_lambda", 0.0, 1.0, closed_hi=True)
  checks.one_of(config, "rl.kl_mode", ("fixed", "adaptive"))
  checks.one_of(config, "rl.critic", ("shared", "separate"))
  known = proxies.names(config)
  unknown = [n for n in r.proxies if n not in known]
  if unknown:
    raise UserError(
      f"config.rl.proxies names {unknown}, which are not proxies of this config: {sorted(known)}"
    )
  if r.kl_study_proxy and r.kl_study_proxy not in known:
    checks.fail("rl.kl_study_proxy", r.kl_study_proxy, f"is not one of the proxies {sorted(known)}")
  for coef in r.kl_study_coefs:
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
      raise UserError(f"config.rl.kl_study_coefs has {coef!r}; coefficients must be >= 0")


def reference_scores(ctx: common.Context) -> dict:
  """The initial policy's score statistics from the best-of-n samples (the recentring origin)."""
  path = ctx.path(*bon_stage.SAMPLES)
  if not fs.exists(path):
    raise fs.MissingFileError(
      f"stage rl recentres scores with the initial policy's samples in {path}; "
      "run the bon stage first"
    )
  data = results.read_npz(path)
  proxy_mean = {str(n): float(p.mean()) for n, p in zip(data["proxy_names"], data["proxy"])}
  return {
    "gold": (float(data["gold"].mean()), float(data["gold"].std())),
    "utility": (float(data["utility"].mean()), float(data["utility"].std())),
    "proxy": proxy_mean,
  }


def ppo_config(ctx: common.Context, kl_coef: float) -> ppo.PPOConfig:
  r, tok = ctx.config.rl, ctx.world.tokenizer
  return ppo.PPOConfig(
    rollout_batch_size=r.rollout_batch_size,
    minibatch_size=r.minibatch_size,
    epochs=r.epochs,
    clip_eps=r.clip_eps,
    value_clip=r.value_clip,
    vf_coef=r.vf_coef,
    gae_lambda=r.gae_lambda,
    kl_coef=kl_coef,
    kl_mode=r.kl_mode,
    kl_target=r.kl_target,
    entropy_coef=r.entropy_coef,
    critic=r.critic,
    temperature=ctx.config.sampling.temperature,
    max_new_tokens=ctx.response_len,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
  )


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


def run_one(
  ctx: common.Context, proxy: dict, kl_coef: float, name: str, gold, reference: dict
) -> list[dict]:
  """One PPO run against ``proxy``; returns its evaluation records (cached in ``rl/<name>/``)."""
  r, seed = ctx.config.rl, ctx.config.seed
  done = ctx.path("rl", name, "records.json")
  if fs.exists(done):
    return results.read_json(done)
  cfg = ppo_config(ctx, kl_coef)
  policy_cfg = common.model_config(ctx, ctx.config.policy.size, "policy")
  init = common.load_params(ctx, ctx.path("policy_init", "params"), policy_cfg)
  train_cfg = policy_cfg.replace(value_head=True) if cfg.critic == "shared" else policy_cfg
  critic_cfg = ppo.critic_config(policy_cfg) if cfg.critic == "separate" else None
  optim = OptimConfig(
    learning_rate=r.lr,
    warmup_steps=r.warmup_steps,
    total_steps=r.iterations * cfg.updates_per_iteration,
  )
  tx = make_optimizer(optim)
  state, shardings = ppo.init_ppo_state(
    cfg,
    train_cfg,
    init,
    tx,
    jax.random.key(seed + 30),
    ctx.mesh,
    ctx.rules,
    critic_cfg=critic_cfg,
    critic_params=init,
  )
  rm_cfg = common.model_config(ctx, proxy["rm_size"], "rm")
  rm_params = common.load_params(ctx, ctx.path("proxies", proxy["name"], "params"), rm_cfg)
  # kl_coef only seeds the state's coefficient (init_ppo_state), so the KL-penalty study's runs
  # share the compiled programs too.
  cfg_key = tuple(
    (f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "kl_coef"
  )
  key = (cfg_key, train_cfg, critic_cfg, rm_cfg, optim, ctx.mesh, ctx.rules)
  if key not in _PROGRAMS:  # Runs against proxies of one size share their compiled programs.
    reward_fn = ppo.rm_reward_fn(rm_cfg)
    rm_shardings = common.param_shardings(ctx, rm_cfg)
    _PROGRAMS[key] = (
      ppo.make_ppo_step(
        cfg,
        train_cfg,
        reward_fn,
        tx,
        shardings,
        ctx.mesh,
        ctx.rules,
        critic_cfg=critic_cfg,
        reward_shardings=rm_shardings,
      ),
      ppo.make_evaluator(
        cfg,
        train_cfg,
        shardings["params"],
        ctx.mesh,
        ctx.rules,
        reward_fn=reward_fn,
        reward_shardings=rm_shardings,
      ),
    )
  step, evaluator = _PROGRAMS[key]
  eval_prompts = ctx.world.sample_prompts(np.random.default_rng(seed + 31), r.eval_prompts, "eval")
  P = ctx.prompt_len

  def prompt_fn(it: int) -> dict:
    p = ctx.world.sample_prompts(
      np.random.default_rng([seed + 32, it]), cfg.rollout_batch_size, "train"
    )
    return {"ids": p["ids"], "mask": p["mask"]}

  def eval_fn(st, it: int) -> dict:
    return ppo.evaluate(
      evaluator,
      st["params"],
      init,
      eval_prompts["ids"],
      eval_prompts["mask"],
      jax.random.key(seed + 33),
      reward_params=rm_params,
    )

  def on_eval(it: int, s: dict) -> dict:
    g_mean, g_std = reference["gold"]
    u_mean, u_std = reference["utility"]
    gold_raw = gold(s["tokens"], s["mask"])
    util_raw = ctx.world.utility(s["tokens"][:, :P], s["tokens"][:, P:], s["response_mask"])
    if it in (
      0,
      r.iterations,
    ):  # Written before the checkpoint of that iteration, so a resume keeps them.
      save_eval_samples(
        ctx.path("rl", name, EVAL_SAMPLES["initial" if it == 0 else "final"]),
        s,
        P,
        gold_raw,
        util_raw,
      )
    gold_c = (gold_raw - g_mean) / g_std
    util_c = (util_raw - u_mean) / u_std
    proxy_c = s["score"] - reference["proxy"][proxy["name"]]
    rec = {
      "kl": float(max(s["kl_mean"], 0.0)),
      "kl_se": float(s["kl_se"]),
      "length": float(np.mean(s["length"])),
      "gold_per_prompt": gold_c.tolist(),
    }
    for key, v in (("proxy", proxy_c), ("gold", gold_c), ("utility", util_c)):
      m, se = mean_and_se(np.asarray(v))
      rec[key], rec[f"{key}_se"] = float(m), float(se)
    return rec

  _, history, evals = ppo.train_ppo(
    state,
    shardings,
    lambda st, b: step(st, init, rm_params, b),
    prompt_fn,
    r.iterations,
    ckpt_dir=ctx.path("rl", name, "ckpt"),
    save_every=r.save_every,
    log_every=r.log_every,
    eval_every=r.eval_every,
    eval_fn=eval_fn,
    on_eval=on_eval,
    writer=ctx.writer,
    desc=f"rl/{name}",
  )
  train_by_it = {h["iteration"]: h for h in history}
  meta = {k: proxy[k] for k in ("rm_size", "rm_params", "data_size", "seed")}
  records = []
  for e in evals:
    h = train_by_it.get(e["iteration"], {})
    records.append(
      {
        "method": "rl",
        "name": name,
        "proxy_name": proxy["name"],
        **meta,
        "kl_coef": kl_coef,
        "iteration": e["iteration"],
        "d": float(np.sqrt(e["kl"])),
        **e,
        **{f"train_{k}": v for k, v in h.items() if k != "iteration"},
      }
    )
  results.write_json(done, records)
  return records


def run(ctx: common.Context) -> dict:
  r = ctx.config.rl
  reference = reference_scores(ctx)
  gold = common.gold_fn(ctx)
  by_name = {p["name"]: p for p in proxies.load(ctx)}
  targets = [by_name[n] for n in r.proxies] if r.proxies else list(by_name.values())
  main = [rec for p in targets for rec in run_one(ctx, p, r.kl_coef, p["name"], gold, reference)]
  results.write_jsonl(ctx.path(*RESULTS), main)
  study = []
  if r.kl_study_proxy:
    if r.kl_study_proxy not in by_name:
      raise ValueError(
        f"config.rl.kl_study_proxy={r.kl_study_proxy!r} is not a trained proxy; "
        f"known: {sorted(by_name)}"
      )
    proxy = by_name[r.kl_study_proxy]
    for coef in sorted({r.kl_coef, *r.kl_study_coefs}):
      name = proxy["name"] if coef == r.kl_coef else f"{proxy['name']}_kl{coef:g}"
      study += run_one(ctx, proxy, coef, name, gold, reference)
    results.write_jsonl(ctx.path(*STUDY), study)
  final = [
    max((x for x in main if x["name"] == p["name"]), key=lambda x: x["iteration"]) for p in targets
  ]
  return {
    "num_runs": len(targets) + (len(r.kl_study_coefs) if r.kl_study_proxy else 0),
    "max_kl": max(f["kl"] for f in final),
    "headline": common.gold_peak_headline(main, "iteration"),
  }
