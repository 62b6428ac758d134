"""Stage ``gold``: the gold reward model, trained on comparisons labelled by the human utility.

The "human" comparisons come from a broader writer than the SFT corpus (more rambling, keyword
stuffing and repetition), as human raters see varied answers; so the gold RM knows where the utility
turns down, which is what makes it a trustworthy judge of over-optimised policies.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rmscale import checks, losses, rng
from rmscale.data.world import World
from rmscale.stages import common, policy_init, roles
from rmscale.train import rm


def human_comparisons(ctx: common.Context, n: int, split: str) -> dict[str, np.ndarray]:
  """``n`` pairs of the raters' writer that the human utility decides, the better one chosen.

  Pairs the utility leaves exactly tied (about 2%: e.g. two perfect answers) are dropped, as a rater
  with no preference gives no label: labelled either way they would only be noise to train on and
  a coin flip to score.
  """
  g = ctx.config.gold
  broad = World(
    dataclasses.replace(
      ctx.world.cfg,
      p_ramble=g.p_ramble,
      p_keyword_extra=g.p_keyword_extra,
      p_wrong_keyword=g.p_wrong_keyword,
      p_repeat=g.p_repeat,
    )
  )
  gen = rng.numpy(ctx.config.seed, "gold", "comparisons", split)
  drawn = n + n // 8 + 16  # Enough that n decided pairs remain.
  prompts = broad.sample_prompts(gen, drawn, split)
  a, b = (
    broad.sample_responses(gen, prompts["index"]),
    broad.sample_responses(gen, prompts["index"]),
  )
  ua = ctx.world.utility(prompts["ids"], a["ids"], a["mask"])
  ub = ctx.world.utility(prompts["ids"], b["ids"], b["mask"])
  keep = np.flatnonzero(ua != ub)[:n]
  if len(keep) < n:
    raise ValueError(
      f"only {len(keep)} of {drawn} sampled gold comparisons are decided by the utility; "
      f"the world's writer settings make too many ties to collect {n}"
    )
  pick = lambda d: {k: v[keep] for k, v in d.items()}  # noqa: E731
  return comparison_arrays(
    prompts["ids"][keep], prompts["mask"][keep], pick(a), pick(b), ua[keep] > ub[keep]
  )


def comparison_arrays(prompt_ids, prompt_mask, a, b, a_wins) -> dict[str, np.ndarray]:
  """Chosen/rejected sequences from two responses per prompt and which one won."""
  ta, ma = common.sequences(prompt_ids, prompt_mask, a["ids"], a["mask"])
  tb, mb = common.sequences(prompt_ids, prompt_mask, b["ids"], b["mask"])
  w = np.asarray(a_wins, bool)[:, None]
  return {
    "chosen": np.where(w, ta, tb),
    "chosen_mask": np.where(w, ma, mb),
    "rejected": np.where(w, tb, ta),
    "rejected_mask": np.where(w, mb, ma),
  }


def evaluate(score, data: dict[str, np.ndarray]) -> dict[str, float]:
  """Bradley-Terry loss and accuracy of a scorer on held-out comparisons."""
  rc = score(data["chosen"], data["chosen_mask"])
  rr = score(data["rejected"], data["rejected_mask"])
  loss, acc = losses.bradley_terry_loss(rc, rr)
  return {"loss": float(loss), "accuracy": float(acc)}


def validate(config, devices: int) -> None:
  """config.gold: its kind and, for a trained gold RM, its size, data, batch and optimizer."""
  kind = checks.one_of(config, "gold.kind", ("trained", "oracle", "hf"))
  checks.count(config, "gold.eval_comparisons")
  if kind != "trained":
    return
  checks.model_size(config, "gold.size")
  checks.one_of(config, "gold.init", ("scratch", "pretrained"))
  checks.count(config, "gold.num_comparisons")
  checks.divisible(config, "gold.batch_size", devices)
  checks.optimizer(config, "gold")
  for key in ("p_ramble", "p_keyword_extra", "p_wrong_keyword", "p_repeat"):
    if key in config.gold:
      checks.in_range(config, f"gold.{key}", 0.0, 1.0, closed_hi=True)


def _headline(metrics: dict, against: str) -> str:
  return f"accuracy {metrics['accuracy']:.3f} (BT loss {metrics['loss']:.3f}) on {against}"


def run(ctx: common.Context) -> dict:
  g = ctx.config.gold
  if g.kind == "hf":  # A local checkpoint: nothing to train; measured on the data's own labels.
    held_out, report = ctx.world.comparisons("eval", g.eval_comparisons)
    metrics = evaluate(roles.gold_fn(ctx), held_out)
    return {
      "kind": "hf",
      "hf_dir": g.hf_dir,
      "heldout_loss": metrics["loss"],
      "heldout_accuracy": metrics["accuracy"],
      "heldout_comparisons": len(report.kept),
      "heldout_filter": report.summary(),
      "headline": _headline(metrics, "the dataset's held-out labels"),
    }
  if g.kind == "oracle":
    return {"kind": "oracle", "headline": "the human utility itself (oracle)"}
  model_cfg = roles.model_config(ctx, g.size, "rm")
  data = human_comparisons(ctx, g.num_comparisons, "train")
  init = policy_init.pretrained_lm(ctx, g.size) if g.init == "pretrained" else None
  params, _ = common.train(
    ctx,
    "gold",
    model_cfg,
    rm.make_rm_loss(model_cfg),
    data,
    batch_size=g.batch_size,
    steps=g.steps,
    optim=common.optim_config(g, g.steps),
    seed=rng.integer(ctx.config.seed, "gold", "train"),
    init_params=init,
  )
  held_out = human_comparisons(ctx, g.eval_comparisons, "eval")
  metrics = evaluate(common.reward_fn(ctx, model_cfg, params), held_out)
  return {
    "kind": "trained",
    "size": g.size,
    "heldout_loss": metrics["loss"],
    "heldout_accuracy": metrics["accuracy"],
    "headline": _headline(metrics, "held-out human-utility comparisons"),
  }
