"""configs/overopt_pythia.py end to end on tiny random GPT-NeoX checkpoints and an HH-RLHF fixture.

transformers + PyTorch build the checkpoints (a policy LM, two proxy LMs of different sizes, a
sequence-classification gold RM) and a word-level tokenizer; the experiment runs every stage on
them; the gold labels are checked against PyTorch's own scoring of the labelled sequences.
"""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rmscale import pipeline, results  # noqa: E402
from rmscale import aot  # noqa: E402
from rmscale.stages import label, roles  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name, *path):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, *path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


overopt_pythia = _module("overopt_pythia", "configs", "overopt_pythia.py")
fixtures = _module("preference_fixtures", "tests", "data", "test_preferences.py")

H, A = fixtures.H, fixtures.A
TOPICS = "cat dog sun rain tree road ship bird fish lamp book song".split()
REPLIES = "yes no maybe good bad fine sure never often".split()
WORDS = ["Human", ":", "Assistant", "?", "."] + TOPICS + REPLIES + ["long"]
V = 64  # Model vocabulary (the tokenizer has 2 specials + 27 words: fewer, as with Pythia's 50,277 vs 50,304).
ARGS = "policy=tiny-policy,rm=tiny-rm-a+tiny-rm-b,gold=tiny-gold,shrink"


def _hh_rows(n: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    t = rng.choice(TOPICS, 2, replace=False)
    good, bad = rng.choice(REPLIES, 2, replace=False)
    prompt = f"{H} {t[0]} {t[1]} ?{A}"
    rows.append({"chosen": f"{prompt} {good} .", "rejected": f"{prompt} {bad} {bad} ."})
  return rows


def _save(model, path, seed):
  """Weights redrawn at a scale that makes outputs O(1), so scores and samples differ visibly."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_((1.0 + 0.1 * noise) if p.ndim == 1 and name.endswith("weight") else 0.15 * noise)
  model.save_pretrained(path)
  return model


def _neox(hidden, layers, heads, vocab=V, **kw):
  return transformers.GPTNeoXConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    intermediate_size=2 * hidden,
    rotary_pct=0.25,
    max_position_embeddings=64,
    eos_token_id=0,
    bos_token_id=0,
    **kw,
  )


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
  """<root>/ckpts/{tiny-policy,tiny-rm-a,tiny-rm-b,tiny-gold} and <root>/raw/hh_rlhf, as the config
  documents; returns (root, gold torch model, {proxy name: torch model})."""
  root = tmp_path_factory.mktemp("real")
  ckpts = root / "ckpts"
  torch.manual_seed(0)
  causal = transformers.GPTNeoXForCausalLM
  _save(causal._from_config(_neox(32, 2, 4), attn_implementation="eager"), ckpts / "tiny-policy", 1)
  proxies = {
    "tiny-rm-a": _save(causal._from_config(_neox(16, 1, 2)), ckpts / "tiny-rm-a", 2),
    "tiny-rm-b": _save(causal._from_config(_neox(32, 2, 4)), ckpts / "tiny-rm-b", 3),
  }
  gold = _save(
    transformers.GPTNeoXForSequenceClassification._from_config(
      _neox(32, 2, 4, num_labels=1), attn_implementation="eager"
    ),
    ckpts / "tiny-gold",
    4,
  ).eval()
  # Pythia's convention: EOS <|endoftext|> = 0 and no pad token (rmscale pads with EOS, masks decide).
  fixtures.word_tokenizer(ckpts / "tiny-policy", words=WORDS, pad=False)
  test_rows = _hh_rows(8, 1) + [
    {
      "chosen": f"{H} {' '.join(['long'] * 12)} ?{A} yes .",
      "rejected": f"{H} {' '.join(['long'] * 12)} ?{A} no .",
    }
  ]  # The last prompt (16 + 1 tokens) is longer than data.prompt_len = 16: filtered out.
  fixtures.write_hh(str(root / "raw" / "hh_rlhf"), train=_hh_rows(24, 0), test=test_rows)
  return str(root), gold, proxies


@pytest.fixture(scope="module")
def finished(real_root, tmp_path_factory):
  root, _, _ = real_root
  workdir = str(tmp_path_factory.mktemp("work") / "run")
  # PPO would double the run time (its compiled step dominates); tests/test_pipeline.py covers it.
  # Best-of-n alone is cheap: against both proxies (shrink optimises against the first only).
  config = overopt_pythia.get_config(f"root={root},{ARGS},methods=bon")
  config.optimise.proxies = ()
  summary = pipeline.run(config, workdir)
  return workdir, summary


def _torch_reward(model, tokens, mask) -> np.ndarray:
  """HF's score of each row with its padding removed (so no pad-token convention is involved)."""
  out = []
  with torch.no_grad():
    for t, m in zip(tokens, mask):
      ids = torch.tensor(t[m.astype(bool)][None].astype(np.int64))
      out.append(float(model(input_ids=ids).logits[0, 0]))
  return np.array(out)


def test_every_stage_runs_on_checkpoints_and_data(finished, real_root):
  workdir, summary = finished
  root, gold_model, proxy_models = real_root
  stages = ("policy_init", "gold", "label", "proxies", "reference", "optimise", "fit")
  info = {s: results.read_json(os.path.join(workdir, "stages", f"{s}.json")) for s in stages}
  assert info["policy_init"]["sft"] is True and math.isfinite(info["policy_init"]["final_loss"])
  assert info["policy_init"]["hf_dir"] == os.path.join(root, "ckpts", "tiny-policy")

  # The gold RM is measured on the dataset's held-out pairs that fit (8 of 9; one prompt too long).
  g = info["gold"]
  assert (g["kind"], g["heldout_comparisons"]) == ("hf", 8)
  assert g["heldout_filter"]["dropped_prompt_too_long"] == 1
  assert 0.0 <= g["heldout_accuracy"] <= 1.0 and math.isfinite(g["heldout_loss"])

  # Labels: the sample with the higher gold score is chosen, and the gold scores are PyTorch's.
  train, val = label.load(_Ctx(workdir))
  assert len(train["chosen"]) == 48 and len(val["chosen"]) == 16
  assert np.all(train["gold_chosen"] >= train["gold_rejected"])
  assert np.all(val["gold_chosen"] >= val["gold_rejected"])
  for side in ("chosen", "rejected"):
    want = _torch_reward(gold_model, train[side][:12], train[f"{side}_mask"][:12])
    np.testing.assert_allclose(train[f"gold_{side}"][:12], want, atol=1e-4)
  # The [left-padded prompt (16) | right-padded response (8)] layout: prompts end at position 16.
  assert train["chosen"].shape == (48, 24)
  assert np.all(train["chosen_mask"][:, 15]) and np.all(train["chosen_mask"][:, 16])

  # Proxies start from the two checkpoints: their sizes are the checkpoints' own.
  recs = {
    r["name"]: r for r in results.read_jsonl(os.path.join(workdir, "results", "proxies.jsonl"))
  }
  assert sorted(recs) == ["tiny-rm-a_d48_s0", "tiny-rm-b_d48_s0"]
  for name, model in proxy_models.items():
    non_embedding = sum(
      p.numel()
      for n, p in model.named_parameters()
      if not n.endswith(("embed_in.weight", "embed_out.weight", "lm_head.weight"))
    )
    rec = recs[f"{name}_d48_s0"]
    assert rec["rm_params"] == non_embedding
    assert math.isfinite(rec["val_loss"]) and 0.0 <= rec["val_accuracy"] <= 1.0

  # The reference stage: the initial policy's samples on the 8 held-out prompts, 8 each.
  assert (info["reference"]["num_prompts"], info["reference"]["samples_per_prompt"]) == (8, 8)
  samples = results.read_npz(os.path.join(workdir, "reference", "samples.npz"))
  assert samples["gold"].shape == (8, 8) and samples["proxy"].shape == (2, 8, 8)
  assert info["optimise"]["methods"] == ["bon"]
  assert info["optimise"]["fingerprint"]["methods"] == ["bon"]

  bon = results.read_jsonl(os.path.join(workdir, "results", "curves.jsonl"))
  assert len(bon) == 2 * 3  # Two proxies x num_n.
  for r in bon:
    assert (r["method"], r["form"], r["x"]) == ("bon", "bon", "n")
    assert all(math.isfinite(r[k]) for k in ("gold", "proxy", "kl", "d"))
    assert math.isnan(r["utility"])  # Real data has no hidden utility.
  n1 = [r for r in bon if r["n"] == 1]
  np.testing.assert_allclose([r["gold"] for r in n1], 0.0, atol=1e-9)  # Recentred on the policy.

  fits = results.read_jsonl(os.path.join(workdir, "results", "fits.jsonl"))
  assert sorted((f["method"], f["form"]) for f in fits) == [("bon", "bon")] * 2
  assert all(math.isfinite(f["alpha"]) and math.isfinite(f["beta"]) for f in fits)
  by_method = results.read_jsonl(os.path.join(workdir, "results", "methods.jsonl"))
  assert sorted((r["method"], r["name"]) for r in by_method) == [
    ("bon", "tiny-rm-a_d48_s0"),
    ("bon", "tiny-rm-b_d48_s0"),
  ]
  assert "Proxy reward models" in summary
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["data"]["kind"] == "preferences"


def test_memory_report_compiles_at_the_datasets_sequence_lengths(real_root):
  root, _, _ = real_root
  config = overopt_pythia.get_config(f"root={root},{ARGS}")
  config.stages = "proxies"
  (_, _, batch, compiled), *_ = aot.compile_steps(config, kinds=("score",))
  tokens = compiled.args_info[0][1]
  seq = config.data.prompt_len + config.data.response_len  # 16 + 8 under 'shrink', not the world's.
  assert tokens.shape == (batch, seq)


def test_gold_with_its_own_tokenizer_scores_through_text(real_root, tmp_path):
  """A gold RM with another tokenizer directory reads sequences as text, re-tokenised into its own
  layout; with the same vocabulary underneath, its scores equal the direct ones. (Dataset pairs, not
  policy samples: a random policy emits ids beyond the tokenizer's vocabulary, which text drops.)"""
  import shutil

  root, _, _ = real_root
  own = shutil.copytree(os.path.join(root, "ckpts", "tiny-policy"), tmp_path / "gold-tokenizer")
  for f in os.listdir(own):
    if not f.startswith("tokenizer"):
      os.remove(own / f)
  c = overopt_pythia.get_config(f"root={root},{ARGS}")
  direct = pipeline.make_context(c, str(tmp_path / "w1"))
  pairs, _ = direct.world.comparisons("train", 16)
  want = roles.gold_fn(direct)(pairs["chosen"], pairs["chosen_mask"])
  c.gold.tokenizer_dir = str(own)
  c.gold.prompt_len, c.gold.response_len = 20, 8  # Its own layout: longer prompts.
  via_text = pipeline.make_context(c, str(tmp_path / "w2"))
  got = roles.gold_fn(via_text)(pairs["chosen"], pairs["chosen_mask"])
  np.testing.assert_allclose(got, want, atol=1e-5)
  for ctx in (direct, via_text):
    ctx.writer.close()


class _Ctx:  # label.load needs only ctx.path.
  def __init__(self, workdir):
    self.workdir = workdir

  def path(self, *parts):
    return os.path.join(self.workdir, *parts)


def test_config_defaults_and_paths_follow_root():
  c = overopt_pythia.get_config("root=/mnt/d")
  assert c.proxies.sizes == overopt_pythia.LADDER and c.policy.size == "pythia-1.4b"
  assert c.policy.hf_dir == c.data.tokenizer_dir == "/mnt/d/ckpts/pythia-1.4b"
  assert c.proxies.hf_dir_template.format(size="pythia-70m") == "/mnt/d/ckpts/pythia-70m"
  assert (c.gold.hf_dir, c.data.manual_dir, c.data.data_dir) == (
    "/mnt/d/ckpts/gold-rm",
    "/mnt/d/raw/hh_rlhf",
    "/mnt/d/tfds",
  )
  assert c.proxies.data_sizes[-1] == 46_000 and c.label.num_comparisons * 0.9 >= 46_000
  pipeline.validate(c, 64)  # Valid at pod scale without touching any file.
  c = overopt_pythia.get_config("rm=pythia-70m+pythia-410m,data=2k+8k,dataset=tldr,sft=False")
  assert c.proxies.sizes == ("pythia-70m", "pythia-410m") and c.proxies.data_sizes == (2_000, 8_000)
  assert (c.data.manual_dir, c.policy.sft) == ("/data/raw/tldr", False)
  with pytest.raises(ValueError, match=r"'lots' is not a count"):
    overopt_pythia.get_config("data=lots")


def test_config_and_file_errors_name_the_key(real_root, tmp_path):
  root, _, _ = real_root
  c = overopt_pythia.get_config(f"root={root},{ARGS}")
  c.gold.kind = "trained"
  with pytest.raises(ValueError, match=r"gold.kind='trained' needs the offline world"):
    pipeline.validate(c, 8)
  c = overopt_pythia.get_config(f"root={root},{ARGS}")
  c.proxies.hf_dir_template = os.path.join(root, "ckpts")
  with pytest.raises(ValueError, match=r"proxies.hf_dir_template with a '\{size\}' placeholder"):
    pipeline.validate(c, 8)
  c = overopt_pythia.get_config(f"root={root},{ARGS}")
  c.data.dataset = "hh"
  with pytest.raises(ValueError, match=r"config.data.dataset='hh' is not one of"):
    pipeline.validate(c, 8)
  c.data.dataset = "hh_rlhf"
  c.data.prompt_length = 12
  with pytest.raises(ValueError, match=r"config.data has unknown field\(s\) \['prompt_length'\]"):
    pipeline.validate(c, 8)

  # Files are checked where they are read; the error names the config key and the file.
  c = overopt_pythia.get_config(f"root={root},{ARGS}")
  c.stages = "gold"
  c.gold.hf_dir = os.path.join(root, "ckpts", "missing-gold")
  with pytest.raises(ValueError, match=r"config.gold.hf_dir='.*missing-gold': .*not a directory"):
    pipeline.run(c, str(tmp_path / "w1"))
  c.gold.hf_dir = os.path.join(root, "ckpts", "tiny-policy")
  with pytest.raises(
    ValueError, match=r"config.gold.hf_dir=.*tiny-policy.*not a \*ForSequenceClassification"
  ):
    pipeline.run(c, str(tmp_path / "w2"))
  small = transformers.GPTNeoXForCausalLM._from_config(_neox(16, 1, 2, vocab=8))
  small.save_pretrained(os.path.join(root, "ckpts", "tiny-vocab"))
  c = overopt_pythia.get_config(f"root={root},{ARGS}")
  c.stages = "policy_init"
  c.policy.hf_dir = os.path.join(root, "ckpts", "tiny-vocab")
  with pytest.raises(
    ValueError,
    match=r"config.policy.hf_dir=.*tiny-vocab.*vocab_size=8 is smaller than the tokenizer's 29",
  ):
    pipeline.run(c, str(tmp_path / "w3"))
  c.data.tokenizer_dir = os.path.join(root, "ckpts", "no-tokenizer")
  with pytest.raises(ValueError, match=r"config.data.tokenizer_dir=.*no-tokenizer"):
    pipeline.run(c, str(tmp_path / "w4"))
