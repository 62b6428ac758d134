"""FP8 in training: state and step, inference without meta, O1 all-reduce, O2 optimizer, memory, quality.

Error bounds are those of tests/ops/test_fp8.py: a value quantised with scale s has error at most
u |x| + d / s (u = 2^-4 for E4M3, 2^-3 for E5M2; d = half the subnormal spacing in scaled units).
"""

import functools
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from rmscale.models import sizes
from rmscale.models.transformer import FP8_META_KEY, Transformer, abstract_params
from rmscale.ops import fp8, fp8_collectives, fp8_optim
from rmscale.parallel import mesh as mesh_lib
from rmscale.sampling import SamplingConfig, sample
from rmscale.train import rm
from rmscale.train.state import compile_train_step, init_state, loss_and_grads

# benchmarks/ is a top-level folder of the repository, not part of the installed package.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
from benchmarks import fp8 as bench  # noqa: E402

FORMATS = {fp8.E4M3: (448.0, 2.0**-4, 2.0**-10), fp8.E5M2: (57344.0, 2.0**-3, 2.0**-17)}
V, L = 48, 12
# One layer keeps compilation (most of these tests' time) short; layers are independent for FP8.
CFG = sizes.model_config(
  "100k", vocab_size=V, reward_head="linear", n_layers=1, d_ff=128, max_len=32
)
FP8_CFG = CFG.replace(matmul="fp8")
FP8_LAYERS = {
  f"layers_{i}/{m}"
  for i in range(CFG.n_layers)
  for m in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/up", "mlp/down")
}


def _tokens(seed, b=4, length=L):
  return jnp.asarray(np.random.default_rng(seed).integers(1, V, (b, length)), jnp.int32)


def _rm_batch(seed, pairs):
  rng = np.random.default_rng(seed)
  tok = rng.integers(1, V, (2, pairs, L)).astype(np.int32)
  mask = np.ones((pairs, L), bool)
  mask[::3, :3] = False
  return {
    "chosen": tok[0],
    "chosen_mask": mask,
    "rejected": tok[1],
    "rejected_mask": mask[::-1].copy(),
  }


@functools.cache
def _fp8_variables():
  model = Transformer(FP8_CFG)
  init = jax.jit(lambda key: model.init(key, _tokens(0), method=Transformer.forward))
  return nn.unbox(init(jax.random.key(0)))


@functools.cache
def _filled_meta():
  """Variables whose meta went through one differentiated pass: real histories and scales."""
  model, variables = Transformer(FP8_CFG), _fp8_variables()
  grads = jax.jit(jax.grad(lambda v: model.apply(v, _tokens(1)).sum()))(variables)
  return fp8.apply_fp8_meta_update(variables, grads)


# ------------------------------------------------------------------------------ model and inference


def test_fp8_model_meta_layers_and_apply_paths():
  variables = _fp8_variables()
  assert set(variables) == {"params", FP8_META_KEY} and FP8_META_KEY == fp8.FP8_META_COLLECTION
  layers = {"/".join(path[:-2]) for path in traverse_util.flatten_dict(variables[FP8_META_KEY])}
  assert (
    layers == FP8_LAYERS
  )  # Attention and MLP only: LM head and reward head stay high precision.

  model, tok = Transformer(FP8_CFG), _tokens(2)
  apply = jax.jit(lambda variables: model.apply(variables, tok))
  variables = _filled_meta()
  params, meta = variables["params"], variables[FP8_META_KEY]
  as_collection = apply({"params": params, FP8_META_KEY: meta})
  in_params = apply({"params": {**params, FP8_META_KEY: meta}})
  np.testing.assert_array_equal(np.asarray(as_collection), np.asarray(in_params))
  with pytest.raises(ValueError, match="FP8 meta given twice"):
    model.apply({"params": {**params, FP8_META_KEY: meta}, FP8_META_KEY: meta}, tok)

  # Params alone (scoring, sampling): current scaling, still through the FP8 primitives.
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, tok))(params))
  assert jaxpr.count("fp8_dot[") == 6 * CFG.n_layers
  current = apply({"params": params})
  exact = jax.jit(lambda p: Transformer(CFG).apply({"params": p}, tok))(params)
  for out in (current, as_collection):
    # Stated tolerance: E4M3 rounds each operand by <= 2^-4 relative; products and sums of many
    # terms average it down, so the logits' relative error stays well under that.
    rel = float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
    assert 0 < rel < 2.0**-4


def test_fp8_sampler_matches_teacher_forcing_with_fixed_scales():
  """With trained (delayed) scales every token is quantised alike in the KV-cache decode and in a
  full forward pass, so greedy sampling's logprobs equal teacher forcing's."""
  variables = _filled_meta()
  params = {**variables["params"], FP8_META_KEY: variables[FP8_META_KEY]}
  prompt = _tokens(3, b=4, length=5)
  scfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
  out = jax.jit(
    lambda p, x: sample(
      p, x, jnp.ones_like(x, bool), jax.random.key(0), model_cfg=FP8_CFG, scfg=scfg
    )
  )(params, prompt)
  seq = jnp.concatenate([prompt, out["tokens"]], 1)
  logits = Transformer(FP8_CFG).apply({"params": params}, seq)[:, 4:-1]
  teacher = jnp.take_along_axis(jax.nn.log_softmax(logits), out["tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(teacher), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(jnp.argmax(logits, -1)))


def test_fp8_scorer_runs_sharded_on_params_alone():
  variables = _fp8_variables()
  mesh = mesh_lib.make_mesh(dict(data=4, tensor=2))
  shapes, specs = abstract_params(FP8_CFG)
  scorer = rm.make_scorer(FP8_CFG, mesh, mesh_lib.logical_shardings(shapes, specs, mesh))
  batch = _rm_batch(4, 8)
  got = scorer(variables["params"], batch["chosen"], batch["chosen_mask"])
  want = rm._reward(variables["params"], batch["chosen"], batch["chosen_mask"], model_cfg=FP8_CFG)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ train state and step


def test_train_step_carries_meta_and_matches_hand_written_step():
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
  tx = optax.sgd(0.1)
  plain = jax.eval_shape(lambda r: init_state(CFG, tx, r, mesh)[0], jax.random.key(0))
  assert set(plain) == {"params", "opt_state", "step", "rng"}  # Non-FP8 state layout unchanged.
  state, shardings = init_state(FP8_CFG, tx, jax.random.key(0), mesh)
  assert set(state) == set(plain) | {FP8_META_KEY}
  assert all(
    s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings[FP8_META_KEY])
  )

  batch = _rm_batch(0, 8)
  loss_fn = rm.make_rm_loss(FP8_CFG)
  start = jax.device_get(state)
  step = compile_train_step(loss_fn, tx, shardings, mesh)
  for _ in range(2):
    state, metrics = step(state, mesh_lib.put_batch(batch, mesh))

  # The recipe of rmscale/ops/fp8.py's docstring, written out: differentiate w.r.t. the variables,
  # optimizer on the params gradient, meta replaced by its "gradient".
  model = Transformer(FP8_CFG)

  def hand_loss(variables):
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    r = model.apply(variables, tokens, mask, method=Transformer.forward)["reward"]
    return -jnp.mean(jax.nn.log_sigmoid(r[:8] - r[8:]))

  variables = {"params": start["params"], FP8_META_KEY: start[FP8_META_KEY]}
  hand_grads = jax.jit(jax.value_and_grad(hand_loss))
  for _ in range(2):
    loss, grads = hand_grads(variables)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads["params"])
    variables = {**fp8.apply_fp8_meta_update(variables, grads), "params": params}
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    jax.device_get(state["params"]),
    variables["params"],
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
    jax.device_get(state[FP8_META_KEY]),
    variables[FP8_META_KEY],
  )
  query = state[FP8_META_KEY]["layers_0"]["attn"]["query"]["Fp8DotGeneral_0"]
  assert np.all(np.asarray(query["kernel_amax_history"][:2]) > 0)  # Two steps pushed.
  assert float(query["kernel_scale"]) != 1.0  # The second step used a real delayed scale.


# ------------------------------------------------------------------------------ O1: FP8 all-reduce


def _all_reduce_bound(g_RxN, dtype):
  """Elementwise bound on |fp8 all-reduce - exact sum| (module docstring of fp8_collectives)."""
  fmax, u, d = FORMATS[dtype]
  g = np.abs(np.asarray(g_RxN, np.float64))
  s1 = fmax / g.max()
  e1 = (u * g + d / s1).sum(0)
  partial_max = np.abs(np.asarray(g_RxN, np.float64).sum(0)) + e1
  return e1 + u * partial_max + d * partial_max.max() / fmax


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
def test_fp8_all_reduce_within_format_bound_on_8_devices(dtype):
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2))
  axes = ("data", "fsdp")
  # 8 ranks with magnitudes over 4 decades (small values land in the subnormals); 91 elements
  # (not a multiple of 8) exercise the padding.
  scale_R = 10.0 ** np.linspace(-2, 2, 8)
  g = np.random.default_rng(0).standard_normal((8, 13, 7)) * scale_R[:, None, None]
  g = g.astype(np.float32)
  fn = jax.jit(
    jax.shard_map(
      lambda x: (
        fp8_collectives.fp8_all_reduce_sum(x[0], axes, dtype)[None],
        jax.lax.psum(x[0], axes),
      ),
      mesh=mesh,
      in_specs=jax.sharding.PartitionSpec(axes),
      out_specs=(jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec()),
      check_vma=False,
    )
  )
  per_rank, psum = fn(jnp.asarray(g))
  per_rank = np.asarray(per_rank)
  for r in range(1, 8):
    np.testing.assert_array_equal(per_rank[r], per_rank[0])  # Every rank holds the same result.
  err = np.abs(per_rank[0].astype(np.float64) - np.asarray(psum, np.float64))
  bound = _all_reduce_bound(g.reshape(8, -1), dtype).reshape(13, 7)
  assert np.all(err <= bound * (1 + 1e-5) + 1e-6)
  assert err.max() > 0  # Really quantised, not a float32 psum in disguise.


def test_o1_grads_match_per_rank_reference_and_global_meta():
  mesh = mesh_lib.make_mesh(dict(data=8))
  params, meta = _fp8_variables()["params"], _fp8_variables()[FP8_META_KEY]
  loss_fn, batch, rng = rm.make_rm_loss(FP8_CFG), _rm_batch(1, 16), jax.random.key(5)
  o1 = jax.jit(fp8_collectives.fp8_data_parallel(loss_and_grads, mesh), static_argnums=0)
  with mesh_lib.sharding_context(mesh):
    (loss, _), grads, meta_grads = o1(loss_fn, params, meta, mesh_lib.put_batch(batch, mesh), rng)

  # Reference: each rank's shard (2 pairs) differentiated alone on one device.
  local = jax.jit(loss_and_grads, static_argnums=0)
  shards = [{k: v[2 * r : 2 * r + 2] for k, v in batch.items()} for r in range(8)]
  ref = [
    local(loss_fn, params, meta, shard, jax.random.fold_in(rng, r))
    for r, shard in enumerate(shards)
  ]
  np.testing.assert_allclose(float(loss), np.mean([float(r[0][0]) for r in ref]), rtol=1e-5)
  mask = traverse_util.flatten_dict(fp8_collectives.fp8_gemm_kernel_mask(params, meta))
  assert sum(mask.values()) == len(FP8_LAYERS)
  flat = traverse_util.flatten_dict(jax.device_get(grads))
  per_rank = [traverse_util.flatten_dict(r[1]) for r in ref]
  for path, is_fp8 in mask.items():
    g_R = np.stack([np.asarray(p[path]) for p in per_rank])
    mean = g_R.mean(0)
    if is_fp8:
      bound = _all_reduce_bound(g_R.reshape(8, -1), fp8.E4M3).reshape(mean.shape) / 8
      assert np.all(np.abs(flat[path] - mean) <= bound * (1 + 1e-4) + 1e-7), path
    else:
      np.testing.assert_allclose(flat[path], mean, rtol=1e-4, atol=1e-7, err_msg=str(path))
  # Meta: the max over the ranks' amaxes (those of a global-batch step); scales come from the
  # history before this step, so every rank computed the same ones.
  want = jax.tree.map(lambda *m: np.max(np.stack(m), 0), *[r[2] for r in ref])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), jax.device_get(meta_grads), want
  )


def test_o1_rejects_tensor_parallel_mesh_and_non_fp8_model():
  with pytest.raises(ValueError, match=r"mesh axes \['tensor'\] have size > 1"):
    fp8_collectives.fp8_data_parallel(loss_and_grads, mesh_lib.make_mesh(dict(data=4, tensor=2)))
  mesh = mesh_lib.make_mesh(dict(data=8))
  params, _ = abstract_params(CFG)
  o1 = functools.partial(
    fp8_collectives.fp8_data_parallel(loss_and_grads, mesh), rm.make_rm_loss(CFG)
  )
  with pytest.raises(ValueError, match="need a model with FP8 matmuls"):
    jax.eval_shape(o1, params, None, _rm_batch(0, 8), jax.random.key(0))  # Fails while tracing.


# ------------------------------------------------------------------------------ O2: optimizer


def _grads(seed, shapes=((6, 5), (7,))):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
    f"w{i}": 10.0 ** (i - 2) * jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes))
  }


def test_adam_fp8_with_float32_storage_is_optax_adam():
  ours = fp8_optim.scale_by_adam_fp8(0.9, 0.95, 1e-8, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  ref = optax.scale_by_adam(0.9, 0.95, 1e-8)
  params = jax.tree.map(jnp.zeros_like, _grads(0))
  s_ours, s_ref = ours.init(params), ref.init(params)
  for t in range(5):
    u_ours, s_ours = ours.update(_grads(t), s_ours)
    u_ref, s_ref = ref.update(_grads(t), s_ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u_ours, u_ref)


def test_adam_fp8_moments_stored_narrow_within_format_bounds():
  tx = fp8_optim.scale_by_adam_fp8(0.9, 0.95, 1e-8)
  g = _grads(1)
  _, state = tx.update(g, tx.init(jax.tree.map(jnp.zeros_like, g)))
  assert {x.dtype for x in jax.tree.leaves(state.mu.data)} == {jnp.dtype(fp8.E4M3)}
  assert {x.dtype for x in jax.tree.leaves(state.nu.data)} == {jnp.dtype(jnp.float16)}
  leaves = jax.tree.leaves(g)
  # After one step mu = (1 - b1) g and nu = (1 - b2) g^2, each tensor scaled to its format's max.
  for i, (mu, nu) in enumerate(
    zip(fp8_optim.decode_leaves(state.mu), fp8_optim.decode_leaves(state.nu))
  ):
    g64 = np.asarray(leaves[i], np.float64)
    want_mu, want_nu = 0.1 * g64, 0.05 * g64**2
    s_mu = 448.0 / np.abs(want_mu).max()
    assert np.all(
      np.abs(np.asarray(mu) - want_mu) <= 2**-4 * np.abs(want_mu) + 2**-10 / s_mu + 1e-12
    )
    s_nu = 65504.0 / want_nu.max()  # float16: 10 mantissa bits, subnormal spacing 2^-24.
    assert np.all(np.abs(np.asarray(nu) - want_nu) <= 2**-11 * want_nu + 2**-25 / s_nu + 1e-15)
  # The 1e-2-scale gradients' squared moments survive, which unscaled float16 (< 6e-8: 0) loses.
  want_nu = 0.05 * np.asarray(leaves[0], np.float32) ** 2
  assert np.all(np.asarray(fp8_optim.decode_leaves(state.nu)[0]) > 0)
  assert np.any(want_nu.astype(np.float16) == 0)


def test_master_weights_keep_updates_smaller_than_bf16_rounding():
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  grads = {"w": jnp.full((3,), -1e-4, jnp.bfloat16)}
  for master, want in ((None, 1.0), ("float32", 1.0078125)):  # bf16(1 + 100 * 1e-4) = 1 + 2^-7
    tx = optax.sgd(1.0) if master is None else fp8_optim.with_master_weights(optax.sgd(1.0), master)
    p, s = params, tx.init(params)
    for _ in range(100):
      u, s = tx.update(grads, s, p)
      p = optax.apply_updates(p, u)
    assert p["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(p["w"], np.float32), want)
  np.testing.assert_allclose(np.asarray(fp8_optim.decode_leaves(s.master)[0]), 1.01, rtol=1e-3)


def test_o2_optimizer_state_bytes_hand_computed():
  params = {"a": jnp.zeros((3, 5)), "b": jnp.zeros((7,))}  # 22 parameters in 2 tensors.
  state = fp8_optim.fp8_adamw(1e-3).init(params)
  # count int32 + mu (22 x 1 byte + 2 float32 scales) + nu (22 x 2 bytes + 2 scales); AdamW's
  # weight decay and constant learning rate keep no state.
  assert fp8_optim.tree_bytes(state) == 4 + (22 + 8) + (44 + 8) == 86
  state = fp8_optim.fp8_adamw(1e-3, master_dtype=jnp.float16).init(params)
  assert fp8_optim.tree_bytes(state) == 86 + (44 + 8)  # + float16 master weights and their scales


def test_bytes_per_param_bf16_o1_o2_from_real_states():
  n = 133_248  # size 100k with the byte vocabulary: sizes.count_params
  n_fp8 = 2 * (4 * 64 * 64 + 2 * 64 * 256)  # attention and MLP kernels: the FP8 GEMM weights
  # Per layer 8 attention + 4 MLP + 4 norm tensors; final norm (2); embedding; LM head.
  n_leaves = 2 * 16 + 2 + 1 + 1
  assert sizes.count_params(sizes.model_config("100k", vocab_size=259))["total"] == n
  got = {level: bench.abstract_memory(level, "100k", 259) for level in ("bf16", "O1", "O2")}
  counts = 4 + 4  # Adam's and the schedule's int32 step counts.
  assert got["bf16"]["params"] == 4.0
  assert got["bf16"]["opt_state"] == pytest.approx((8 * n + counts) / n, rel=1e-12)
  assert got["bf16"]["grads"] == 4.0
  o1_grads = (n_fp8 * 1 + (n - n_fp8) * 4 + 12 * 4) / n  # FP8 kernels + their scales, rest float32
  assert got["O1"]["grads"] == pytest.approx(o1_grads, rel=1e-12)
  assert got["O1"]["opt_state"] == got["bf16"]["opt_state"]
  assert got["O2"]["opt_state"] == pytest.approx((3 * n + counts + 2 * 4 * n_leaves) / n, rel=1e-12)
  assert got["O2"]["fp8_meta"] == got["O1"]["fp8_meta"] == pytest.approx(12 * 3 * (16 + 1) * 4 / n)
  assert got["bf16"]["total"] > got["O1"]["total"] > got["O2"]["total"]
  print({k: round(v["total"], 3) for k, v in got.items()})


# ------------------------------------------------------------------------------ training quality


@pytest.mark.slow
def test_tiny_rm_fp8_accuracy_within_one_point_of_fp32():
  world = bench.small_world()
  kw = dict(steps=250, batch=32, n_train=4000, n_eval=4000, d_model=32, n_heads=2, d_ff=128)
  base, ours = bench.train_rm(world, "default", **kw), bench.train_rm(world, "fp8", **kw)
  print(
    f"RM held-out accuracy: fp32 {base['accuracy']:.4f}, fp8 {ours['accuracy']:.4f} "
    f"(with trained scales {ours['accuracy_with_meta']:.4f})"
  )
  assert base["accuracy"] > 0.6  # The task is learnt, so the comparison means something.
  assert abs(ours["accuracy"] - base["accuracy"]) <= 0.01
  assert abs(ours["accuracy_with_meta"] - base["accuracy"]) <= 0.01


@pytest.mark.slow
def test_tiny_sft_fp8_loss_curve_within_two_percent_of_fp32():
  world = bench.small_world()
  kw = dict(steps=100, batch=16, d_model=32, n_heads=2, d_ff=128)
  base, ours = bench.train_sft(world, "default", **kw), bench.train_sft(world, "fp8", **kw)
  dev = bench.curve_deviation(base["losses"], ours["losses"], window=10)
  print(
    f"SFT loss: fp32 {base['losses'][0]:.3f} -> {np.mean(base['losses'][-10:]):.4f}, fp8 -> "
    f"{np.mean(ours['losses'][-10:]):.4f}; deviation {dev}"
  )
  assert np.mean(base["losses"][-10:]) < 0.8 * base["losses"][0]  # It trains.
  assert dev["max_window_rel_dev"] <= 0.02
