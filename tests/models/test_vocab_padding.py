"""Vocabulary padding (``model.vocab_multiple``): a padded model is the unpadded one, exactly.

The padded model is compared with an independent computation, the same model without padding: the
same real parameters, logits, SFT loss, log-probs, entropy, optimizer steps and samples; padded rows
stay zero and padded tokens are never drawn. Hugging Face import pads and export drops the rows
(checked against transformers), and the pipeline's models are padded so a (2,2,2) mesh splits the
offline world's 291-word vocabulary.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmscale import losses, rl_losses
from rmscale.data.world import World, WorldConfig
from rmscale.models import sizes
from rmscale.models.config import TransformerConfig
from rmscale.models.transformer import Transformer, init_params
from rmscale.parallel import mesh as mesh_lib
from rmscale.sampling import SamplingConfig, sample
from rmscale.stages import common, roles
from rmscale.train import sft
from rmscale.train.state import OptimConfig, init_state, make_optimizer, train_step

V, MULTIPLE, B, L = 291, 8, 4, 10
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # Compiling is most of this file's time.


def configs(family):
  plain = sizes.model_config("25k", vocab_size=V, family=family, n_layers=1, max_len=32)
  return plain, plain.replace(vocab_multiple=MULTIPLE)


@functools.lru_cache(maxsize=None)
def _init(cfg):
  return jax.jit(lambda k: init_params(cfg, k)[0], compiler_options=FAST_COMPILE)(jax.random.key(0))


def params_of(cfg, scale=1.0):
  """Initial parameters (jitted: op-by-op initialisation is slow), matrices scaled by ``scale``."""
  return jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, _init(cfg))


def logits_of(cfg, params, tok, mask):
  return jax.jit(Transformer(cfg).apply, compiler_options=FAST_COMPILE)(
    {"params": params}, tok, mask
  )


def tokens(seed):
  tok = np.random.default_rng(seed).integers(0, V, (B, L)).astype(np.int32)
  mask = np.ones((B, L), bool)
  mask[1, :3] = False
  return tok, mask


def test_padded_vocab_and_its_errors():
  assert configs("neox")[1].padded_vocab == 296 and configs("neox")[0].padded_vocab == V
  assert TransformerConfig(50304, 64, 1, 4, 128, vocab_multiple=128).padded_vocab == 50304
  assert TransformerConfig(50257, 64, 1, 4, 128, vocab_multiple=128).padded_vocab == 50304
  with pytest.raises(ValueError, match="model.vocab_multiple must be positive"):
    TransformerConfig(V, 64, 1, 4, 128, vocab_multiple=0)


@pytest.mark.parametrize("family", ["neox", "gpt2"])  # Separate LM head; tied to the embedding.
def test_padded_model_is_the_unpadded_model(family):
  plain, padded = configs(family)
  p, pp = params_of(plain), params_of(padded)
  # The real rows are drawn exactly as without padding; the padding is zero; the rest is untouched.
  tables = {"embed": ("embedding", 0), "lm_head": ("kernel", 1)}
  for name, (leaf, axis) in tables.items():
    if name not in p:
      assert family == "gpt2" and name not in pp  # Tied: the embedding is the head.
      continue
    table = np.asarray(pp[name][leaf])
    real = np.take(table, np.arange(V), axis=axis)
    pad = np.take(table, np.arange(V, padded.padded_vocab), axis=axis)
    np.testing.assert_array_equal(real, p[name][leaf])
    assert pad.shape[axis] == 5 and not pad.any()
  for name in set(p) - set(tables):
    jax.tree.map(np.testing.assert_array_equal, p[name], pp[name])
  assert sizes.count_params(padded)["total"] == sum(x.size for x in jax.tree.leaves(pp))

  tok, mask = tokens(0)
  logits, logits_p = logits_of(plain, p, tok, mask), logits_of(padded, pp, tok, mask)
  assert logits_p.shape == (B, L, 296)
  np.testing.assert_allclose(logits_p[..., :V], logits, atol=1e-6, rtol=0)
  assert np.all(logits_p[..., V:] == -1e30)
  # No probability on padded tokens: every log-probability and the entropy are the unpadded ones.
  np.testing.assert_allclose(
    losses.token_logprobs(logits_p, tok), losses.token_logprobs(logits, tok), atol=1e-6
  )
  np.testing.assert_allclose(
    rl_losses.token_entropy(logits_p), rl_losses.token_entropy(logits), atol=1e-6
  )
  assert np.all(jax.nn.softmax(logits_p)[..., V:] == 0)


@pytest.mark.parametrize("family", ["neox", "gpt2"])
def test_training_the_padded_model_matches_and_keeps_padding_zero(family):
  """AdamW with weight decay, 3 SFT steps: the same losses and real parameters; padding stays 0."""
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, weight_decay=0.1, total_steps=3))
  tok, mask = tokens(1)
  batch = {"tokens": tok, "mask": mask, "loss_mask": mask}

  def run(cfg):
    params = params_of(cfg)
    state = {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(1)),
    }
    step = jax.jit(
      lambda s, b: train_step(s, b, loss_fn=sft.make_sft_loss(cfg), tx=tx),
      compiler_options=FAST_COMPILE,
    )
    out = []
    for _ in range(3):
      state, metrics = step(state, batch)
      out.append(float(metrics["loss"]))
    return out, jax.device_get(state["params"])

  plain, padded = configs(family)
  (ref_losses, ref), (pad_losses, pp) = run(plain), run(padded)
  np.testing.assert_allclose(pad_losses, ref_losses, rtol=1e-6)
  assert pad_losses[-1] < pad_losses[0]
  np.testing.assert_allclose(pp["embed"]["embedding"][:V], ref["embed"]["embedding"], atol=1e-6)
  assert not pp["embed"]["embedding"][V:].any()
  if family == "neox":
    np.testing.assert_allclose(pp["lm_head"]["kernel"][:, :V], ref["lm_head"]["kernel"], atol=1e-6)
    assert not pp["lm_head"]["kernel"][:, V:].any()


@pytest.mark.parametrize(
  "scfg",
  [
    SamplingConfig(max_new_tokens=12, temperature=0.0),
    SamplingConfig(max_new_tokens=12, temperature=1.5),
    SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9),
  ],
  ids=["greedy", "hot", "top_k_p"],
)
def test_sampler_never_draws_padding_and_matches_unpadded(scfg):
  plain, padded = configs("neox")
  # Scaled-down weights flatten the distribution: at temperature 1.5 every token has mass, so a
  # padded token would be drawn if the mask leaked probability to it.
  tok, mask = tokens(2)
  prompt, prompt_mask = tok[:, :4], mask[:, :4]

  def run(cfg):
    sampler = jax.jit(
      functools.partial(sample, model_cfg=cfg, scfg=scfg), compiler_options=FAST_COMPILE
    )
    return sampler(params_of(cfg, 0.1), prompt, prompt_mask, jax.random.key(5))

  out, out_p = run(plain), run(padded)
  np.testing.assert_array_equal(out_p["tokens"], out["tokens"])
  np.testing.assert_allclose(out_p["logprobs"], out["logprobs"], atol=1e-5)
  assert int(out_p["tokens"].max()) < V
  if scfg.temperature == 1.5:
    assert len(np.unique(out_p["tokens"])) > 30  # Spread over the vocabulary, up to its end.


def test_pipeline_models_split_the_offline_vocabulary_on_a_tensor_mesh():
  """The offline world's 291 words on a (2,2,2) mesh: the pipeline pads its models (one line in
  rmscale/stages/common.py) and the vocabulary tables split 4 ways over (tensor, fsdp)."""
  sys.path.insert(0, ROOT)
  from configs import quickstart

  config = quickstart.get_config("tiny")
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
  ctx = common.Context(
    config=config,
    workdir="",
    mesh=mesh,
    rules=mesh_lib.rules_from_config(config.rules),
    world=World(WorldConfig(**config.world)),
  )
  assert ctx.world.tokenizer.vocab_size == V
  policy = roles.model_config(ctx, config.policy.size, "policy")
  rm_cfg = roles.model_config(ctx, config.proxies.sizes[0], "rm")
  assert policy.vocab_size == rm_cfg.vocab_size == V
  assert policy.padded_vocab == rm_cfg.padded_vocab == 296
  tx = make_optimizer(OptimConfig())
  state, _ = init_state(
    policy, tx, jax.random.key(0), mesh, ctx.rules, compiler_options=FAST_COMPILE
  )
  emb = state["params"]["embed"]["embedding"]
  assert {s.data.shape for s in emb.addressable_shards} == {(148, policy.d_model // 2)}
  assert not np.asarray(emb)[V:].any()
  for cfg in (policy, rm_cfg):  # The parameter shardings every stage derives from the config.
    spec = common.param_shardings(ctx, cfg)["embed"]["embedding"].spec
    assert spec == jax.sharding.PartitionSpec("tensor", "fsdp")


# -- Hugging Face ------------------------------------------------------------------------------


def _hf_model(family, out_dir, vocab):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  common_kw = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  if family == "neox":
    config = transformers.GPTNeoXConfig(
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=32,
      **common_kw,
    )
    cls = transformers.GPTNeoXForCausalLM
  else:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32, **common_kw)
    cls = transformers.GPT2LMHeadModel
  torch.manual_seed(0)
  model = cls._from_config(config, attn_implementation="eager").float().eval()
  with torch.no_grad():  # Weights large enough that logits are O(1).
    for p in model.parameters():
      if p.ndim > 1:
        p.mul_(7.0)
  model.save_pretrained(out_dir)
  return model, cls


def _hf_logits(model, tok):
  import torch

  with torch.no_grad():
    return model(input_ids=torch.tensor(tok, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("family", ["neox", "gpt2"])
def test_hf_import_pads_and_export_keeps_hf_shapes(family, tmp_path):
  from rmscale import hf

  vocab = 100  # Not a multiple of 8.
  ref, cls = _hf_model(family, str(tmp_path / "in"), vocab)
  model, params = hf.load_pretrained(str(tmp_path / "in"), vocab_multiple=MULTIPLE)
  assert model.cfg.vocab_size == vocab and model.cfg.padded_vocab == 104
  assert params["embed"]["embedding"].shape == (104, 32)
  assert not np.asarray(params["embed"]["embedding"])[vocab:].any()
  tok = np.random.default_rng(0).integers(0, vocab, (2, 8))
  ours = np.asarray(logits_of(model.cfg, params, tok, np.ones_like(tok, bool)))
  expected = _hf_logits(ref, tok)
  assert expected.std() > 0.3
  np.testing.assert_allclose(ours[..., :vocab], expected, atol=1e-4, rtol=0)

  hf.save_pretrained(model.cfg, params, str(tmp_path / "out"))
  back = cls.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
  assert back.config.vocab_size == vocab
  assert tuple(back.get_input_embeddings().weight.shape) == (vocab, 32)
  assert tuple(back.get_output_embeddings().weight.shape) == (vocab, 32)
  np.testing.assert_allclose(_hf_logits(back, tok), expected, atol=1e-4, rtol=0)
  # Unpadded import of the export: the same real parameters.
  _, plain = hf.load_pretrained(str(tmp_path / "out"))
  np.testing.assert_array_equal(
    plain["embed"]["embedding"], np.asarray(params["embed"]["embedding"])[:vocab]
  )
