import jax.numpy as jnp
import numpy as np

from rmscale import losses


def test_bradley_terry_by_hand():
  loss, acc = losses.bradley_terry_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0]))
  expected = (np.log1p(np.exp(-1.0)) + np.log(2.0)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(acc) == 0.5  # A tie is not a correct ranking.
  with_l2, _ = losses.bradley_terry_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0]), score_l2=0.1)
  np.testing.assert_allclose(with_l2 - loss, 0.1 * 0.5, rtol=1e-6)  # mean(r_w^2 + r_l^2) = 0.5


def test_sft_loss_counts_only_masked_targets():
  # Vocabulary of 2; uniform logits except position 1, which is sure of token 1.
  logits = jnp.zeros((1, 3, 2)).at[0, 1].set(jnp.array([-30.0, 30.0]))
  tokens = jnp.array([[0, 1, 1]])
  loss, n = losses.sft_loss(logits, tokens, jnp.array([[1, 1, 1]]))
  np.testing.assert_allclose(loss, np.log(2.0) / 2, atol=1e-6)  # log 2 for token 1, ~0 for token 2.
  assert float(n) == 2.0
  loss, n = losses.sft_loss(logits, tokens, jnp.array([[0, 0, 1]]))
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  assert float(n) == 1.0
