"""Published preference datasets, read from the user's local copies, as one uniform record.

Every format yields dicts with the same fields (``RECORD_FIELDS``):

- ``prompt``: the shared context, as an Anthropic HH transcript ending in ``"\\n\\nAssistant:"`` (or
  the TL;DR post ending in ``"\\n\\nTL;DR:"``), so one base LM (Pythia) reads every dataset alike;
- ``chosen`` / ``rejected``: the two responses as continuations of the prompt (starting with a
  space, as in HH);
- ``score_chosen`` / ``score_rejected``: the dataset's own ratings, NaN where it has none;
- ``source``: dataset (and subset) the row came from; ``id``: ``<file>:<line>`` or ``<file>:row<n>``
  relative to the manual directory, so any record can be traced back to its line.

Formats (field names as published; checked against the dataset cards and code that reads them):

==================  ========================================  ====================================
dataset             files under the manual directory           fields read
==================  ========================================  ====================================
``hh_rlhf``         ``<subset>/{train,test}.jsonl[.gz]``       ``chosen``, ``rejected`` (full
                    (Anthropic/hh-rlhf; also flat files)       transcripts)
``tldr``            ``comparisons/batch*.json`` (JSON lines;   ``info{post,title,subreddit}`` or
                    openai/summarize-from-feedback)            ``info{article}``, ``summaries[2]
                                                               {text}``, ``choice``, ``split``
``ultrafeedback``   ``**/{train,test}_prefs*.parquet``         ``chosen``/``rejected`` (message
                    (HuggingFaceH4/ultrafeedback_binarized)    lists), ``score_chosen``,
                                                               ``score_rejected``
``unified_feedback``  ``**/*.parquet`` whose name or folder    ``conv_A``/``conv_B`` (message
                    starts with ``train`` or ``val``           lists), ``conv_A_rating``,
                    (llm-blender/Unified-Feedback)             ``conv_B_rating``; ``source``
==================  ========================================  ====================================

Splits are ``train`` and ``test`` for all four: TL;DR's ``valid1`` and ``valid2`` rows and
Unified-Feedback's ``val`` files form ``test``.

Rows are skipped, and counted in the ``skipped`` Counter the caller passes, only for reasons that are
not corruption: chosen and rejected disagree on the prompt (``prompt_mismatch``: a handful of HH
rows diverge before the last turn), the two responses are identical (``identical``), or
Unified-Feedback rates both sides the same (``tie``: no preference). Anything malformed (bad JSON, a
missing or mistyped field, an unreadable file) raises a `UserError` (a ValueError) naming the file,
the line or row, and the field.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import math
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator

from rmscale.errors import UserError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
RECORD_FIELDS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "source", "id")
SPLITS = ("train", "test")
NAN = float("nan")
_ROLES = {"user": HUMAN, "human": HUMAN, "assistant": ASSISTANT, "gpt": ASSISTANT}


def _type_name(kind) -> str:
  names = {str: "a string", list: "a list", dict: "an object", int: "an integer"}
  if isinstance(kind, tuple):
    return "a number"
  return names.get(kind, kind.__name__)


def field(obj, key: str, kind, where: str):
  """``obj[key]``, checked to be of ``kind``; otherwise a UserError naming ``where`` and ``key``."""
  if not isinstance(obj, dict):
    raise UserError(f"{where}: expected an object with field {key!r}, got {type(obj).__name__}")
  if key not in obj:
    raise UserError(f"{where}: missing field {key!r}")
  value = obj[key]
  ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
  if not ok:
    raise UserError(
      f"{where}: field {key!r} must be {_type_name(kind)}, got {type(value).__name__}"
    )
  return value


def _number(obj, key: str, where: str) -> float:
  value = float(field(obj, key, (int, float), where))
  if not math.isfinite(value):
    raise UserError(f"{where}: field {key!r} must be a finite number, got {value}")
  return value


def record(prompt, chosen, rejected, score_chosen, score_rejected, source, id_) -> dict:
  return dict(
    prompt=prompt,
    chosen=chosen,
    rejected=rejected,
    score_chosen=float(score_chosen),
    score_rejected=float(score_rejected),
    source=source,
    id=id_,
  )


# --- Reading files.


def iter_jsonl(path: str) -> Iterator[tuple[int, object]]:
  """``(line number, object)`` per non-blank line of a JSON-lines file (gzipped if it ends in .gz)."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(
            f"{path}:{i}: corrupt JSON record ({e.msg} at column {e.colno})"
          ) from None
        yield i, obj
  except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
    raise UserError(f"{path}: unreadable file ({type(e).__name__}: {e})") from None


def iter_parquet(path: str, columns: tuple[str, ...], optional=()) -> Iterator[tuple[int, dict]]:
  """``(row number, row dict)`` per row of a parquet file; a missing column raises naming the file."""
  import pyarrow.parquet as pq  # Only the parquet formats need it.

  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file.
    raise UserError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
  names = set(pf.schema_arrow.names)
  missing = [c for c in columns if c not in names]
  if missing:
    raise UserError(f"{path}: missing field(s) {missing} (columns present: {sorted(names)})")
  wanted = list(columns) + [c for c in optional if c in names]
  row = 0
  for group in range(pf.num_row_groups):
    try:
      table = pf.read_row_group(group, columns=wanted)
    except Exception as e:
      raise UserError(f"{path}: row group {group} is corrupt ({type(e).__name__}: {e})") from None
    for values in table.to_pylist():
      yield row, values
      row += 1


def _find(manual_dir: str, patterns: tuple[str, ...]) -> list[str]:
  out: set[str] = set()
  for p in patterns:
    out.update(glob.glob(os.path.join(manual_dir, p), recursive=True))
  return sorted(f for f in out if os.path.isfile(f))


# --- Conversations.


def render(messages, where: str, key: str) -> str:
  """An HH transcript of a message list: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.

  A ``system`` message becomes plain text before the first turn.
  """
  if not isinstance(messages, list):
    raise UserError(
      f"{where}: field {key!r} must be a list of messages, got {type(messages).__name__}"
    )
  parts = []
  for j, m in enumerate(messages):
    sub = f"{key}[{j}]"
    role = field(m, "role", str, f"{where}: {sub}") if isinstance(m, dict) else None
    content = field(m, "content", str, f"{where}: {sub}")
    if role == "system":
      parts.append(content)
    elif role in _ROLES:
      parts.append(f"{_ROLES[role]} {content}")
    else:
      raise UserError(
        f"{where}: field '{sub}.role'={role!r} is not one of {sorted(_ROLES)} or 'system'"
      )
  return "".join(parts)


def split_conversation(messages, where: str, key: str) -> tuple[str, str]:
  """(prompt, response): the transcript before the final assistant turn, and that turn."""
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where}: field {key!r} must be a non-empty list of messages")
  last = messages[-1]
  role = field(last, "role", str, f"{where}: {key}[{len(messages) - 1}]")
  if _ROLES.get(role) != ASSISTANT:
    raise UserError(
      f"{where}: field {key!r} must end with an assistant message, but its last role is {role!r}"
    )
  content = field(last, "content", str, f"{where}: {key}[{len(messages) - 1}]")
  return render(messages[:-1], where, key) + ASSISTANT, " " + content


def _emit(prompt, chosen, rejected, rejected_prompt, skipped: Counter, **rest) -> dict | None:
  if rejected_prompt != prompt:
    skipped["prompt_mismatch"] += 1
    return None
  if chosen == rejected:
    skipped["identical"] += 1
    return None
  return record(prompt, chosen, rejected, **rest)


# --- The four formats.


def hh_rlhf(manual_dir: str, split: str, skipped: Counter) -> Iterator[dict]:
  files = _find(
    manual_dir, (f"{split}.jsonl", f"{split}.jsonl.gz", f"*/{split}.jsonl", f"*/{split}.jsonl.gz")
  )
  _require(files, manual_dir, split, "hh_rlhf", f"<subset>/{split}.jsonl.gz")
  for path in files:
    rel = os.path.relpath(path, manual_dir)
    subset = os.path.dirname(rel) or "hh-rlhf"
    for i, obj in iter_jsonl(path):
      where = f"{path}:{i}"
      chosen = field(obj, "chosen", str, where)
      rejected = field(obj, "rejected", str, where)
      cut = chosen.rfind(ASSISTANT)
      if cut < 0:
        raise UserError(f"{where}: field 'chosen' has no {ASSISTANT!r} turn")
      prompt = chosen[: cut + len(ASSISTANT)]
      rec = _emit(
        prompt,
        chosen[len(prompt) :],
        rejected[len(prompt) :],
        rejected[: len(prompt)],
        skipped,
        score_chosen=NAN,
        score_rejected=NAN,
        source=f"hh_rlhf/{subset}",
        id_=f"{rel}:{i}",
      )
      if rec is not None:
        yield rec


def tldr_prompt(info, where: str) -> str:
  """Stiennon et al.'s query format: subreddit, title and post, then ``TL;DR:``."""
  if isinstance(info, dict) and "post" in info:
    post = field(info, "post", str, f"{where}: info")
    title = field(info, "title", str, f"{where}: info")
    subreddit = info.get("subreddit")
    head = f"SUBREDDIT: r/{subreddit}\n\n" if isinstance(subreddit, str) and subreddit else ""
    return f"{head}TITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
  if isinstance(info, dict) and "article" in info:  # The CNN/DM batches of the same release.
    return f"ARTICLE: {field(info, 'article', str, f'{where}: info')}\n\nTL;DR:"
  raise UserError(f"{where}: field 'info' has neither 'post' nor 'article'")


def tldr(manual_dir: str, split: str, skipped: Counter) -> Iterator[dict]:
  files = _find(manual_dir, ("comparisons/*.json", "comparisons/*.jsonl", "*.json", "*.jsonl"))
  _require(files, manual_dir, split, "tldr", "comparisons/batch*.json")
  for path in files:
    rel = os.path.relpath(path, manual_dir)
    for i, obj in iter_jsonl(path):
      where = f"{path}:{i}"
      row_split = field(obj, "split", str, where)
      if row_split == "train":
        mine = split == "train"
      elif row_split.startswith("valid") or row_split == "test":
        mine = split == "test"
      else:
        raise UserError(f"{where}: field 'split'={row_split!r} is not train, valid1/2 or test")
      if not mine:
        continue
      prompt = tldr_prompt(field(obj, "info", dict, where), where)
      summaries = field(obj, "summaries", list, where)
      if len(summaries) != 2:
        raise UserError(f"{where}: field 'summaries' must hold 2 summaries, got {len(summaries)}")
      texts = [
        " " + field(s, "text", str, f"{where}: summaries[{j}]").strip()
        for j, s in enumerate(summaries)
      ]
      choice = field(obj, "choice", int, where)
      if choice not in (0, 1):
        raise UserError(f"{where}: field 'choice'={choice} must be 0 or 1")
      rec = _emit(
        prompt,
        texts[choice],
        texts[1 - choice],
        prompt,
        skipped,
        score_chosen=NAN,
        score_rejected=NAN,
        source="tldr/" + ("reddit" if "post" in obj["info"] else "cnndm"),
        id_=f"{rel}:{i}",
      )
      if rec is not None:
        yield rec


def ultrafeedback(manual_dir: str, split: str, skipped: Counter) -> Iterator[dict]:
  files = _find(manual_dir, (f"**/{split}_prefs*.parquet",))
  _require(files, manual_dir, split, "ultrafeedback", f"data/{split}_prefs-*.parquet")
  cols = ("chosen", "rejected", "score_chosen", "score_rejected")
  for path in files:
    rel = os.path.relpath(path, manual_dir)
    for i, row in iter_parquet(path, cols):
      where = f"{path}: row {i}"
      prompt, chosen = split_conversation(row["chosen"], where, "chosen")
      rejected_prompt, rejected = split_conversation(row["rejected"], where, "rejected")
      rec = _emit(
        prompt,
        chosen,
        rejected,
        rejected_prompt,
        skipped,
        score_chosen=_number(row, "score_chosen", where),
        score_rejected=_number(row, "score_rejected", where),
        source="ultrafeedback",
        id_=f"{rel}:row{i}",
      )
      if rec is not None:
        yield rec


def _unified_split(path: str) -> str | None:
  names = [os.path.basename(path), os.path.basename(os.path.dirname(path))]
  for name in names:
    low = name.lower()
    if low.startswith("train"):
      return "train"
    if low.startswith(("val", "test")):
      return "test"
  return None


def unified_feedback(manual_dir: str, split: str, skipped: Counter) -> Iterator[dict]:
  files = [f for f in _find(manual_dir, ("**/*.parquet",)) if _unified_split(f) == split]
  _require(files, manual_dir, split, "unified_feedback", "all/train-*.parquet, all/val-*.parquet")
  cols = ("conv_A", "conv_B", "conv_A_rating", "conv_B_rating")
  for path in files:
    rel = os.path.relpath(path, manual_dir)
    for i, row in iter_parquet(path, cols, optional=("source",)):
      where = f"{path}: row {i}"
      ra, rb = _number(row, "conv_A_rating", where), _number(row, "conv_B_rating", where)
      if ra == rb:
        skipped["tie"] += 1
        continue
      prompt_a, a = split_conversation(row["conv_A"], where, "conv_A")
      prompt_b, b = split_conversation(row["conv_B"], where, "conv_B")
      a_wins = ra > rb
      origin = row.get("source")
      rec = _emit(
        prompt_a,
        a if a_wins else b,
        b if a_wins else a,
        prompt_b,
        skipped,
        score_chosen=max(ra, rb),
        score_rejected=min(ra, rb),
        source="unified_feedback" + (f"/{origin}" if isinstance(origin, str) and origin else ""),
        id_=f"{rel}:row{i}",
      )
      if rec is not None:
        yield rec


def _require(files: list[str], manual_dir: str, split: str, name: str, expected: str) -> None:
  if not os.path.isdir(manual_dir):
    raise UserError(f"{name}: manual directory {manual_dir!r} does not exist")
  if not files:
    raise UserError(
      f"{name}: no files for split {split!r} in {manual_dir!r} (expected e.g. {expected}; "
      f"see {FORMATS[name].homepage})"
    )


@dataclasses.dataclass(frozen=True)
class Format:
  records: Callable[[str, str, Counter], Iterator[dict]]  # (manual_dir, split, skipped).
  homepage: str
  instructions: str


FORMATS: dict[str, Format] = {
  "hh_rlhf": Format(
    hh_rlhf,
    "https://huggingface.co/datasets/Anthropic/hh-rlhf",
    "Copy the Anthropic/hh-rlhf repository (e.g. `huggingface-cli download Anthropic/hh-rlhf "
    "--repo-type=dataset --local-dir <manual_dir>`): <subset>/{train,test}.jsonl.gz for "
    "harmless-base, helpful-base, helpful-online, helpful-rejection-sampled (red-team-attempts is "
    "a different format; leave it out).",
  ),
  "tldr": Format(
    tldr,
    "https://github.com/openai/summarize-from-feedback",
    "Copy the comparisons of openai/summarize-from-feedback (`azcopy copy "
    "https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons "
    "<manual_dir> --recursive`): comparisons/batch*.json, one JSON object per line.",
  ),
  "ultrafeedback": Format(
    ultrafeedback,
    "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized",
    "Copy HuggingFaceH4/ultrafeedback_binarized (`huggingface-cli download "
    "HuggingFaceH4/ultrafeedback_binarized --repo-type=dataset --local-dir <manual_dir>`): "
    "data/train_prefs-*.parquet and data/test_prefs-*.parquet.",
  ),
  "unified_feedback": Format(
    unified_feedback,
    "https://huggingface.co/datasets/llm-blender/Unified-Feedback",
    "Copy one config of llm-blender/Unified-Feedback (e.g. `huggingface-cli download "
    "llm-blender/Unified-Feedback --repo-type=dataset --include 'all/*' --local-dir "
    "<manual_dir>`): parquet files whose name or folder starts with train or val.",
  ),
}
