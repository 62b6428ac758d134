"""Sampler against full forward passes: greedy = argmax, log-probs = log-softmax, determinism, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmscale.models import sizes
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import Transformer, init_params
from rmscale.sampling import SamplingConfig, draw_tokens, filter_logits, make_sampler

V, P, N = 37, 5, 7


@pytest.fixture(scope="module", params=["neox", "gpt2"])
def setup(request):
  cfg = TransformerConfig(
    **{
      **sizes.FAMILIES[request.param],
      **dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=32),
    }
  )
  params, _ = init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda p: p * 15 if p.ndim > 1 else p, params)  # Peaked distributions.
  prompts = jax.random.randint(jax.random.key(1), (3, P), 3, V)
  mask = jnp.ones((3, P), bool).at[0, :2].set(False).at[1, :1].set(False)  # Left padding.
  prompts = jnp.where(mask, prompts, 0)
  return cfg, params, prompts, mask


def _full(cfg, params, prompts, mask, out):
  tokens = jnp.concatenate([prompts, out["tokens"]], 1)
  full_mask = jnp.concatenate([mask, out["mask"]], 1)
  return Transformer(cfg).apply({"params": params}, tokens, full_mask)[:, P - 1 : -1]


def test_greedy_is_argmax_of_full_forward(setup):
  cfg, params, prompts, mask = setup
  out = make_sampler(cfg, SamplingConfig(N, temperature=0.0))(
    params, prompts, mask, jax.random.key(0)
  )
  assert out["mask"].all()
  logits = _full(cfg, params, prompts, mask, out)
  np.testing.assert_array_equal(out["tokens"], jnp.argmax(logits, -1))
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits), out["tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(out["logprobs"], expected, atol=1e-4)


def test_top_k_one_equals_greedy(setup):
  cfg, params, prompts, mask = setup
  greedy = make_sampler(cfg, SamplingConfig(N, temperature=0.0))(
    params, prompts, mask, jax.random.key(0)
  )
  k1 = make_sampler(cfg, SamplingConfig(N, top_k=1))(params, prompts, mask, jax.random.key(3))
  np.testing.assert_array_equal(k1["tokens"], greedy["tokens"])
  np.testing.assert_allclose(k1["logprobs"], 0.0, atol=1e-6)  # The only allowed token.


def test_logprobs_match_full_forward_and_key_determinism(setup):
  cfg, params, prompts, mask = setup
  sampler = make_sampler(cfg, SamplingConfig(N))
  a = sampler(params, prompts, mask, jax.random.key(7))
  b = sampler(params, prompts, mask, jax.random.key(7))
  c = sampler(params, prompts, mask, jax.random.key(8))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(a["tokens"], c["tokens"])
  logits = _full(cfg, params, prompts, mask, a)
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits), a["tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(a["logprobs"], expected, atol=1e-4)


def test_eos_stops_rows_and_pads_after(setup):
  cfg, params, prompts, mask = setup
  greedy = make_sampler(cfg, SamplingConfig(N, temperature=0.0))(
    params, prompts, mask, jax.random.key(0)
  )
  eos = int(greedy["tokens"][0, 2])  # Make row 0's third token the EOS.
  out = make_sampler(cfg, SamplingConfig(N, temperature=0.0, eos_id=eos, pad_id=0))(
    params, prompts, mask, jax.random.key(0)
  )
  for row in range(3):
    toks = np.asarray(greedy["tokens"][row])
    stop = int(np.argmax(toks == eos)) if (toks == eos).any() else N - 1
    np.testing.assert_array_equal(out["tokens"][row, : stop + 1], toks[: stop + 1])
    assert out["mask"][row, : stop + 1].all() and not out["mask"][row, stop + 1 :].any()
    assert (out["tokens"][row, stop + 1 :] == 0).all() and (
      out["logprobs"][row, stop + 1 :] == 0
    ).all()


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top2 = filter_logits(logits, SamplingConfig(1, top_k=2))
  np.testing.assert_array_equal(jnp.isfinite(top2), [[True, True, False, False]])
  # Mass before each token: 0, .5, .8, .95 -> top_p=0.8 keeps the first two, 0.81 the first three.
  p80 = filter_logits(logits, SamplingConfig(1, top_p=0.8))
  np.testing.assert_array_equal(jnp.isfinite(p80), [[True, True, False, False]])
  p81 = filter_logits(logits, SamplingConfig(1, top_p=0.81))
  np.testing.assert_array_equal(jnp.isfinite(p81), [[True, True, True, False]])
  hot = filter_logits(logits, SamplingConfig(1, temperature=2.0))
  np.testing.assert_allclose(hot, logits / 2)


def test_top_p_sampling_never_leaves_the_nucleus(setup):
  cfg, params, prompts, mask = setup
  out = make_sampler(cfg, SamplingConfig(N, top_p=0.5))(params, prompts, mask, jax.random.key(2))
  logits = _full(cfg, params, prompts, mask, out)
  kept = jnp.isfinite(filter_logits(logits.reshape(-1, V), SamplingConfig(1, top_p=0.5)))
  assert bool(jnp.take_along_axis(kept, out["tokens"].reshape(-1, 1), -1).all())


def test_bad_sampling_config_is_named():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(4, top_p=0.0)


def test_draw_tokens_follows_the_softmax_and_never_draws_filtered_tokens():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.0, 0.2]))  # Token 2 is filtered (-inf).
  rows = 200_000
  tok = draw_tokens(jax.random.key(0), jnp.broadcast_to(logits, (rows, 4)))
  freq = np.bincount(np.asarray(tok), minlength=4) / rows
  # Binomial standard error at p=0.5 over 2e5 rows is ~0.0011: 5 sigma.
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.0, 0.2], atol=0.006)
  assert freq[2] == 0.0
