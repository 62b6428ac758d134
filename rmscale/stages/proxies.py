"""Stage ``proxies``: Bradley-Terry proxy RMs for every (size, data size, seed) in the config.

Each proxy is its own resumable unit (``proxies/<name>/``); a finished one is skipped, so a sweep can
add sizes to a workdir and train only what is new. With ``proxies.init = 'pretrained'`` each size
starts from an LM of that size trained on the SFT corpus (``policy_init.pretrained_lm``).
"""

from __future__ import annotations

import math
import os

from rmscale import checks, fs, results, rng
from rmscale.errors import UserError
from rmscale.models import sizes
from rmscale.models.sizes import count_params
from rmscale.stages import common, label, policy_init, roles
from rmscale.stages.gold import evaluate
from rmscale.train import rm

RESULTS = ("results", "proxies.jsonl")


def proxy_name(size: str, data_size: int, seed: int) -> str:
  return f"{size}_d{data_size}_s{seed}"


def names(config) -> set[str]:
  p = config.proxies
  return {proxy_name(s, d, x) for s in p.sizes for d in p.data_sizes for x in p.seeds}


def validate(config, devices: int) -> None:
  """config.proxies: the grid of sizes, data sizes and seeds, and how each proxy trains."""
  init = checks.one_of(config, "proxies.init", ("scratch", "pretrained", "hf"))
  for size in checks.value(config, "proxies.sizes"):
    if size not in sizes.SIZES and init != "hf":  # A Hugging Face proxy's size is a name only.
      raise UserError(f"config.proxies.sizes has unknown size {size!r}; known: {list(sizes.SIZES)}")
  n_train = label.num_train(config)
  for d in checks.value(config, "proxies.data_sizes"):
    if isinstance(d, bool) or not isinstance(d, int) or not 0 < d <= n_train:
      raise UserError(
        f"config.proxies.data_sizes has {d!r}, but label gives {n_train} training comparisons"
      )
  for seed in checks.value(config, "proxies.seeds"):
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
      raise UserError(f"config.proxies.seeds has {seed!r}; seeds are whole numbers >= 0")
  checks.divisible(config, "proxies.batch_size", devices)
  checks.positive(config, "proxies.epochs")
  checks.non_negative(config, "proxies.score_l2")
  checks.optimizer(config, "proxies", steps_key=None)  # Steps follow from epochs and data size.


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
  model_cfg = roles.model_config(ctx, spec["rm_size"], "rm")
  # Init and data order: one stream per proxy (its size, data size and seed).
  seed = rng.integer(ctx.config.seed, "proxies", name)
  init = None
  if p.init == "pretrained":
    init = policy_init.pretrained_lm(ctx, spec["rm_size"])
  elif p.init == "hf":  # The local Hugging Face LM of this size (roles.py).
    init = roles.proxy_init(ctx, spec["rm_size"], seed)
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
    seed=seed,
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
