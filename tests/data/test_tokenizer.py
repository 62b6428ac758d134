"""Tokenizers: hand-computed ids, padding and truncation policy, and a real local HF tokenizer."""

import numpy as np
import pytest

from rmscale.data.tokenizer import ByteTokenizer, HFTokenizer, WordTokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_utf8_and_names_specials():
  tok = ByteTokenizer()
  text = "héllo ✓"
  ids = tok.encode(text)
  assert ids == [104, 0xC3, 0xA9, 108, 108, 111, 32, 0xE2, 0x9C, 0x93]
  assert tok.decode(ids) == text
  framed = [tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(framed) == "<bos>héllo ✓<eos>"
  assert tok.decode(framed, skip_special_tokens=True) == text
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
  with pytest.raises(ValueError, match="outside"):
    tok.decode([300])


def test_encode_batch_padding_and_truncation_policy():
  tok = WordTokenizer(["a", "b", "c"])  # a=3, b=4, c=5.
  texts = ["a b", "c a b c"]
  ids, mask = tok.encode_batch(texts, 4, padding_side="left")
  # Left padding keeps the *end* of an over-long prompt (BOS is cut from row 1).
  np.testing.assert_array_equal(ids, [[0, 1, 3, 4], [5, 3, 4, 5]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [1, 1, 1, 1]])
  assert ids.dtype == np.int32 and mask.dtype == bool
  ids, mask = tok.encode_batch(texts, 4, padding_side="right", add_eos=True)
  np.testing.assert_array_equal(ids, [[1, 3, 4, 2], [1, 5, 3, 4]])  # Right keeps the start.
  np.testing.assert_array_equal(mask, np.ones((2, 4)))
  ids, mask = tok.encode_batch(["b"], 3, padding_side="right", add_bos=False)
  np.testing.assert_array_equal(ids, [[4, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 0, 0]])
  with pytest.raises(ValueError, match="more than length=4"):
    tok.encode_batch(texts, 4, strict=True)
  with pytest.raises(ValueError, match="padding_side"):
    tok.encode_batch(texts, 4, padding_side="middle")


def test_word_tokenizer_closed_vocabulary():
  tok = WordTokenizer(["sun", "moon", "."])
  assert tok.encode("moon sun .") == [4, 3, 5]
  assert tok.decode([1, 4, 0, 3, 5, 2, 0]) == "<bos> moon sun . <eos>"
  assert tok.decode([1, 4, 3, 2], skip_special_tokens=True) == "moon sun"
  with pytest.raises(ValueError, match="'star' is not in the 6-word vocabulary"):
    tok.encode("sun star")
  with pytest.raises(ValueError, match="duplicate"):
    WordTokenizer(["sun", "sun"])
  with pytest.raises(ValueError, match="duplicate"):
    WordTokenizer(["<eos>"])
  with pytest.raises(ValueError, match="whitespace"):
    WordTokenizer(["two words"])
  unk = WordTokenizer(["sun"], unk_token="<unk>")
  assert unk.encode("sun star") == [4, 3] and unk.vocab_size == 5


def _save_hf_tokenizer(path, pad: bool):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat"] + (["<pad>"] if pad else [])
  tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  extra = dict(pad_token="<pad>") if pad else {}
  PreTrainedTokenizerFast(
    tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
  ).save_pretrained(str(path))
  return str(path)


def test_hf_tokenizer_from_local_directory(tmp_path):
  tok = load_tokenizer(_save_hf_tokenizer(tmp_path / "nopad", pad=False))
  assert isinstance(tok, HFTokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (7, 1, 2)
  assert tok.pad_id == tok.eos_id  # No pad token: falls back to EOS.
  assert tok.encode("hello the cat") == [3, 5, 6]  # No specials added by encode.
  assert tok.decode([3, 5, 6]) == "hello the cat"
  ids, mask = tok.encode_batch(["hello", "the cat world"], 4, padding_side="left")
  np.testing.assert_array_equal(ids, [[2, 2, 1, 3], [1, 5, 6, 4]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 1, 1]])

  padded = HFTokenizer(_save_hf_tokenizer(tmp_path / "pad", pad=True))
  assert (padded.vocab_size, padded.pad_id, padded.eos_id) == (8, 7, 2)
  assert padded.decode([1, 3, 4, 2, 7, 7]) == "<s> hello world </s>"
  assert padded.decode([1, 3, 4, 2, 7], skip_special_tokens=True) == "hello world"
  with pytest.raises(ValueError, match="no Hugging Face tokenizer directory"):
    HFTokenizer(str(tmp_path / "missing"))


def test_load_tokenizer_specs():
  assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
  world = load_tokenizer("world")
  assert isinstance(world, WordTokenizer) and world.vocab_size == 291
  assert (
    world.decode(world.encode("write about ocean using bright in 8 words"))
    == "write about ocean using bright in 8 words"
  )
  with pytest.raises(ValueError, match="tokenizer spec"):
    load_tokenizer("no/such/dir")
