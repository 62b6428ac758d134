"""Hugging Face import/export: parity with transformers' PyTorch models (an independent implementation).

Tiny random models of each family are built with transformers, their weights re-drawn at a scale that
makes logits O(1) (so a layout mistake cannot hide under the 1e-4 tolerance), saved as safetensors,
loaded with rmscale and compared on random tokens with right and left padding.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rmscale import hf  # noqa: E402
from rmscale.models.transformer import Transformer, abstract_params, init_params  # noqa: E402
from rmscale.parallel import mesh as mesh_lib  # noqa: E402

V, PAD, B, L = 128, 0, 3, 9
TOL = 1e-4


def _hf_config(family: str, **kw):
  """Tiny configs; llama_tied adds GQA's cousin features: a decoupled head_dim, biases, tied head."""
  common = dict(vocab_size=V, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
  if family == "neox":
    return transformers.GPTNeoXConfig(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      rotary_pct=0.5,
      rotary_emb_base=500.0,
      max_position_embeddings=64,
      **common,
      **kw,
    )
  if family == "llama":  # GQA: 2 key/value heads shared by 4 query heads.
    return transformers.LlamaConfig(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      intermediate_size=48,
      rope_theta=500.0,
      rms_norm_eps=1e-5,
      max_position_embeddings=64,
      **common,
      **kw,
    )
  if family == "llama_tied":
    return transformers.LlamaConfig(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=1,
      head_dim=16,
      intermediate_size=48,
      attention_bias=True,
      mlp_bias=True,
      tie_word_embeddings=True,
      max_position_embeddings=64,
      **common,
      **kw,
    )
  assert family == "gpt2"
  return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common, **kw)


_CAUSAL = {
  "neox": transformers.GPTNeoXForCausalLM,
  "llama": transformers.LlamaForCausalLM,
  "llama_tied": transformers.LlamaForCausalLM,
  "gpt2": transformers.GPT2LMHeadModel,
}
_SEQCLS = {
  "neox": transformers.GPTNeoXForSequenceClassification,
  "llama": transformers.LlamaForSequenceClassification,
  "gpt2": transformers.GPT2ForSequenceClassification,
}
FAMILIES = ["neox", "llama", "llama_tied", "gpt2"]


def _build(cls, config, seed: int, out_dir: str, **save_kw):
  torch.manual_seed(seed)
  model = cls._from_config(config, attn_implementation="eager").float().eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:  # Norm scales near 1, biases near 0.
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
      else:
        p.copy_(0.15 * noise)
  model.save_pretrained(out_dir, **save_kw)
  return model


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
  """family -> (directory, transformers model) of a causal LM."""
  root = tmp_path_factory.mktemp("causal")
  return {
    f: (str(root / f), _build(_CAUSAL[f], _hf_config(f), i, str(root / f)))
    for i, f in enumerate(FAMILIES)
  }


@pytest.fixture(scope="module")
def seqcls(tmp_path_factory):
  root = tmp_path_factory.mktemp("seqcls")
  return {
    f: (str(root / f), _build(_SEQCLS[f], _hf_config(f, num_labels=1), 10 + i, str(root / f)))
    for i, f in enumerate(_SEQCLS)
  }


def _tokens(seed: int, pad_value=None):
  """Row 0 full, row 1 right-padded (5 real), row 2 left-padded (6 real); real tokens never PAD."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(1, V, (B, L))
  mask = np.ones((B, L), bool)
  mask[1, 5:] = False
  mask[2, :3] = False
  if pad_value is not None:
    tokens = np.where(mask, tokens, pad_value)
  return tokens, mask


def _positions(mask):
  return np.maximum(np.cumsum(mask, 1) - 1, 0)


def _hf_logits(model, tokens, mask):
  """HF's logits with rmscale's default positions (HF counts pads in positions unless told)."""
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(tokens),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(_positions(mask)),
    )
  return out.logits.numpy()


def _assert_same_logits(model, ref_model, seed: int) -> None:
  """Both HF models give the same logits on the real tokens of ``_tokens(seed)`` (within TOL)."""
  tokens, mask = _tokens(seed)
  np.testing.assert_allclose(
    _hf_logits(model.eval(), tokens, mask)[mask],
    _hf_logits(ref_model, tokens, mask)[mask],
    atol=TOL,
    rtol=0,
  )


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_padding(causal, family):
  directory, ref_model = causal[family]
  model, params = hf.load_pretrained(directory)
  tokens, mask = _tokens(0)  # Pads hold random real tokens: the mask alone must hide them.
  ours = np.asarray(model.apply({"params": params}, tokens, mask))
  ref = _hf_logits(ref_model, tokens, mask)
  assert ref[mask].std() > 0.3  # Logits large enough for the tolerance to mean something.
  np.testing.assert_allclose(ours[mask], ref[mask], atol=TOL, rtol=0)
  # Right padding needs no explicit positions on the HF side.
  with torch.no_grad():
    plain = ref_model(
      input_ids=torch.tensor(tokens[:2]), attention_mask=torch.tensor(mask[:2].astype(np.int64))
    ).logits.numpy()
  np.testing.assert_allclose(ours[:2][mask[:2]], plain[mask[:2]], atol=TOL, rtol=0)


def test_config_maps_family_features(causal):
  expect = {
    "neox": dict(
      norm="layernorm",
      rotary_pct=0.5,
      rope_theta=500.0,
      parallel_residual=True,
      activation="gelu",
      tie_embeddings=False,
    ),
    "llama": dict(
      norm="rmsnorm",
      activation="swiglu",
      n_kv_heads=2,
      rope_theta=500.0,
      norm_eps=1e-5,
      qkv_bias=False,
      tie_embeddings=False,
    ),
    "llama_tied": dict(
      n_kv_heads=1, head_dim=16, qkv_bias=True, mlp_bias=True, tie_embeddings=True
    ),
    "gpt2": dict(position="learned", activation="gelu_tanh", max_len=64, tie_embeddings=True),
  }
  for family, fields in expect.items():
    cfg = hf.load_config(causal[family][0])
    assert {k: getattr(cfg, k) for k in fields} == fields, family
    assert (cfg.lm_head, cfg.reward_head, cfg.value_head) == (True, "none", False)


@pytest.mark.parametrize("family", list(_SEQCLS))
def test_reward_matches_sequence_classification(seqcls, family, tmp_path):
  directory, ref_model = seqcls[family]
  model, params = hf.load_pretrained(directory)
  assert model.cfg.reward_head == "linear" and not model.cfg.lm_head and "lm_head" not in params
  tokens, mask = _tokens(1, pad_value=PAD)  # HF finds the last token by pad_token_id.
  with torch.no_grad():
    ref = ref_model(
      input_ids=torch.tensor(tokens),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(_positions(mask)),
    ).logits.numpy()[:, 0]
  ours = np.asarray(
    model.apply({"params": params}, tokens, mask, method=Transformer.forward)["reward"]
  )
  assert np.abs(ref).max() > 0.3
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)

  # Export as a SequenceClassification model; transformers reads the same scores back.
  hf.save_pretrained(model.cfg, params, str(tmp_path), extra_config={"pad_token_id": PAD})
  assert json.load(open(tmp_path / "config.json"))["architectures"] == [type(ref_model).__name__]
  back = transformers.AutoModelForSequenceClassification.from_pretrained(
    str(tmp_path), attn_implementation="eager"
  ).eval()
  with torch.no_grad():
    again = back(
      input_ids=torch.tensor(tokens),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(_positions(mask)),
    ).logits.numpy()[:, 0]
  np.testing.assert_allclose(again, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(causal, family, tmp_path):
  directory, ref_model = causal[family]
  model, params = hf.load_pretrained(directory)
  hf.save_pretrained(model.cfg, params, str(tmp_path))
  back = _CAUSAL[family].from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  tokens, mask = _tokens(2)
  np.testing.assert_allclose(
    _hf_logits(back, tokens, mask)[mask],
    _hf_logits(ref_model, tokens, mask)[mask],
    atol=TOL,
    rtol=0,
  )
  # And rmscale reads its own export back to the identical tree.
  model2, params2 = hf.load_pretrained(str(tmp_path))
  assert model2.cfg == model.cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoints_both_ways(causal, tmp_path):
  directory, ref_model = causal["llama"]
  ref_model.save_pretrained(tmp_path / "in", max_shard_size="20KB")
  with open(tmp_path / "in" / hf._INDEX) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  _, whole = hf.load_pretrained(directory)
  model, sharded = hf.load_pretrained(str(tmp_path / "in"))
  jax.tree.map(np.testing.assert_array_equal, sharded, whole)

  files = hf.save_pretrained(model.cfg, sharded, str(tmp_path / "out"), max_shard_size="20KB")
  assert sum(f.endswith(".safetensors") for f in files) > 1
  assert not os.path.exists(tmp_path / "out" / hf._SINGLE)
  back = transformers.LlamaForCausalLM.from_pretrained(
    str(tmp_path / "out"), attn_implementation="eager"
  )
  _assert_same_logits(back, ref_model, 3)
  # A later unsharded export into the same directory removes the stale shards.
  files = hf.save_pretrained(model.cfg, sharded, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


def test_loads_straight_into_target_sharding(causal):
  directory, ref_model = causal["neox"]
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

  def shardings(cfg):
    return mesh_lib.logical_shardings(*abstract_params(cfg), mesh)

  model, params = hf.load_pretrained(directory, shardings=shardings)
  expected = shardings(model.cfg)
  jax.tree.map(lambda x, s: assert_same_sharding(x, s), params, expected)
  assert params["layers_0"]["attn"]["query"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
    "fsdp", "tensor", None
  )
  tokens, mask = _tokens(4)
  with mesh_lib.sharding_context(mesh):
    ours = np.asarray(jax.jit(model.apply)({"params": params}, tokens, mask))
  np.testing.assert_allclose(
    ours[mask], _hf_logits(ref_model, tokens, mask)[mask], atol=TOL, rtol=0
  )
  # One sharding for every parameter.
  _, replicated = hf.load_pretrained(directory, shardings=mesh_lib.replicated(mesh))
  assert all(x.sharding == mesh_lib.replicated(mesh) for x in jax.tree.leaves(replicated))
  jax.tree.map(np.testing.assert_array_equal, replicated, params)


def assert_same_sharding(x, s):
  assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def test_fresh_heads_equal_full_init_and_leave_trunk_alone(causal):
  directory, ref_model = causal["llama"]
  with pytest.raises(ValueError, match="rng"):
    hf.load_pretrained(directory, reward_head="linear")
  rng = jax.random.key(7)
  model, params = hf.load_pretrained(directory, reward_head="linear", value_head=True, rng=rng)
  assert params["reward_head"]["score"]["kernel"].shape == (32, 1)
  assert params["value_head"]["kernel"].shape == (32, 1)
  full, _ = init_params(model.cfg, rng)  # What a from-scratch model with this rng would hold.
  for head in ("reward_head", "value_head"):
    jax.tree.map(np.testing.assert_array_equal, params[head], full[head])
  tokens, mask = _tokens(5)
  out = model.apply({"params": params}, tokens, mask, method=Transformer.forward)
  np.testing.assert_allclose(
    np.asarray(out["logits"])[mask], _hf_logits(ref_model, tokens, mask)[mask], atol=TOL, rtol=0
  )
  assert out["reward"].shape == (B,) and out["value"].shape == (B, L)
  # An RM without the LM head, and an MLP head.
  model, params = hf.load_pretrained(directory, reward_head="mlp", lm_head=False, rng=rng)
  assert "lm_head" not in params and "hidden" in params["reward_head"]


def test_bfloat16_checkpoint_reads_exactly(tmp_path):
  model = _build(transformers.LlamaForCausalLM, _hf_config("llama"), 3, str(tmp_path / "f32"))
  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  want = model.model.embed_tokens.weight.float().detach().numpy()
  _, params = hf.load_pretrained(str(tmp_path / "bf16"))
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), want)
  _, params = hf.load_pretrained(str(tmp_path / "bf16"), param_dtype="bfloat16", dtype="bfloat16")
  assert params["embed"]["embedding"].dtype == jnp.bfloat16


def test_safetensors_writer_is_read_by_the_reference_library(tmp_path):
  from safetensors import safe_open

  rs = np.random.RandomState(0)
  arrays = {
    "a": rs.randn(3, 5).astype(np.float32),
    "b": rs.randn(7).astype(np.float16),
    "c": rs.randn(2, 2, 3).astype(jnp.bfloat16),
    "d": np.arange(5, dtype=np.int64),
  }
  path = str(tmp_path / "x.safetensors")
  hf.write_safetensors(path, [(k, v.dtype, v.shape) for k, v in arrays.items()], arrays.values())
  with safe_open(path, framework="pt") as f:
    assert sorted(f.keys()) == sorted(arrays)
    for k, v in arrays.items():
      np.testing.assert_array_equal(f.get_tensor(k).float().numpy(), v.astype(np.float32))
  infos = hf.read_safetensors_header(path)
  for k, v in arrays.items():
    np.testing.assert_array_equal(hf._read_tensor(infos[k]), v)


def test_reads_openai_gpt2_layout(causal, tmp_path):
  """OpenAI's gpt2 files have no ``transformer.`` prefix and carry causal-mask buffers."""
  d = str(tmp_path / "openai")
  shutil.copytree(causal["gpt2"][0], d)

  def strip(t):
    for name in list(t):
      t[name.removeprefix("transformer.")] = t.pop(name)
    t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))

  _rewrite_tensors(d, strip)
  _, params = hf.load_pretrained(d)
  _, want = hf.load_pretrained(causal["gpt2"][0])
  jax.tree.map(np.testing.assert_array_equal, params, want)


# -- malformed inputs: errors name the file and the field ------------------------------------------


def _copy_dir(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _edit_config(directory, **fields):
  path = os.path.join(directory, "config.json")
  cfg = json.load(open(path))
  cfg.update(fields)
  json.dump(cfg, open(path, "w"))


def _rewrite_tensors(directory, edit):
  from safetensors.numpy import load_file, save_file

  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_error_missing_shard_file(causal, tmp_path):
  causal["neox"][1].save_pretrained(tmp_path / "d", max_shard_size="20KB")
  index = json.load(open(tmp_path / "d" / hf._INDEX))
  victim = sorted(set(index["weight_map"].values()))[1]
  os.remove(tmp_path / "d" / victim)
  with pytest.raises(ValueError, match=rf"{hf._INDEX}.*shard file '{victim}'.*missing"):
    hf.load_pretrained(str(tmp_path / "d"))


def test_error_unknown_model_type_and_architecture(causal, tmp_path):
  d = _copy_dir(causal["neox"][0], tmp_path / "a")
  _edit_config(d, model_type="mamba")
  with pytest.raises(ValueError, match=r"config\.json: field 'model_type'='mamba'"):
    hf.load_pretrained(d)
  _edit_config(d, model_type="gpt_neox", architectures=["GPTNeoXForTokenClassification"])
  with pytest.raises(
    ValueError, match=r"config\.json: field 'architectures'.*GPTNeoXForTokenClassification"
  ):
    hf.load_pretrained(d)


def test_error_missing_and_unexpected_tensors(causal, tmp_path):
  d = _copy_dir(causal["gpt2"][0], tmp_path / "a")
  _rewrite_tensors(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
  with pytest.raises(ValueError, match=r"missing tensors \['transformer\.h\.1\.mlp\.c_fc\.bias'\]"):
    hf.load_pretrained(d)
  d = _copy_dir(causal["gpt2"][0], tmp_path / "b")
  _rewrite_tensors(d, lambda t: t.update({"transformer.h.0.attn.extra": np.zeros(3, np.float32)}))
  with pytest.raises(
    ValueError,
    match=r"unexpected tensors \['transformer\.h\.0\.attn\.extra'\].*"
    r"model\.safetensors",
  ):
    hf.load_pretrained(d)


def test_error_vocab_mismatch_names_tensor_and_shapes(causal, tmp_path):
  d = _copy_dir(causal["neox"][0], tmp_path / "a")
  _edit_config(d, vocab_size=V + 8)
  with pytest.raises(
    ValueError,
    match=rf"model\.safetensors: tensor '(gpt_neox\.embed_in|embed_out)"
    rf"\.weight' has shape \({V}, 32\) but .*config\.json "
    rf"implies \({V + 8}, 32\)",
  ):
    hf.load_pretrained(d)


def test_error_truncated_and_corrupt_files(causal, tmp_path):
  d = _copy_dir(causal["llama"][0], tmp_path / "a")
  path = os.path.join(d, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated safetensors file: tensor"):
    hf.load_pretrained(d)
  with open(path, "wb") as f:
    f.write(b"\xff" * 64)
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated or corrupt"):
    hf.load_pretrained(d)
  os.remove(path)
  with pytest.raises(
    ValueError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"
  ):
    hf.load_pretrained(d)


def test_error_unsupported_config_fields(causal, tmp_path):
  d = _copy_dir(causal["llama"][0], tmp_path / "a")
  _edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0})
  with pytest.raises(ValueError, match=r"config\.json: rope type 'llama3'"):
    hf.load_pretrained(d)
  _edit_config(d, rope_parameters=None, num_hidden_layers="two")
  with pytest.raises(
    ValueError, match=r"config\.json: field 'num_hidden_layers' must be a positive integer"
  ):
    hf.load_pretrained(d)


def test_export_rejects_what_hf_cannot_hold(causal, tmp_path):
  model, params = hf.load_pretrained(causal["gpt2"][0], reward_head="mlp", rng=jax.random.key(0))
  with pytest.raises(ValueError, match="reward_head='mlp'"):
    hf.save_pretrained(model.cfg, params, str(tmp_path))
  cfg = model.cfg.replace(reward_head="none", norm="rmsnorm")
  with pytest.raises(ValueError, match=r"gpt2: model\.norm='rmsnorm'"):
    hf.save_pretrained(cfg, params, str(tmp_path))
  with pytest.raises(ValueError, match=r"params leaf layers_0/attn/query/kernel has shape"):
    hf.save_pretrained(model.cfg.replace(reward_head="none", n_heads=2), params, str(tmp_path))
  assert not os.listdir(tmp_path)  # Nothing half-written.


def test_cli_convert_then_export(causal, tmp_path):
  directory, ref_model = causal["gpt2"]
  hf.main(["convert", f"--hf_dir={directory}", f"--out={tmp_path / 'ckpt'}"])
  hf.main(["export", f"--ckpt={tmp_path / 'ckpt'}", f"--out={tmp_path / 'hf'}"])
  back = transformers.GPT2LMHeadModel.from_pretrained(
    str(tmp_path / "hf"), attn_implementation="eager"
  )
  assert back.config.pad_token_id == PAD  # Special-token ids survive the trip.
  _assert_same_logits(back, ref_model, 6)


def test_cli_takes_paths_as_a_user_types_them(causal, cli):
  directory, ref_model = causal["gpt2"]
  shutil.copytree(directory, cli.home / "models" / "gpt2")
  p = cli("rmscale.hf", "convert", "--hf_dir=~/models/gpt2", "--out=ckpt")
  assert p.returncode == 0, p.stderr
  assert f"wrote {cli.cwd / 'ckpt'} (step 0)" in p.stdout
  p = cli("rmscale.hf", "export", "--ckpt=ckpt", "--out=~/hf")
  assert p.returncode == 0, p.stderr
  assert not (cli.cwd / "~").exists()
  back = transformers.GPT2LMHeadModel.from_pretrained(
    str(cli.home / "hf"), attn_implementation="eager"
  )
  _assert_same_logits(back, ref_model, 6)
  # A Hugging Face directory is local; an empty path is named.
  p = cli("rmscale.hf", "export", "--ckpt=ckpt", "--out=gs://bucket/hf")
  assert p.returncode == 2 and "--out='gs://bucket/hf': give a local directory\n" in p.stderr
  p = cli("rmscale.hf", "convert", "--hf_dir=~/models/gpt2", "--out=")
  assert p.returncode == 2 and "--out='': give a local directory or a gs:// URL" in p.stderr
