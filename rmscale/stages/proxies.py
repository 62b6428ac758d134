"""Stage ``proxies``: Bradley-Terry proxy RMs for every (size, data size, seed) in the config.

Each proxy is its own resumable unit (``proxies/<name>/``); a finished one is skipped, so a sweep can
add sizes to a workdir and train only what is new. With ``proxies.init = 'pretrained'`` each size
starts from an LM of that size trained on the SFT corpus (``policy_init.pretrained_lm``).
"""

from __future__ import annotations

import math
import os

from rmscale import fs, results
from rmscale.models.sizes import count_params
from rmscale.stages import common, label, policy_init, pretrained
from rmscale.stages.gold import evaluate
from rmscale.train import rm

RESULTS = ("results", "proxies.jsonl")


def proxy_name(size: str, data_size: int, seed: int) -> str:
  return f"{size}_d{data_size}_s{seed}"


def grid(ctx: common.Context) -> list[dict]:
  p = ctx.config.proxies
  return [
    dict(rm_size=s, data_size=int(d), seed=int(r), name=proxy_name(s, d, r))
    for s in p.sizes
    for d in p.data_sizes
    for r in p.seeds
  ]


def train_proxy(ctx: common.Context, spec: dict, train_data: dict, val_data: dict) -> dict:
  p = ctx.config.proxies
  name = os.path.join("proxies", spec["name"])
  done = ctx.path(name, "metrics.json")
  if fs.exists(done):
    return results.read_json(done)
  if spec["data_size"] > len(train_data["chosen"]):
    raise ValueError(
      f"proxies.data_sizes has {spec['data_size']} but label produced only "
      f"{len(train_data['chosen'])} training comparisons (label.num_comparisons)"
    )
  model_cfg = common.model_config(ctx, spec["rm_size"], "rm")
  init = None
  if p.init == "pretrained":
    init = policy_init.pretrained_lm(ctx, spec["rm_size"])
  elif p.init == "hf":  # The local Hugging Face LM of this size (pretrained.py).
    init = pretrained.proxy_init(ctx, spec["rm_size"], ctx.config.seed + 100 * spec["seed"] + 11)
  subset = {k: v[: spec["data_size"]] for k, v in train_data.items() if k in rm.BATCH_KEYS}
  steps = max(1, math.ceil(p.epochs * spec["data_size"] / p.batch_size))
  params, history = common.train(
    ctx,
    name,
    model_cfg,
    rm.make_rm_loss(model_cfg, p.score_l2),
    subset,
    batch_size=p.batch_size,
    steps=steps,
    optim=common.optim_config(p, steps),
    seed=ctx.config.seed + 100 * spec["seed"] + 11,
    init_params=init,
  )
  val = evaluate(common.reward_fn(ctx, model_cfg, params), val_data)
  record = {
    **{k: spec[k] for k in ("rm_size", "data_size", "seed", "name")},
    "rm_params": count_params(model_cfg)["non_embedding"],
    "steps": steps,
    "train_loss": history[-1]["loss"],
    "val_loss": val["loss"],
    "val_accuracy": val["accuracy"],
  }
  results.write_json(done, record)
  return record


def run(ctx: common.Context) -> dict:
  train_data, val_data = label.load(ctx)
  records = [train_proxy(ctx, spec, train_data, val_data) for spec in grid(ctx)]
  results.write_jsonl(ctx.path(*RESULTS), records)
  acc = [r["val_accuracy"] for r in records]
  headline = f"{len(records)} proxies, validation accuracy {min(acc):.3f} to {max(acc):.3f}"
  return {"num_proxies": len(records), "headline": headline}


def load(ctx: common.Context) -> list[dict]:
  return results.read_jsonl(ctx.path(*RESULTS))
