"""Tokenizers behind one small interface: bytes (no files), a closed word vocabulary (the offline
world), and local Hugging Face tokenizers (real checkpoints).

The interface is deliberately thin: the experiment only needs ids in and text out, plus static-shape
batches for jitted steps. ``encode`` never adds special tokens, so callers decide where BOS/EOS go
(prompts get BOS, SFT targets get EOS, sampled responses carry the EOS the policy emitted).

Batch truncation policy (``encode_batch``): a sequence longer than ``length`` loses tokens on the
*padding side*: left padding (prompts) keeps the last ``length`` tokens, because generation continues
from the end of a prompt; right padding (targets, responses) keeps the first ``length`` tokens.
BOS may be cut this way. Pass ``strict=True`` to get a ValueError instead of any truncation.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence

import numpy as np

from rmscale.errors import UserError
from rmscale.fs import MissingFileError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class Tokenizer(abc.ABC):
  """Text <-> ids. Subclasses set ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of ``text`` without any special tokens."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of ``ids``; pad ids are always dropped, BOS/EOS shown unless ``skip_special_tokens``."""

  def encode_batch(
    self,
    texts: Sequence[str],
    length: int,
    padding_side: str = "left",
    add_bos: bool = True,
    add_eos: bool = False,
    strict: bool = False,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Static-shape batch: (ids int32 [B, length], mask bool [B, length]); pad slots hold ``pad_id``.

    Truncation follows the module docstring: the padding side loses tokens, or ``strict`` raises.
    """
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if length <= 0:
      raise ValueError(f"encode_batch length must be positive, got {length}")
    ids_BxL = np.full((len(texts), length), self.pad_id, np.int32)
    mask_BxL = np.zeros((len(texts), length), bool)
    for b, text in enumerate(texts):
      ids = (
        ([self.bos_id] if add_bos else []) + self.encode(text) + ([self.eos_id] if add_eos else [])
      )
      if len(ids) > length:
        if strict:
          raise ValueError(
            f"text {b} has {len(ids)} tokens, more than length={length}: {text[:60]!r}"
          )
        ids = ids[-length:] if padding_side == "left" else ids[:length]
      n = len(ids)
      if padding_side == "left":
        ids_BxL[b, length - n :] = ids
        mask_BxL[b, length - n :] = True
      else:
        ids_BxL[b, :n] = ids
        mask_BxL[b, :n] = True
    return ids_BxL, mask_BxL


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes are ids 0..255; pad, bos, eos follow. Needs no files and covers any text."""

  def __init__(self):
    self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
    self.vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    names = {self.bos_id: BOS, self.eos_id: EOS}
    out, run = [], bytearray()
    for i in map(int, ids):
      if i == self.pad_id:
        continue
      if 0 <= i < 256:
        run.append(i)
        continue
      if i not in names:
        raise ValueError(f"id {i} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
      out.append(run.decode("utf-8", errors="replace"))
      run = bytearray()
      if not skip_special_tokens:
        out.append(names[i])
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


class WordTokenizer(Tokenizer):
  """A closed vocabulary of whitespace-separated words; ids 0, 1, 2 are pad, bos, eos.

  Unknown words raise a ValueError naming the word: in the offline world every word comes from the
  world's own lists, so an unknown word is a bug, not data. Give ``unk_token`` to map unknown words
  to an <unk> id instead (it is placed right after the three special tokens).
  """

  def __init__(self, words: Sequence[str], unk_token: str | None = None):
    specials = [PAD, BOS, EOS] + ([unk_token] if unk_token is not None else [])
    vocab = specials + list(words)
    for w in vocab:
      if not w or any(c.isspace() for c in w):
        raise ValueError(f"vocabulary words must be non-empty and contain no whitespace, got {w!r}")
    if len(set(vocab)) != len(vocab):
      dups = sorted({w for w in vocab if vocab.count(w) > 1})
      raise ValueError(f"vocabulary has duplicate words (special tokens count): {dups}")
    self.vocab: tuple[str, ...] = tuple(vocab)
    self.index = {w: i for i, w in enumerate(vocab)}
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self.unk_id = 3 if unk_token is not None else None
    self.vocab_size = len(vocab)

  def encode(self, text: str) -> list[int]:
    ids = []
    for w in text.split():
      i = self.index.get(w, self.unk_id)
      if i is None:
        raise ValueError(f"word {w!r} is not in the {self.vocab_size}-word vocabulary")
      ids.append(i)
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    words = []
    for i in map(int, ids):
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"id {i} is outside the vocabulary of {self.vocab_size} words")
      if i == self.pad_id or (skip_special_tokens and i in (self.bos_id, self.eos_id)):
        continue
      words.append(self.vocab[i])
    return " ".join(words)


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer saved in a local directory (never downloads).

  Pad falls back to EOS when the checkpoint defines none (GPT-2, Pythia), and BOS falls back to EOS
  when missing; then ``decode`` drops EOS too, since it cannot tell it from padding.
  """

  def __init__(self, path: str):
    if not os.path.isdir(path):
      raise MissingFileError(f"no Hugging Face tokenizer directory at {path!r}")
    from transformers import (
      AutoTokenizer,
    )  # Imported here: slow, and only real checkpoints need it.

    try:
      self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:  # Missing or damaged tokenizer files.
      raise UserError(f"{path}: cannot load a Hugging Face tokenizer: {e}") from e
    if self.tok.eos_token_id is None:
      raise UserError(f"tokenizer at {path!r} defines no eos token; sampling could never stop")
    self.eos_id = int(self.tok.eos_token_id)
    self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos_id
    self.bos_id = int(self.tok.bos_token_id) if self.tok.bos_token_id is not None else self.eos_id
    self.vocab_size = len(self.tok)

  def encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text, add_special_tokens=False))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.tok.decode(
      [int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=skip_special_tokens
    )


def load_tokenizer(spec: str, world_config=None) -> Tokenizer:
  """'bytes', 'world' (the offline world's words; ``world_config`` picks the world), or a local
  Hugging Face directory."""
  if spec == "bytes":
    return ByteTokenizer()
  if spec == "world":
    from rmscale.data.world import World, WorldConfig  # Late: world.py imports this module.

    return World(world_config or WorldConfig()).tokenizer
  if os.path.isdir(spec):
    return HFTokenizer(spec)
  raise UserError(f"tokenizer spec must be 'bytes', 'world' or a local directory, got {spec!r}")
