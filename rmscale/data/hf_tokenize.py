"""Preference records -> rmscale's static-shape token arrays, with a local Hugging Face tokenizer.

The layout is the one every stage uses (``rmscale.stages.common.sequences``): a left-padded prompt
of ``prompt_len`` tokens, then a right-padded response of ``response_len`` tokens ending in EOS.
``tokenize_comparisons`` returns ``chosen``/``chosen_mask``/``rejected``/``rejected_mask`` exactly as
``rmscale.stages.gold.comparison_arrays`` does, so the RM training step consumes them unchanged.

Special tokens follow the tokenizer's own convention for the start of a text: the prompt is encoded
with ``add_special_tokens=True`` (Llama's BOS; nothing for GPT-NeoX/Pythia and GPT-2), responses
without, then EOS is appended. Prompt and response are encoded separately (as DPO/TRL do), so a
response's first token never merges with the prompt's last.

Length policy (``truncate``): by default a row whose prompt or either response does not fit is
dropped and counted (``FilterReport``), so no training pair is silently altered. With
``truncate=True`` rows are kept and cut on the padding side: a prompt keeps its last ``prompt_len``
tokens (generation continues from its end); a response keeps its first ``response_len`` tokens and
then has no EOS, because the text did not end there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rmscale.data.tokenizer import HFTokenizer


def load_tokenizer(path: str) -> HFTokenizer:
  """A transformers tokenizer from a local directory (pad falls back to EOS, as for Pythia)."""
  return HFTokenizer(path)


@dataclasses.dataclass
class FilterReport:
  """What length filtering did to ``rows`` inputs; ``kept`` holds the surviving row indices."""

  rows: int
  kept: np.ndarray
  prompt_too_long: int = 0
  response_too_long: int = 0  # Rows (not responses) with at least one response too long.
  truncated_prompts: int = 0
  truncated_responses: int = 0

  @property
  def dropped(self) -> int:
    return self.rows - len(self.kept)

  def summary(self) -> dict[str, int]:
    return {
      "rows": self.rows,
      "kept": len(self.kept),
      "dropped_prompt_too_long": self.prompt_too_long,
      "dropped_response_too_long": self.response_too_long,
      "truncated_prompts": self.truncated_prompts,
      "truncated_responses": self.truncated_responses,
    }


def encode_prompts(tok: HFTokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Prompt ids with the tokenizer's start-of-text specials (a trailing EOS some add is removed)."""
  ids = tok.tok(list(texts), add_special_tokens=True)["input_ids"] if texts else []
  return [
    x[:-1] if x and x[-1] == tok.eos_id and tok.eos_id != tok.bos_id else list(x) for x in ids
  ]


def encode_responses(tok: HFTokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Response ids without specials, then EOS."""
  ids = tok.tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []
  return [list(x) + [tok.eos_id] for x in ids]


def pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int, side: str):
  """(ids int32 [n, length], mask bool [n, length]); every sequence must fit."""
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    n = len(s)
    if n > length:
      raise ValueError(f"sequence {i} has {n} tokens, more than length={length}")
    sl = slice(length - n, length) if side == "left" else slice(0, n)
    ids[i, sl], mask[i, sl] = s, True
  return ids, mask


def _cut(seq: list[int], length: int, side: str) -> list[int]:
  return seq[-length:] if side == "left" else seq[:length]


def _check_lengths(prompt_len: int, response_len: int | None = None) -> None:
  if prompt_len <= 0 or (response_len is not None and response_len <= 0):
    raise ValueError(
      f"prompt_len and response_len must be positive, got {prompt_len}, {response_len}"
    )


def tokenize_prompts(
  tok: HFTokenizer, texts: Sequence[str], prompt_len: int, truncate: bool = False
) -> tuple[dict[str, np.ndarray], FilterReport]:
  """Left-padded prompts ``ids``/``mask`` [kept, prompt_len] and the filter report."""
  _check_lengths(prompt_len)
  enc = encode_prompts(tok, texts)
  keep, seqs, report = [], [], FilterReport(len(enc), np.zeros(0, np.int64))
  for i, s in enumerate(enc):
    if len(s) > prompt_len:
      if not truncate:
        report.prompt_too_long += 1
        continue
      report.truncated_prompts += 1
      s = _cut(s, prompt_len, "left")
    keep.append(i)
    seqs.append(s)
  report.kept = np.asarray(keep, np.int64)
  ids, mask = pad(seqs, prompt_len, tok.pad_id, "left")
  return {"ids": ids, "mask": mask}, report


def tokenize_responses(
  tok: HFTokenizer, texts: Sequence[str], response_len: int, truncate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded responses + EOS: (ids, mask, fits) with ``fits`` False where the text was cut
  (``truncate``) or, without truncation, where the row cannot be used (ids then all padding)."""
  _check_lengths(1, response_len)
  enc = encode_responses(tok, texts)
  fits = np.array([len(s) <= response_len for s in enc], bool)
  seqs = [
    s if ok else (_cut(s, response_len, "right") if truncate else []) for s, ok in zip(enc, fits)
  ]
  ids, mask = pad(seqs, response_len, tok.pad_id, "right")
  return ids, mask, fits


def tokenize_comparisons(
  tok: HFTokenizer,
  records: Sequence[dict],
  prompt_len: int,
  response_len: int,
  truncate: bool = False,
) -> tuple[dict[str, np.ndarray], FilterReport]:
  """Uniform records -> ``chosen``, ``chosen_mask``, ``rejected``, ``rejected_mask`` [kept, P + R]."""
  _check_lengths(prompt_len, response_len)
  prompts = encode_prompts(tok, [r["prompt"] for r in records])
  chosen = encode_responses(tok, [r["chosen"] for r in records])
  rejected = encode_responses(tok, [r["rejected"] for r in records])
  report = FilterReport(len(records), np.zeros(0, np.int64))
  keep, p_seqs, c_seqs, r_seqs = [], [], [], []
  for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
    if not truncate:
      if len(p) > prompt_len:
        report.prompt_too_long += 1
        continue
      if len(c) > response_len or len(r) > response_len:
        report.response_too_long += 1
        continue
    else:
      report.truncated_prompts += len(p) > prompt_len
      report.truncated_responses += (len(c) > response_len) + (len(r) > response_len)
      p, c, r = (
        _cut(p, prompt_len, "left"),
        _cut(c, response_len, "right"),
        _cut(r, response_len, "right"),
      )
    keep.append(i)
    p_seqs.append(p)
    c_seqs.append(c)
    r_seqs.append(r)
  report.kept = np.asarray(keep, np.int64)
  p_ids, p_mask = pad(p_seqs, prompt_len, tok.pad_id, "left")
  out = {}
  for name, seqs in (("chosen", c_seqs), ("rejected", r_seqs)):
    ids, mask = pad(seqs, response_len, tok.pad_id, "right")
    out[name] = np.concatenate([p_ids, ids], 1).astype(np.int32)
    out[f"{name}_mask"] = np.concatenate([p_mask, mask], 1).astype(bool)
  return out, report


def decode_sequences(
  tok: HFTokenizer, tokens_NxL: np.ndarray, mask_NxL: np.ndarray, prompt_len: int
) -> list[tuple[str, str, bool]]:
  """(prompt text, response text, finished) per row of the sequence layout; ``finished`` says
  whether the response holds EOS. Only the layout's own specials (BOS, EOS, pad) are dropped: any
  other special token is content (an <unk>, a chat marker) and stays in the text."""
  layout = {tok.bos_id, tok.eos_id, tok.pad_id}
  out = []
  for t, m in zip(np.asarray(tokens_NxL), np.asarray(mask_NxL, bool)):
    p = [int(x) for x in t[:prompt_len][m[:prompt_len]] if int(x) not in layout]
    r = [int(x) for x in t[prompt_len:][m[prompt_len:]]]
    finished = tok.eos_id in r
    if finished:
      r = r[: r.index(tok.eos_id)]
    r = [x for x in r if x not in layout]
    out.append((tok.tok.decode(p), tok.tok.decode(r), finished))
  return out


def retokenize(
  src: HFTokenizer,
  dst: HFTokenizer,
  tokens_NxL: np.ndarray,
  mask_NxL: np.ndarray,
  prompt_len: int,
  dst_prompt_len: int,
  dst_response_len: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Sequences of ``src``'s ids as ``dst``'s, through text (a gold RM with its own vocabulary).

  Prompts and responses are cut to the destination lengths on their padding side (never dropped:
  every sample must get a score); a response that ended keeps its end as ``dst``'s EOS. Ids that
  ``src`` cannot decode (a checkpoint's vocabulary padding beyond the tokenizer's) vanish in the text.
  """
  texts = decode_sequences(src, tokens_NxL, mask_NxL, prompt_len)
  prompts = [_cut(p, dst_prompt_len, "left") for p in encode_prompts(dst, [t[0] for t in texts])]
  bodies = dst.tok([t[1] for t in texts], add_special_tokens=False)["input_ids"] if texts else []
  responses = [
    _cut(list(b) + ([dst.eos_id] if t[2] else []), dst_response_len, "right")
    for b, t in zip(bodies, texts)
  ]
  p_ids, p_mask = pad(prompts, dst_prompt_len, dst.pad_id, "left")
  r_ids, r_mask = pad(responses, dst_response_len, dst.pad_id, "right")
  return np.concatenate([p_ids, r_ids], 1), np.concatenate([p_mask, r_mask], 1)
