"""TFDS builders for the preference datasets, written as array_record (read back without TensorFlow).

    builder = build("hh_rlhf", manual_dir="/data/raw/hh-rlhf", data_dir="/data/tfds")
    train = load("hh_rlhf", "/data/tfds", "train")      # random access: len(train), train[i]
    python -m rmscale.data.preference_builders --dataset=hh_rlhf --manual_dir=... --data_dir=...

Each builder reads the user's local copy of the published files (``manual_dir``; nothing is
downloaded) through ``rmscale.data.preference_formats`` and writes the uniform record. A built
dataset is reused as is: delete ``<data_dir>/<name>`` to rebuild after the raw files change. Rows
skipped for non-corruption reasons (see preference_formats) are counted per split in the dataset's
``metadata.json`` (``builder.info.metadata["skipped"]``).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from rmscale import errors
from rmscale.data import preference_formats as formats
from rmscale.errors import UserError

_log = logging.getLogger(__name__)
_VERSION = "1.0.0"


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One published format (``NAME`` in ``formats.FORMATS``) as train/test of uniform records."""

  NAME = ""
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Uniform preference records from the published files."}

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS resolves a packaged builder's file through `importlib_resources`, which it declares only
    # for Python < 3.9 yet imports on every version; the file itself is all it needs.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    score = tfds.features.Scalar(dtype=np.float32)
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"{self.NAME}: prompt, chosen, rejected, scores (NaN when absent), source, id.",
      features=tfds.features.FeaturesDict(
        {
          "prompt": text,
          "chosen": text,
          "rejected": text,
          "score_chosen": score,
          "score_rejected": score,
          "source": text,
          "id": text,
        }
      ),
      homepage=formats.FORMATS[self.NAME].homepage,
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError:  # TFDS asserts; callers want the directory named in a UserError.
      raise UserError(
        f"{self.NAME}: manual directory {os.fspath(dl_manager._manual_dir)!r} is missing or empty. "
        + formats.FORMATS[self.NAME].instructions
      ) from None
    return {split: self._generate_examples(manual_dir, split) for split in formats.SPLITS}

  def _generate_examples(self, manual_dir: str, split: str):
    skipped: Counter = Counter()
    for rec in formats.FORMATS[self.NAME].records(manual_dir, split, skipped):
      yield rec["id"], rec
    self.info.metadata.setdefault("skipped", {})[split] = dict(skipped)
    if skipped:
      _log.warning("%s/%s: skipped %s", self.NAME, split, dict(skipped))


class HhRlhf(_PreferenceBuilder):
  """Anthropic HH-RLHF (Bai et al. 2022): helpful and harmless dialogue comparisons."""

  NAME = "hh_rlhf"
  MANUAL_DOWNLOAD_INSTRUCTIONS = formats.FORMATS[NAME].instructions


class Tldr(_PreferenceBuilder):
  """Reddit TL;DR summary comparisons of Stiennon et al. (2020)."""

  NAME = "tldr"
  MANUAL_DOWNLOAD_INSTRUCTIONS = formats.FORMATS[NAME].instructions


class Ultrafeedback(_PreferenceBuilder):
  """UltraFeedback (Cui et al. 2023), binarised by HuggingFaceH4 (Zephyr)."""

  NAME = "ultrafeedback"
  MANUAL_DOWNLOAD_INSTRUCTIONS = formats.FORMATS[NAME].instructions


class UnifiedFeedback(_PreferenceBuilder):
  """Unified-Feedback (llm-blender): several preference sets in one conversation format."""

  NAME = "unified_feedback"
  MANUAL_DOWNLOAD_INSTRUCTIONS = formats.FORMATS[NAME].instructions


BUILDERS: dict[str, type[_PreferenceBuilder]] = {
  b.NAME: b for b in (HhRlhf, Tldr, Ultrafeedback, UnifiedFeedback)
}


def builder(name: str, data_dir: str) -> _PreferenceBuilder:
  if name not in BUILDERS:
    raise UserError(f"unknown preference dataset {name!r}; known: {sorted(BUILDERS)}")
  return BUILDERS[name](data_dir=data_dir)


def build(name: str, manual_dir: str, data_dir: str) -> _PreferenceBuilder:
  """Prepares ``name`` from the raw files in ``manual_dir`` under ``data_dir`` (once)."""
  b = builder(name, data_dir)
  if not os.path.isdir(manual_dir):
    raise UserError(
      f"{name}: manual directory {manual_dir!r} does not exist. "
      + formats.FORMATS[name].instructions
    )
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return b


def is_built(name: str, data_dir: str) -> bool:
  return builder(name, data_dir).is_prepared()


class Records(Sequence):
  """A split as a random-access sequence of uniform records (str fields, float scores)."""

  def __init__(self, source, name: str, split: str):
    self.source, self.name, self.split = source, name, split

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.batch(range(*i.indices(len(self))))
    return decode(self.source[i])

  def batch(self, indices) -> list[dict]:
    """Records at ``indices`` (one read for many rows)."""
    return [decode(x) for x in self.source.__getitems__([int(i) for i in indices])]


def decode(example: dict) -> dict:
  """A stored example as the uniform record (TFDS returns text as bytes)."""
  out = {}
  for key in formats.RECORD_FIELDS:
    value = example[key]
    out[key] = value.decode("utf-8") if isinstance(value, bytes) else float(value)
  return out


def load(name: str, data_dir: str, split: str) -> Records:
  """The built ``split`` of ``name`` as random-access ``Records``."""
  b = builder(name, data_dir)
  if not b.is_prepared():
    raise UserError(
      f"{name}: no prepared dataset under {data_dir!r}; build it first with "
      f"rmscale.data.preference_builders.build({name!r}, manual_dir, {data_dir!r})"
    )
  if split not in formats.SPLITS:
    raise ValueError(f"{name}: split must be one of {formats.SPLITS}, got {split!r}")
  return Records(b.as_data_source(split=split), name, split)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description="Build a preference dataset from local raw files.")
  p.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
  p.add_argument("--manual_dir", required=True, help="the published files, as downloaded")
  p.add_argument("--data_dir", required=True, help="where the array_record dataset is written")
  p.add_argument("--show", type=int, default=2, help="records of each split to print")
  p.add_argument("--debug", action="store_true", help="show the traceback of input errors")
  args = p.parse_args(argv)
  with errors.reported(args.debug):  # A malformed raw file ends the command in one line, exit 2.
    b = build(args.dataset, args.manual_dir, args.data_dir)
    for split in formats.SPLITS:
      recs = load(args.dataset, args.data_dir, split)
      skipped = b.info.metadata.get("skipped", {}).get(split, {})
      print(f"{args.dataset}/{split}: {len(recs)} records; skipped {skipped}")
      for r in recs[: args.show]:
        short = {
          k: (v[:80] + "..." if isinstance(v, str) and len(v) > 80 else v) for k, v in r.items()
        }
        print("  ", short)


if __name__ == "__main__":
  main(sys.argv[1:])
