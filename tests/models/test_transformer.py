"""Model invariants for each architecture family: causality, padding, cache parity, reward head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmscale.models import sizes
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import Transformer, default_positions, init_cache, init_params

V = 61


def tiny(family, **kw):
  base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=64)
  if family == "llama":
    base.update(n_kv_heads=2)  # GQA
  base.update(kw)
  return TransformerConfig(**{**sizes.FAMILIES[family], **base})


FAMILIES = ["neox", "llama", "gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
  cfg = tiny(request.param, reward_head="linear", value_head=True)
  params, _ = init_params(cfg, jax.random.key(0))
  # Random init has tiny weights; scale up so differences are not hidden by near-zero activations.
  params = jax.tree.map(lambda p: p * 20 if p.ndim > 1 else p, params)
  model = Transformer(cfg)
  fwd = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method=Transformer.forward))
  return cfg, params, model, fwd


def _tokens(seed, B=3, L=10):
  return jax.random.randint(jax.random.key(seed), (B, L), 1, V)


def test_causality(lm):
  cfg, params, _, fwd = lm
  tok = _tokens(1)
  mask = jnp.ones_like(tok, bool)
  base = fwd(params, tok, mask)["logits"]
  t = 6
  edited = fwd(params, tok.at[:, t].set((tok[:, t] + 7) % V), mask)["logits"]
  np.testing.assert_array_equal(base[:, :t], edited[:, :t])
  assert np.abs(base[:, t:] - edited[:, t:]).max() > 1e-3  # The edit is visible from t on.


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_real_tokens(lm, side):
  cfg, params, _, fwd = lm
  tok = _tokens(2, B=2, L=6)
  ref = fwd(params, tok, jnp.ones_like(tok, bool))
  pad_len = 4
  pad_tok = jax.random.randint(jax.random.key(9), (2, pad_len), 1, V)  # Garbage in pad slots.
  if side == "left":
    padded = jnp.concatenate([pad_tok, tok], 1)
    mask = jnp.concatenate([jnp.zeros((2, pad_len), bool), jnp.ones_like(tok, bool)], 1)
    real = slice(pad_len, None)
  else:
    padded = jnp.concatenate([tok, pad_tok], 1)
    mask = jnp.concatenate([jnp.ones_like(tok, bool), jnp.zeros((2, pad_len), bool)], 1)
    real = slice(0, 6)
  out = fwd(params, padded, mask)
  np.testing.assert_allclose(out["logits"][:, real], ref["logits"], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out["value"][:, real], ref["value"], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out["reward"], ref["reward"], atol=2e-5, rtol=1e-5)


def test_reward_reads_last_non_pad_token(lm):
  cfg, params, _, fwd = lm
  tok = _tokens(3, B=2, L=8)
  mask = jnp.arange(8)[None, :] < jnp.array([[5], [8]])
  r = fwd(params, tok, mask)["reward"]
  after = tok.at[0, 5:].set(3)  # Edit only the pads after row 0's last real token.
  np.testing.assert_array_equal(fwd(params, after, mask)["reward"], r)
  at_last = tok.at[0, 4].set((tok[0, 4] + 1) % V)  # Edit the last real token itself.
  changed = fwd(params, at_last, mask)["reward"]
  assert abs(float(changed[0] - r[0])) > 1e-4 and float(changed[1]) == float(r[1])


def test_kv_cache_decoding_matches_full_forward(lm):
  cfg, params, model, fwd = lm
  B, P, N = 2, 5, 6
  tok = _tokens(4, B=B, L=P + N)
  # Row 0 has 2 pad slots on the left of its prompt.
  mask = jnp.ones((B, P + N), bool).at[0, :2].set(False)
  full = fwd(params, tok, mask)["logits"]
  positions = default_positions(mask)
  apply = jax.jit(
    lambda p, t, m, pos, c: model.apply(
      {"params": p}, t, m, pos, cache=c, method=Transformer.forward
    )
  )
  out = apply(params, tok[:, :P], mask[:, :P], positions[:, :P], init_cache(cfg, B, P + N))
  steps = [out["logits"]]
  cache = out["cache"]
  for t in range(P, P + N):
    out = apply(params, tok[:, t : t + 1], mask[:, t : t + 1], positions[:, t : t + 1], cache)
    cache = out["cache"]
    steps.append(out["logits"])
  cached = jnp.concatenate(steps, 1)
  np.testing.assert_allclose(cached[0, 2:], full[0, 2:], atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(cached[1], full[1], atol=1e-4, rtol=1e-5)
  assert int(cache["index"]) == P + N


def test_dtype_separate_from_param_dtype():
  cfg = tiny("llama", dtype="bfloat16", param_dtype="float32")
  params, _ = init_params(cfg, jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = Transformer(cfg).apply({"params": params}, _tokens(5), method=Transformer.forward)
  assert out["hidden"].dtype == jnp.bfloat16 and out["logits"].dtype == jnp.float32


def test_logical_axis_names_on_every_parameter():
  cfg = tiny("neox", reward_head="mlp", value_head=True, reward_head_hidden=16)
  params, specs = init_params(cfg, jax.random.key(0))
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  flat_s = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(flat_p) == len(flat_s)
  for (path, p), spec in zip(flat_p, flat_s):
    assert len(spec) == p.ndim, jax.tree_util.keystr(path)
  assert specs["layers_0"]["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec(
    "embed", "heads", "head_dim"
  )


def test_grm_model_carries_lm_and_reward_heads():
  cfg = tiny("neox", reward_head="mlp", reward_head_hidden=16)
  params, _ = init_params(cfg, jax.random.key(0))
  out = Transformer(cfg).apply({"params": params}, _tokens(6), method=Transformer.forward)
  assert out["logits"].shape == (3, 10, V) and out["reward"].shape == (3,)


@pytest.mark.parametrize(
  "field,value,msg",
  [
    ("d_model", 30, "not divisible by model.n_heads"),
    ("n_kv_heads", 3, "not divisible by model.n_kv_heads"),
    ("norm", "batchnorm", "model.norm"),
    ("rotary_pct", 0.375, "odd rotary dimension"),
  ],
)
def test_config_validation_names_the_field(field, value, msg):
  with pytest.raises(ValueError, match=msg):
    tiny("neox", **{field: value})
