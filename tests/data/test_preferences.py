"""Preference datasets: fixture files in each published format -> TFDS array_record -> exact records;
tokenisation into rmscale's sequence layout; length filtering; errors naming file, line and field.

The fixture writers and ``word_tokenizer`` are also used by tests/test_real_pipeline.py.
"""

import gzip
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet")
import pyarrow as pa  # noqa: E402

from rmscale.data import hf_tokenize  # noqa: E402
from rmscale.data import preference_builders as pb  # noqa: E402
from rmscale.data import preference_formats as formats  # noqa: E402

NAN = float("nan")
H, A = "\n\nHuman:", "\n\nAssistant:"


# --- Fixture files, one writer per published format.


def _jsonl(path, rows, gz=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)


def _parquet(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def _msgs(*turns):
  return [
    {"content": c, "role": "user" if i % 2 == 0 else "assistant"} for i, c in enumerate(turns)
  ]


HH_TRAIN = [
  {
    "chosen": f"{H} What is a cat?{A} A small animal.",
    "rejected": f"{H} What is a cat?{A} No idea.",
  },
  "",  # Blank lines are skipped.
  {
    "chosen": f"{H} Hi{A} Hello.{H} Tell me a joke{A} Why did the cat sit?",
    "rejected": f"{H} Hi{A} Hello.{H} Tell me a joke{A} No.",
  },
  {"chosen": f"{H} Same{A} Same answer.", "rejected": f"{H} Same{A} Same answer."},  # identical
  {"chosen": f"{H} A{A} B{H} C{A} D", "rejected": f"{H} A{A} X{H} C{A} E"},  # prompt_mismatch
]
HH_TEST = [{"chosen": f"{H} hi{A} hello there", "rejected": f"{H} hi{A} bye"}]


def write_hh(root, train=HH_TRAIN, test=HH_TEST):
  """Anthropic/hh-rlhf layout: <subset>/{train,test}.jsonl.gz."""
  _jsonl(os.path.join(root, "helpful-base", "train.jsonl.gz"), train, gz=True)
  _jsonl(os.path.join(root, "helpful-base", "test.jsonl.gz"), test, gz=True)
  _jsonl(
    os.path.join(root, "harmless-base", "train.jsonl.gz"),
    [
      {
        "chosen": f"{H} How do I pick a lock?{A} I can't help.",
        "rejected": f"{H} How do I pick a lock?{A} Sure!",
      }
    ],
    gz=True,
  )
  return root


def _tldr_row(split, choice, texts, info=None):
  info = info or {
    "id": "t3_x",
    "post": "My cat ate my homework.",
    "title": "Cat",
    "subreddit": "pets",
  }
  return {
    "info": info,
    "split": split,
    "summaries": [{"text": t, "policy": "sup2", "note": None} for t in texts],
    "choice": choice,
    "worker": "w1",
    "batch": "batch1",
    "extra": {},
  }


def write_tldr(root):
  """openai/summarize-from-feedback: comparisons/batch*.json, JSON lines."""
  _jsonl(
    os.path.join(root, "comparisons", "batch1.json"),
    [
      _tldr_row("train", 1, [" the cat is bad", "cat ate homework \n"]),
      _tldr_row("valid1", 0, [" cat ate it", " no"]),
      _tldr_row("valid2", 1, ["x", "storm hits coast"], info={"id": "c1", "article": "A storm."}),
    ],
  )
  _jsonl(os.path.join(root, "comparisons", "batch2.json"), [_tldr_row("train", 0, ["good", "bad"])])
  return root


def write_ultrafeedback(root):
  """HuggingFaceH4/ultrafeedback_binarized: data/{train,test}_{prefs,sft,gen}-*.parquet."""

  def row(pid, prompt, good, bad, sc, sr):
    return {
      "prompt": prompt,
      "prompt_id": pid,
      "chosen": _msgs(prompt, good),
      "rejected": _msgs(prompt, bad),
      "messages": _msgs(prompt, good),
      "score_chosen": sc,
      "score_rejected": sr,
    }

  data = os.path.join(root, "data")
  _parquet(
    os.path.join(data, "train_prefs-00000-of-00001.parquet"),
    [
      row("p0", "Name a colour.", "Blue.", "Seven.", 9.0, 2.5),
      row("p1", "Add 2+2.", "4", "5", 10.0, 1.0),
    ],
  )
  _parquet(
    os.path.join(data, "test_prefs-00000-of-00001.parquet"),
    [row("p2", "Say hi.", "Hi!", "No.", 8.0, 3.0)],
  )
  # Splits the builder must not read.
  _parquet(
    os.path.join(data, "train_sft-00000-of-00001.parquet"), [row("p9", "x", "y", "z", 1.0, 0.0)]
  )
  return root


def write_unified(root):
  """llm-blender/Unified-Feedback: <config>/{train,val}-*.parquet."""

  def row(conv_a, conv_b, ra, rb, source="hh-rlhf"):
    return {
      "id": "u",
      "conv_A": conv_a,
      "conv_B": conv_b,
      "conv_A_rating": ra,
      "conv_B_rating": rb,
      "num_turns": len(conv_a) // 2,
      "source": source,
    }

  _parquet(
    os.path.join(root, "all", "train-00000-of-00001.parquet"),
    [
      row(_msgs("Q1", "good"), _msgs("Q1", "bad"), 1.0, 0.0),
      row(_msgs("Q2", "a", "Q3", "worse"), _msgs("Q2", "a", "Q3", "better"), 2.0, 7.5, "nectar"),
      row(_msgs("Q4", "x"), _msgs("Q4", "y"), 3.0, 3.0),  # tie
    ],
  )
  _parquet(
    os.path.join(root, "all", "val-00000-of-00001.parquet"),
    [row(_msgs("V", "yes"), _msgs("V", "no"), 1.0, 0.0)],
  )
  return root


WRITERS = {
  "hh_rlhf": write_hh,
  "tldr": write_tldr,
  "ultrafeedback": write_ultrafeedback,
  "unified_feedback": write_unified,
}


def _rec(prompt, chosen, rejected, sc, sr, source, id_):
  return dict(
    prompt=prompt,
    chosen=chosen,
    rejected=rejected,
    score_chosen=sc,
    score_rejected=sr,
    source=source,
    id=id_,
  )


POST = "SUBREDDIT: r/pets\n\nTITLE: Cat\n\nPOST: My cat ate my homework.\n\nTL;DR:"
EXPECTED = {
  "hh_rlhf": {
    "train": [
      _rec(
        f"{H} How do I pick a lock?{A}",
        " I can't help.",
        " Sure!",
        NAN,
        NAN,
        "hh_rlhf/harmless-base",
        "harmless-base/train.jsonl.gz:1",
      ),
      _rec(
        f"{H} What is a cat?{A}",
        " A small animal.",
        " No idea.",
        NAN,
        NAN,
        "hh_rlhf/helpful-base",
        "helpful-base/train.jsonl.gz:1",
      ),
      _rec(
        f"{H} Hi{A} Hello.{H} Tell me a joke{A}",
        " Why did the cat sit?",
        " No.",
        NAN,
        NAN,
        "hh_rlhf/helpful-base",
        "helpful-base/train.jsonl.gz:3",
      ),
    ],
    "test": [
      _rec(
        f"{H} hi{A}",
        " hello there",
        " bye",
        NAN,
        NAN,
        "hh_rlhf/helpful-base",
        "helpful-base/test.jsonl.gz:1",
      )
    ],
  },
  "tldr": {
    "train": [
      _rec(
        POST,
        " cat ate homework",
        " the cat is bad",
        NAN,
        NAN,
        "tldr/reddit",
        "comparisons/batch1.json:1",
      ),
      _rec(POST, " good", " bad", NAN, NAN, "tldr/reddit", "comparisons/batch2.json:1"),
    ],
    "test": [
      _rec(POST, " cat ate it", " no", NAN, NAN, "tldr/reddit", "comparisons/batch1.json:2"),
      _rec(
        "ARTICLE: A storm.\n\nTL;DR:",
        " storm hits coast",
        " x",
        NAN,
        NAN,
        "tldr/cnndm",
        "comparisons/batch1.json:3",
      ),
    ],
  },
  "ultrafeedback": {
    "train": [
      _rec(
        f"{H} Name a colour.{A}",
        " Blue.",
        " Seven.",
        9.0,
        2.5,
        "ultrafeedback",
        "data/train_prefs-00000-of-00001.parquet:row0",
      ),
      _rec(
        f"{H} Add 2+2.{A}",
        " 4",
        " 5",
        10.0,
        1.0,
        "ultrafeedback",
        "data/train_prefs-00000-of-00001.parquet:row1",
      ),
    ],
    "test": [
      _rec(
        f"{H} Say hi.{A}",
        " Hi!",
        " No.",
        8.0,
        3.0,
        "ultrafeedback",
        "data/test_prefs-00000-of-00001.parquet:row0",
      )
    ],
  },
  "unified_feedback": {
    "train": [
      _rec(
        f"{H} Q1{A}",
        " good",
        " bad",
        1.0,
        0.0,
        "unified_feedback/hh-rlhf",
        "all/train-00000-of-00001.parquet:row0",
      ),
      _rec(
        f"{H} Q2{A} a{H} Q3{A}",
        " better",
        " worse",
        7.5,
        2.0,
        "unified_feedback/nectar",
        "all/train-00000-of-00001.parquet:row1",
      ),
    ],
    "test": [
      _rec(
        f"{H} V{A}",
        " yes",
        " no",
        1.0,
        0.0,
        "unified_feedback/hh-rlhf",
        "all/val-00000-of-00001.parquet:row0",
      )
    ],
  },
}
SKIPPED = {
  "hh_rlhf": {"train": {"identical": 1, "prompt_mismatch": 1}, "test": {}},
  "tldr": {"train": {}, "test": {}},
  "ultrafeedback": {"train": {}, "test": {}},
  "unified_feedback": {"train": {"tie": 1}, "test": {}},
}


def _same(got: list[dict], want: list[dict]):
  got, want = sorted(got, key=lambda r: r["id"]), sorted(want, key=lambda r: r["id"])
  assert [r["id"] for r in got] == [r["id"] for r in want]
  for g, w in zip(got, want):
    for k in formats.RECORD_FIELDS:
      if isinstance(w[k], float) and math.isnan(w[k]):
        assert math.isnan(g[k]), (w["id"], k)
      else:
        assert g[k] == w[k], (w["id"], k, g[k], w[k])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Every dataset built once from its fixture files: name -> data_dir."""
  root = tmp_path_factory.mktemp("prefs")
  data_dir = str(root / "tfds")
  for name, write in WRITERS.items():
    pb.build(name, write(str(root / "raw" / name)), data_dir)
  return data_dir


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_builders_read_back_exact_records(built, name):
  for split in ("train", "test"):
    recs = pb.load(name, built, split)
    assert len(recs) == len(EXPECTED[name][split])
    _same([recs[i] for i in range(len(recs))], EXPECTED[name][split])
    # Random access in any order, and batched reads, give the same records.
    last = len(recs) - 1
    assert [r["id"] for r in recs.batch([last, 0])] == [recs[last]["id"], recs[0]["id"]]
  # Skip counts are stored with the dataset (a fresh builder reads them from disk).
  assert pb.builder(name, built).info.metadata["skipped"] == SKIPPED[name]
  # The files are array_record: TFDS reads them back without TensorFlow.
  files = os.listdir(os.path.join(built, name, "1.0.0"))
  assert any(".array_record-" in f for f in files), files


def test_tfds_data_source_reads_the_same(built):
  import tensorflow_datasets as tfds

  src = tfds.data_source("hh_rlhf", data_dir=built, split="test")
  assert [pb.decode(src[i])["id"] for i in range(len(src))] == ["helpful-base/test.jsonl.gz:1"]


# --- Errors name the file, the line or row, and the field.


def _records(name, root, split="train"):
  return list(formats.FORMATS[name].records(str(root), split, Counter()))


def test_jsonl_errors_name_file_line_and_field(tmp_path):
  path = tmp_path / "helpful-base" / "train.jsonl"
  good = json.dumps(HH_TEST[0])
  _jsonl(str(path), [good, '{"chosen": "x", "rejected": '])
  with pytest.raises(ValueError, match=r"helpful-base/train.jsonl:2: corrupt JSON record"):
    _records("hh_rlhf", tmp_path)
  _jsonl(str(path), [good, json.dumps({"chosen": HH_TEST[0]["chosen"]})])
  with pytest.raises(ValueError, match=r"train.jsonl:2: missing field 'rejected'"):
    _records("hh_rlhf", tmp_path)
  _jsonl(str(path), [json.dumps({"chosen": ["x"], "rejected": "y"})])
  with pytest.raises(ValueError, match=r"train.jsonl:1: field 'chosen' must be a string, got list"):
    _records("hh_rlhf", tmp_path)
  _jsonl(str(path), [json.dumps({"chosen": "no turns here", "rejected": "y"})])
  with pytest.raises(
    ValueError, match=r"train.jsonl:1: field 'chosen' has no '\\n\\nAssistant:' turn"
  ):
    _records("hh_rlhf", tmp_path)
  os.remove(path)
  (tmp_path / "helpful-base" / "train.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
  with pytest.raises(ValueError, match=r"train.jsonl.gz: unreadable file"):
    _records("hh_rlhf", tmp_path)


def test_tldr_errors(tmp_path):
  path = str(tmp_path / "comparisons" / "batch9.json")
  cases = [
    (_tldr_row("train", 2, ["a", "b"]), r"batch9.json:1: field 'choice'=2 must be 0 or 1"),
    (_tldr_row("train", 0, ["a", "b", "c"]), r"field 'summaries' must hold 2 summaries, got 3"),
    (
      _tldr_row("train", 0, ["a", "b"], info={"id": "q"}),
      r"field 'info' has neither 'post' nor 'article'",
    ),
    (_tldr_row("dev", 0, ["a", "b"]), r"field 'split'='dev' is not"),
    (
      {**_tldr_row("train", 0, ["a", "b"]), "summaries": [{"text": "a"}, {"txt": "b"}]},
      r"summaries\[1\]: missing field 'text'",
    ),
    (
      {**_tldr_row("train", 0, ["a", "b"]), "choice": True},
      r"field 'choice' must be an integer, got bool",
    ),
  ]
  for row, message in cases:
    _jsonl(path, [row])
    with pytest.raises(ValueError, match=message):
      _records("tldr", tmp_path)


def test_parquet_errors_name_file_row_and_field(tmp_path):
  path = str(tmp_path / "data" / "train_prefs-00000-of-00001.parquet")
  ok = {"chosen": _msgs("q", "a"), "rejected": _msgs("q", "b"), "score_chosen": 1.0}
  _parquet(path, [ok])
  with pytest.raises(
    ValueError, match=r"train_prefs-00000-of-00001.parquet: missing field\(s\) \['score_rejected'\]"
  ):
    _records("ultrafeedback", tmp_path)
  _parquet(
    path, [{**ok, "score_rejected": 0.0}, {**ok, "rejected": _msgs("q"), "score_rejected": 0.0}]
  )
  with pytest.raises(
    ValueError, match=r"parquet: row 1: field 'rejected' must end with an assistant message"
  ):
    _records("ultrafeedback", tmp_path)
  _parquet(path, [{**ok, "score_rejected": None}])
  with pytest.raises(
    ValueError, match=r"row 0: field 'score_rejected' must be a number, got NoneType"
  ):
    _records("ultrafeedback", tmp_path)
  _parquet(
    path,
    [
      {
        **ok,
        "chosen": [{"content": "q", "role": "narrator"}, {"content": "a", "role": "assistant"}],
        "score_rejected": 0.0,
      }
    ],
  )
  with pytest.raises(ValueError, match=r"row 0: field 'chosen\[0\].role'='narrator' is not one of"):
    _records("ultrafeedback", tmp_path)
  with open(path, "wb") as f:
    f.write(b"PAR1 this is not parquet")
  with pytest.raises(
    ValueError, match=r"train_prefs-00000-of-00001.parquet: unreadable parquet file"
  ):
    _records("ultrafeedback", tmp_path)
  upath = str(tmp_path / "uf" / "all" / "train-0.parquet")
  _parquet(
    upath,
    [
      {
        "conv_A": _msgs("q", "a"),
        "conv_B": _msgs("q", "b"),
        "conv_A_rating": "high",
        "conv_B_rating": 1.0,
      }
    ],
  )
  with pytest.raises(
    ValueError, match=r"train-0.parquet: row 0: field 'conv_A_rating' must be a number, got str"
  ):
    _records("unified_feedback", tmp_path / "uf")


def test_missing_files_and_directories(tmp_path, built):
  with pytest.raises(ValueError, match=r"hh_rlhf: manual directory '.*nowhere' does not exist"):
    pb.build("hh_rlhf", str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
  _jsonl(str(tmp_path / "raw" / "helpful-base" / "train.jsonl.gz"), HH_TEST, gz=True)
  with pytest.raises(
    ValueError, match=r"no files for split 'test' in .*raw.*expected e.g. <subset>/test.jsonl.gz"
  ):
    pb.build("hh_rlhf", str(tmp_path / "raw"), str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=r"tldr: no prepared dataset under"):
    pb.load("tldr", str(tmp_path / "tfds"), "train")
  with pytest.raises(ValueError, match=r"unknown preference dataset 'hh'"):
    pb.load("hh", built, "train")
  with pytest.raises(ValueError, match=r"split must be one of"):
    pb.load("hh_rlhf", built, "validation")
  # A corrupt record stops the build with the file and line, through TFDS.
  _jsonl(
    str(tmp_path / "raw" / "helpful-base" / "test.jsonl.gz"), [HH_TEST[0], {"chosen": 1}], gz=True
  )
  with pytest.raises(
    ValueError, match=r"helpful-base/test.jsonl.gz:2: field 'chosen' must be a string"
  ):
    pb.build("hh_rlhf", str(tmp_path / "raw"), str(tmp_path / "tfds"))


# --- Tokenisation.

WORDS = ["Human", ":", "Assistant", "hi", "hello", "there", "bye", "a", "b", "c", "d", "?", "."]


def word_tokenizer(path, words=WORDS, pad=True, bos=False) -> str:
  """A word-level transformers tokenizer saved to ``path``: ids 0 <|endoftext|> (EOS), 1 [UNK],
  then 2 <pad> when ``pad`` (else pad falls back to EOS, as for Pythia), then <s> when ``bos`` (added
  before every text with special tokens, as Llama does), then ``words``."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  specials = ["<|endoftext|>", "[UNK]"] + (["<pad>"] if pad else []) + (["<s>"] if bos else [])
  vocab = {w: i for i, w in enumerate(specials + list(words))}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  kw = {}
  if bos:
    tk.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    kw["bos_token"] = "<s>"
  if pad:
    kw["pad_token"] = "<pad>"
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="[UNK]", **kw
  )
  fast.save_pretrained(str(path))
  return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return hf_tokenize.load_tokenizer(word_tokenizer(tmp_path_factory.mktemp("tok")))


def _ids(words):
  idx = {w: i + 3 for i, w in enumerate(WORDS)}
  return [idx[w] for w in words.split()]


def test_tokenize_comparisons_layout_and_filtering(tok):
  EOS, PAD = 0, 2
  assert (tok.eos_id, tok.pad_id) == (EOS, PAD)
  recs = [
    _rec(f"{H} hi{A}", " hello there", " bye", NAN, NAN, "s", "r0"),
    _rec(f"{H} a b c d{A}", " hi", " bye", NAN, NAN, "s", "r1"),  # prompt: 8 tokens > 6
    _rec(f"{H} hi{A}", " a b c d", " bye", NAN, NAN, "s", "r2"),  # chosen: 4 + EOS > 4
    _rec(f"{H} hi ?{A}", " .", " a b c", NAN, NAN, "s", "r3"),  # both fit exactly
  ]
  arrays, report = hf_tokenize.tokenize_comparisons(tok, recs, prompt_len=6, response_len=4)
  assert sorted(arrays) == ["chosen", "chosen_mask", "rejected", "rejected_mask"]
  assert report.kept.tolist() == [0, 3]
  assert report.summary() == {
    "rows": 4,
    "kept": 2,
    "dropped_prompt_too_long": 1,
    "dropped_response_too_long": 1,
    "truncated_prompts": 0,
    "truncated_responses": 0,
  }
  p0 = [PAD] + _ids("Human : hi Assistant :")
  p3 = _ids("Human : hi ? Assistant :")
  np.testing.assert_array_equal(
    arrays["chosen"],
    [p0 + _ids("hello there") + [EOS, PAD], p3 + _ids(".") + [EOS, PAD, PAD]],
  )
  np.testing.assert_array_equal(
    arrays["rejected"],
    [p0 + _ids("bye") + [EOS, PAD, PAD], p3 + _ids("a b c") + [EOS]],
  )
  np.testing.assert_array_equal(arrays["chosen_mask"], [[0] + [1] * 8 + [0], [1] * 8 + [0, 0]])
  np.testing.assert_array_equal(arrays["rejected_mask"], [[0] + [1] * 7 + [0, 0], [1] * 10])
  assert arrays["chosen"].dtype == np.int32 and arrays["chosen_mask"].dtype == bool

  # The same arrays as the stages build from (prompt, response) pairs with comparison_arrays.
  from rmscale.stages.gold import comparison_arrays

  kept = [recs[i] for i in report.kept]
  prompts, _ = hf_tokenize.tokenize_prompts(tok, [r["prompt"] for r in kept], 6)
  sides = {}
  for side in ("chosen", "rejected"):
    ids, mask, fits = hf_tokenize.tokenize_responses(tok, [r[side] for r in kept], 4)
    assert fits.all()
    sides[side] = {"ids": ids, "mask": mask}
  ref = comparison_arrays(
    prompts["ids"], prompts["mask"], sides["chosen"], sides["rejected"], [True, True]
  )
  for k in ref:
    np.testing.assert_array_equal(arrays[k], ref[k])

  # Truncation keeps every row: prompts lose their start, responses their end (and so their EOS).
  arrays, report = hf_tokenize.tokenize_comparisons(
    tok, recs, prompt_len=6, response_len=4, truncate=True
  )
  assert report.kept.tolist() == [0, 1, 2, 3] and report.dropped == 0
  assert (report.truncated_prompts, report.truncated_responses) == (1, 1)
  np.testing.assert_array_equal(arrays["chosen"][1, :6], _ids("a b c d Assistant :"))
  np.testing.assert_array_equal(arrays["chosen"][2, 6:], _ids("a b c d"))
  assert arrays["chosen_mask"][2, 6:].all()  # No room left for EOS.


def test_prompts_bos_and_retokenisation(tok, tmp_path):
  EOS = 0
  texts = [f"{H} hi{A}", f"{H} a b c d{A}"]
  prompts, report = hf_tokenize.tokenize_prompts(tok, texts, 6)
  assert report.kept.tolist() == [0] and report.prompt_too_long == 1
  np.testing.assert_array_equal(prompts["ids"], [[2] + _ids("Human : hi Assistant :")])
  np.testing.assert_array_equal(prompts["mask"], [[0, 1, 1, 1, 1, 1]])
  prompts, report = hf_tokenize.tokenize_prompts(tok, texts, 6, truncate=True)
  assert report.kept.tolist() == [0, 1] and report.truncated_prompts == 1

  # A Llama-like tokenizer adds BOS before prompts (its own convention), never before responses.
  llama = hf_tokenize.load_tokenizer(word_tokenizer(tmp_path / "bos", pad=False, bos=True))
  BOS = 2
  assert (llama.bos_id, llama.pad_id, llama.eos_id) == (BOS, EOS, EOS)
  assert hf_tokenize.encode_prompts(llama, [f"{H} hi{A}"]) == [
    [BOS] + _ids("Human : hi Assistant :")
  ]
  assert hf_tokenize.encode_responses(llama, [" hi"]) == [[_ids("hi")[0], EOS]]

  # Retokenising into the same tokenizer is the identity on what fits; into the BOS one it adds BOS.
  recs = [_rec(f"{H} hi{A}", " hello there", " bye", NAN, NAN, "s", "r0")]
  arrays, _ = hf_tokenize.tokenize_comparisons(tok, recs, 6, 4)
  same = hf_tokenize.retokenize(tok, tok, arrays["chosen"], arrays["chosen_mask"], 6, 6, 4)
  np.testing.assert_array_equal(same[0], arrays["chosen"])
  np.testing.assert_array_equal(same[1], arrays["chosen_mask"])
  ids, mask = hf_tokenize.retokenize(tok, llama, arrays["chosen"], arrays["chosen_mask"], 6, 6, 3)
  np.testing.assert_array_equal(ids, [[BOS] + _ids("Human : hi Assistant : hello there") + [EOS]])
  assert mask.all()
  # A response cut on the way loses its end (no EOS): the text did not end there.
  ids, mask = hf_tokenize.retokenize(tok, llama, arrays["chosen"], arrays["chosen_mask"], 6, 6, 1)
  np.testing.assert_array_equal(ids[0, 6:], _ids("hello"))


def test_rm_training_consumes_the_arrays(tok):
  import jax

  from rmscale import losses
  from rmscale.models import sizes
  from rmscale.models.transformer import Transformer, init_params
  from rmscale.train import rm

  recs = [
    _rec(f"{H} hi{A}", " hello there", " bye", NAN, NAN, "s", "r0"),
    _rec(f"{H} hi ?{A}", " .", " a b c", NAN, NAN, "s", "r3"),
  ]
  batch, _ = hf_tokenize.tokenize_comparisons(tok, recs, prompt_len=6, response_len=4)
  assert set(batch) == set(rm.BATCH_KEYS)
  cfg = sizes.model_config(
    "100k", vocab_size=tok.vocab_size, max_len=10, lm_head=False, reward_head="linear"
  )
  params, _ = init_params(cfg, jax.random.key(0))
  loss, _ = jax.jit(rm.make_rm_loss(cfg))(params, batch, jax.random.key(1))

  # The loss is Bradley-Terry on the rewards of each side scored on its own.
  @jax.jit
  def score(t, m):
    return Transformer(cfg).apply({"params": params}, t, m, method=Transformer.forward)["reward"]

  want, _ = losses.bradley_terry_loss(
    score(batch["chosen"], batch["chosen_mask"]), score(batch["rejected"], batch["rejected_mask"])
  )
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_preference_prompts_source(built, tmp_path):
  """The prompt source the stages use: distinct prompts that fit, SFT pairs, held-out labels."""
  from rmscale.data.preferences import DataConfig, PreferencePrompts

  tok_dir = word_tokenizer(tmp_path / "tok")
  cfg = DataConfig(
    dataset="hh_rlhf",
    manual_dir=str(tmp_path / "unused"),  # Already built: the raw files are not read again.
    data_dir=built,
    tokenizer_dir=tok_dir,
    prompt_len=12,
    response_len=4,
  )
  src = PreferencePrompts(cfg)
  tok = src.tokenizer
  # Train prompts: the cat (9 tokens) and lock (11) prompts fit; the two-turn one (15) does not.
  assert (src.num_train_prompts, src.num_eval_prompts) == (2, 1)
  assert src.filter_report["train"]["dropped_prompt_too_long"] == 1
  train = {r["prompt"]: r for r in EXPECTED["hh_rlhf"]["train"][:2]}
  want, _ = hf_tokenize.tokenize_prompts(tok, sorted(train), 12)
  got = src.prompt_batch(np.arange(2))
  assert sorted(map(tuple, got["ids"])) == sorted(map(tuple, want["ids"]))
  ev = src.sample_prompts(0, 5, "eval")
  assert np.all(ev["index"] == 2)
  np.testing.assert_array_equal(ev["ids"][0], [2] * 7 + _ids("Human : hi Assistant :"))
  # SFT pairs: a prompt with the chosen response of its comparison, cut to 4 tokens (no EOS then).
  ex = src.sft_examples(1, 6, "train")
  for p_ids, r_ids, r_mask in zip(ex["prompt_ids"], ex["response_ids"], ex["response_mask"]):
    (prompt,) = [
      t
      for t in train
      if tuple(hf_tokenize.tokenize_prompts(tok, [t], 12)[0]["ids"][0]) == tuple(p_ids)
    ]
    chosen = hf_tokenize.encode_responses(tok, [train[prompt]["chosen"]])[0][:4]
    assert list(r_ids[r_mask]) == chosen
  # Held-out comparisons in the RM layout; real data has no hidden utility.
  pairs, report = src.comparisons("eval", 10)
  assert report.kept.tolist() == [0] and pairs["chosen"].shape == (1, 16)
  np.testing.assert_array_equal(pairs["chosen"][0, 12:], _ids("hello there") + [0, 2])
  assert np.isnan(src.utility(got["ids"], got["ids"], got["mask"])).all()
  with pytest.raises(ValueError, match=r"split must be 'train', 'eval' or 'all'"):
    src.sample_prompts(0, 1, "test")
