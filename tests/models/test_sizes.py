import jax
import numpy as np
import pytest

from rmscale.models import sizes
from rmscale.models.transformer import abstract_params

GAO = {
  "3m": 3e6,
  "12m": 12e6,
  "25m": 25e6,
  "42m": 42e6,
  "85m": 85e6,
  "300m": 300e6,
  "680m": 680e6,
  "1.2b": 1.2e9,
  "3b": 3e9,
}


@pytest.mark.parametrize("name,target", GAO.items())
def test_gao_ladder_within_ten_percent(name, target):
  assert abs(sizes.size_params(name) / target - 1) < 0.10


@pytest.mark.parametrize(
  "name,kw",
  [
    ("100k", dict(vocab_size=300, reward_head="linear")),
    ("400k", dict(vocab_size=300, reward_head="mlp", value_head=True)),
    ("pythia-70m", {}),
    ("gpt2", dict(value_head=True)),
    ("llama-7b", dict(n_kv_heads=8)),
  ],
)
def test_count_matches_initialised_tree(name, kw):
  vocab = kw.pop("vocab_size", None)
  cfg = sizes.model_config(name, vocab_size=vocab, **kw)
  shapes, _ = abstract_params(cfg)
  assert sizes.count_params(cfg)["total"] == sum(
    int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)
  )


def test_known_checkpoint_counts():
  # Published totals: Pythia-70M 70,426,624; GPT-2 124,439,808; Llama-2-7B 6,738,415,616.
  assert sizes.count_params(sizes.model_config("pythia-70m"))["total"] == 70_426_624
  assert sizes.count_params(sizes.model_config("gpt2"))["total"] == 124_439_808
  assert sizes.count_params(sizes.model_config("llama-7b"))["total"] == 6_738_415_616


def test_unknown_size_is_named():
  with pytest.raises(ValueError, match="unknown model size 'huge'"):
    sizes.model_config("huge", vocab_size=10)
