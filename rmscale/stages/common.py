"""What every stage shares: the run context, model configs per role, training, saving, scoring, sampling."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rmscale import checkpoint as ckpt_lib
from rmscale import fs
from rmscale.data.batching import make_batch_fn
from rmscale.data.world import World
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import abstract_params
from rmscale.parallel import distributed
from rmscale.parallel import mesh as mesh_lib
from rmscale.sampling import SamplingConfig, make_sampler
from rmscale.train import rm as rm_lib
from rmscale.train.loop import train_loop
from rmscale.train.state import OptimConfig, compile_train_step, init_state, make_optimizer


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  rules: tuple
  world: World
  writer: Any = None  # TensorBoard SummaryWriter on process 0.

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  @property
  def prompt_len(self) -> int:
    return self.world.prompt_len

  @property
  def response_len(self) -> int:
    return self.world.response_len


def gold_peak_headline(records: list[dict]) -> str:
  """'best gold +0.94 (bon, 400k_d9000_s0, n=74, KL 3.38)': the highest gold of any curve."""
  best = max(records, key=lambda r: r["gold"])
  where = f"{best['method']}, {best['name']}, {best['x']}={best[best['x']]}"
  return f"best gold {best['gold']:+.2f} ({where}, KL {best['kl']:.2f})"


def optim_config(section: ml_collections.ConfigDict, steps: int) -> OptimConfig:
  return OptimConfig(
    learning_rate=section.lr,
    warmup_steps=section.warmup_steps,
    total_steps=steps,
    weight_decay=section.weight_decay,
  )


def sequences(prompt_ids, prompt_mask, response_ids, response_mask):
  """The one sequence layout used everywhere: [left-padded prompt | right-padded response]."""
  return (
    np.concatenate([prompt_ids, response_ids], 1).astype(np.int32),
    np.concatenate([prompt_mask, response_mask], 1).astype(bool),
  )


def train(
  ctx: Context,
  name: str,
  model_cfg: TransformerConfig,
  loss_fn,
  arrays: dict,
  *,
  batch_size: int,
  steps: int,
  optim: OptimConfig,
  seed: int,
  init_params=None,
):
  """Trains one model to ``steps`` (resuming from ``<name>/ckpt``), saves ``<name>/params``."""
  mesh_lib.check_batch_divisible(batch_size, ctx.mesh, f"{name}.batch_size")
  tx = make_optimizer(optim)
  state, shardings = init_state(
    model_cfg, tx, jax.random.key(seed), ctx.mesh, ctx.rules, params=init_params
  )
  step_fn = compile_train_step(loss_fn, tx, shardings, ctx.mesh, ctx.rules)
  batch_fn = make_batch_fn(arrays, batch_size, seed)
  state, history, _ = train_loop(
    state,
    shardings,
    step_fn,
    lambda s: mesh_lib.put_batch(batch_fn(s), ctx.mesh),
    steps,
    ckpt_dir=ctx.path(name, "ckpt"),
    save_every=ctx.config.save_every,
    log_every=ctx.config.log_every,
    writer=ctx.writer,
    desc=name,
  )
  save_params(ctx.path(name, "params"), state["params"])
  return state["params"], history


def save_params(path: str, params) -> None:
  with ckpt_lib.Checkpointer(path, async_save=False) as ckpt:
    ckpt.save(0, {"params": params}, force=True)


def param_shardings(ctx: Context, model_cfg: TransformerConfig):
  shapes, specs = abstract_params(model_cfg)
  return mesh_lib.logical_shardings(shapes, specs, ctx.mesh, ctx.rules)


def load_params(ctx: Context, path: str, model_cfg: TransformerConfig):
  """Parameters saved by ``train``, restored straight into this run's sharding."""
  if not fs.isdir(path):
    raise fs.MissingFileError(f"no saved parameters at {path}; rerun the stage that writes them")
  shapes, _ = abstract_params(model_cfg)
  target = ckpt_lib.abstract_like({"params": shapes}, {"params": param_shardings(ctx, model_cfg)})
  with ckpt_lib.Checkpointer(path) as ckpt:
    state, _ = ckpt.restore(step=0, target=target)
  return state["params"]


def reward_fn(ctx: Context, model_cfg: TransformerConfig, params):
  """``score(tokens_NxL, mask_NxL) -> float32[N]`` in fixed-size jitted batches."""
  batch = ctx.config.score_batch_size
  mesh_lib.check_batch_divisible(batch, ctx.mesh, "score_batch_size")
  scorer = rm_lib.make_scorer(model_cfg, ctx.mesh, param_shardings(ctx, model_cfg), ctx.rules)
  data = mesh_lib.batch_sharding(ctx.mesh)
  # Every host holds the whole (seeded) batch: each places only its devices' rows.
  global_scorer = lambda p, tok, m: scorer(
    p,
    distributed.global_array(tok, data),  # noqa: E731
    distributed.global_array(m, data),
  )
  return lambda tokens, mask: rm_lib.score_in_batches(global_scorer, params, tokens, mask, batch)


def sample(
  ctx: Context,
  model_cfg: TransformerConfig,
  params,
  prompt_ids,
  prompt_mask,
  key: jax.Array,
  temperature: float | None = None,
) -> dict[str, np.ndarray]:
  """Responses for every prompt row, in jitted batches of ``sample_batch_size`` (batch i draws
  with ``fold_in(key, i)``)."""
  c = ctx.config
  scfg = SamplingConfig(
    max_new_tokens=ctx.response_len,
    temperature=c.sampling.temperature if temperature is None else temperature,
    top_k=c.sampling.top_k,
    top_p=c.sampling.top_p,
    eos_id=ctx.world.tokenizer.eos_id,
    pad_id=ctx.world.tokenizer.pad_id,
  )
  batch = c.sample_batch_size
  mesh_lib.check_batch_divisible(batch, ctx.mesh, "sample_batch_size")
  pshard = param_shardings(ctx, model_cfg)
  data = mesh_lib.batch_sharding(ctx.mesh)
  sampler = make_sampler(
    model_cfg,
    scfg,
    in_shardings=(pshard, data, data, mesh_lib.replicated(ctx.mesh)),
    out_shardings=data,
  )
  n = prompt_ids.shape[0]
  out = {k: [] for k in ("ids", "mask", "logprobs")}
  for i, start in enumerate(range(0, n, batch)):
    p, m = prompt_ids[start : start + batch], prompt_mask[start : start + batch]
    k = p.shape[0]
    if k < batch:
      p = np.concatenate([p, np.repeat(p[-1:], batch - k, 0)])
      m = np.concatenate([m, np.repeat(m[-1:], batch - k, 0)])
    with mesh_lib.sharding_context(ctx.mesh, ctx.rules):
      res = distributed.to_host(
        sampler(
          params,
          distributed.global_array(p, data),
          distributed.global_array(m, data),
          jax.random.fold_in(key, i),
        )
      )
    out["ids"].append(res["tokens"][:k])
    out["mask"].append(res["mask"][:k])
    out["logprobs"].append(res["logprobs"][:k])
  return {k: np.concatenate(v) for k, v in out.items()}
