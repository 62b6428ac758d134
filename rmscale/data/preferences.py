"""A real preference dataset as the experiment's prompt source (``config.data.kind = "preferences"``).

``PreferencePrompts`` offers what the stages take from the offline ``World`` (tokenizer,
``prompt_len``, ``response_len``, ``sample_prompts``, ``sft_examples``, ``utility``), over a TFDS
preference dataset (``preference_builders``) and a local Hugging Face tokenizer:

- prompts are the dataset's distinct prompts (first occurrence order of the stored split), tokenised
  once at start-up, left-padded to ``prompt_len``; those that do not fit are dropped (or cut, with
  ``truncate``) and counted in ``filter_report``. ``train`` prompts come from the train split,
  ``eval`` prompts from the test split; a prompt's ``index`` counts train prompts first.
- SFT examples pair a prompt with the chosen response of its first comparison (cut to
  ``response_len``; a cut response has no EOS). Gao et al. and Coste et al. start from an SFT
  policy; DPO's HH setup fine-tunes on the chosen responses, as here.
- ``comparisons(split, n)`` gives the dataset's own labelled pairs in the RM layout (to measure a
  gold RM against human labels).
- Real data has no hidden utility: ``utility`` is NaN (``has_utility = False``), and the gold RM
  is the ground truth of the experiment.

The dataset is built from ``manual_dir`` on first use (by process 0; the others wait).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from rmscale import checks
from rmscale.data import hf_tokenize
from rmscale.data import preference_builders as builders
from rmscale.errors import UserError

_log = logging.getLogger(__name__)

_READ_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """``config.data`` of an experiment on a preference dataset (fields documented in the configs)."""

  kind: str = "preferences"
  dataset: str = "hh_rlhf"
  manual_dir: str = ""
  data_dir: str = ""
  tokenizer_dir: str = ""
  prompt_len: int = 256
  response_len: int = 128
  truncate: bool = False
  max_prompts: int = 0  # Per split; 0 reads every record.

  def __post_init__(self):
    if self.kind != "preferences":
      raise UserError(f"config.data.kind={self.kind!r}: a DataConfig is for 'preferences'")
    if self.dataset not in builders.BUILDERS:
      raise UserError(
        f"config.data.dataset={self.dataset!r} is not one of {sorted(builders.BUILDERS)}"
      )
    for key in ("manual_dir", "data_dir", "tokenizer_dir"):
      if not getattr(self, key):
        raise UserError(f"config.data.{key} must name a directory")
    fields = {"data": dataclasses.asdict(self)}
    for key, minimum in (("prompt_len", 1), ("response_len", 1), ("max_prompts", 0)):
      checks.count(fields, f"data.{key}", minimum)  # max_prompts=0: all.


def read_all(records: builders.Records, limit: int = 0) -> list[dict]:
  n = len(records) if not limit else min(limit, len(records))
  out = []
  for start in range(0, n, _READ_CHUNK):
    out += records.batch(range(start, min(n, start + _READ_CHUNK)))
  return out


class PreferencePrompts:
  """Prompts, SFT examples and labelled comparisons of one preference dataset (module docstring)."""

  has_utility = False

  def __init__(self, cfg: DataConfig):
    from rmscale.parallel import distributed

    self.cfg = cfg
    try:
      self.tokenizer = hf_tokenize.load_tokenizer(cfg.tokenizer_dir)
    except (ValueError, OSError) as e:
      raise UserError(f"config.data.tokenizer_dir={cfg.tokenizer_dir!r}: {e}") from None
    if distributed.agree(not builders.is_built(cfg.dataset, cfg.data_dir)):
      import jax

      if jax.process_index() == 0:
        builders.build(cfg.dataset, cfg.manual_dir, cfg.data_dir)
      distributed.barrier(f"preference dataset {cfg.dataset} built")
    self.prompt_len, self.response_len = cfg.prompt_len, cfg.response_len
    self.splits = {"train": "train", "eval": "test"}
    self.records = {s: builders.load(cfg.dataset, cfg.data_dir, t) for s, t in self.splits.items()}
    self._prompts: dict[str, dict[str, np.ndarray]] = {}
    self.filter_report: dict[str, dict] = {}
    for split, recs in self.records.items():
      rows = read_all(recs, cfg.max_prompts)
      first: dict[str, int] = {}
      for i, r in enumerate(rows):
        first.setdefault(r["prompt"], i)
      texts = list(first)
      arrays, report = hf_tokenize.tokenize_prompts(
        self.tokenizer, texts, cfg.prompt_len, cfg.truncate
      )
      if not len(report.kept):
        raise UserError(
          f"config.data.prompt_len={cfg.prompt_len}: no {split} prompt of {cfg.dataset} fits "
          f"({len(texts)} distinct prompts; set data.truncate=True to cut them instead)"
        )
      arrays["row"] = np.array([first[texts[i]] for i in report.kept], np.int64)
      self._prompts[split] = arrays
      self.filter_report[split] = {"records": len(rows), **report.summary()}
    self.num_train_prompts = len(self._prompts["train"]["ids"])
    self.num_eval_prompts = len(self._prompts["eval"]["ids"])
    self.num_prompts = self.num_train_prompts + self.num_eval_prompts
    # Global prompt index: train prompts first, then eval prompts.
    both = [self._prompts["train"], self._prompts["eval"]]
    self._ids, self._mask = (np.concatenate([p[k] for p in both]) for k in ("ids", "mask"))
    _log.info("preference prompts: %s", self.describe())

  # --- What the stages use.
  def prompt_batch(self, index) -> dict[str, np.ndarray]:
    index = np.asarray(index, np.int64)
    if index.ndim != 1 or (index.size and (index.min() < 0 or index.max() >= self.num_prompts)):
      raise ValueError(f"prompt indices must be a 1-D array in [0, {self.num_prompts})")
    return dict(index=index, ids=self._ids[index], mask=self._mask[index])

  def sample_prompts(self, rng, n: int, split: str = "train") -> dict[str, np.ndarray]:
    """``n`` prompts drawn uniformly with replacement from a split (``train``, ``eval`` or ``all``)."""
    rng = np.random.default_rng(rng)
    lo, hi = {
      "train": (0, self.num_train_prompts),
      "eval": (self.num_train_prompts, self.num_prompts),
      "all": (0, self.num_prompts),
    }.get(split, (None, None))
    if lo is None:
      raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    return self.prompt_batch(rng.integers(lo, hi, n))

  def sft_examples(self, rng, n: int, split: str = "train") -> dict[str, np.ndarray]:
    """``n`` (prompt, chosen response) pairs in the World's ``sft_examples`` layout."""
    prompts = self.sample_prompts(rng, n, split)
    ids = np.full((n, self.response_len), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((n, self.response_len), bool)
    is_eval = prompts["index"] >= self.num_train_prompts
    for name, sel in (("train", ~is_eval), ("eval", is_eval)):
      if not sel.any():
        continue
      local = prompts["index"][sel] - (self.num_train_prompts if name == "eval" else 0)
      uniq, inverse = np.unique(self._prompts[name]["row"][local], return_inverse=True)
      chosen = [r["chosen"] for r in self.records[name].batch(uniq)]
      r_ids, r_mask, _ = hf_tokenize.tokenize_responses(
        self.tokenizer, chosen, self.response_len, truncate=True
      )
      ids[sel], mask[sel] = r_ids[inverse], r_mask[inverse]
    return dict(
      prompt_index=prompts["index"],
      prompt_ids=prompts["ids"],
      prompt_mask=prompts["mask"],
      response_ids=ids,
      response_mask=mask,
    )

  def comparisons(
    self, split: str, n: int
  ) -> tuple[dict[str, np.ndarray], hf_tokenize.FilterReport]:
    """Of the first ``n`` labelled pairs of a split (stored order), those that fit, in the RM layout."""
    if split not in self.records:
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rows = read_all(self.records[split], n)
    arrays, report = hf_tokenize.tokenize_comparisons(
      self.tokenizer, rows, self.prompt_len, self.response_len, self.cfg.truncate
    )
    if not len(report.kept):
      raise UserError(
        f"config.data.prompt_len/response_len: none of the first {len(rows)} {split} comparisons "
        f"of {self.cfg.dataset} fits ({report.summary()}); set data.truncate=True to cut them"
      )
    return arrays, report

  def utility(self, prompt_ids_BxP, response_ids_BxR, response_mask_BxR) -> np.ndarray:
    """NaN: real data has no hidden utility (the gold RM is the ground truth)."""
    del response_ids_BxR, response_mask_BxR
    return np.full((np.shape(prompt_ids_BxP)[0],), np.nan, np.float32)

  def texts(self, prompt_ids, response_ids, response_mask) -> list[tuple[str, str]]:
    """Readable (prompt, response) pairs; the response shows EOS where the sample ended."""
    tok, out = self.tokenizer, []
    for p, r, m in zip(np.asarray(prompt_ids), np.asarray(response_ids), np.asarray(response_mask)):
      prompt = tok.tok.decode([int(x) for x in p if int(x) != tok.pad_id], skip_special_tokens=True)
      out.append((prompt, tok.tok.decode([int(x) for x in r[np.asarray(m, bool)]])))
    return out

  def describe(self) -> str:
    c, f = self.cfg, self.filter_report
    return (
      f"{c.dataset} ({c.manual_dir}): {self.num_train_prompts:,} train and "
      f"{self.num_eval_prompts:,} eval prompts of <= {c.prompt_len} tokens, responses of <= "
      f"{c.response_len} tokens; filtering: train {f['train']}, eval {f['eval']}"
    )


def data_config(data) -> DataConfig:
  """``config.data`` (a ConfigDict or dict) as a checked DataConfig; unknown keys are named."""
  fields = {f.name for f in dataclasses.fields(DataConfig)}
  unknown = sorted(set(dict(data)) - fields)
  if unknown:
    raise UserError(f"config.data has unknown field(s) {unknown}; known: {sorted(fields)}")
  return DataConfig(**dict(data))


def from_config(data) -> PreferencePrompts:
  """``PreferencePrompts`` from an experiment's ``config.data``."""
  return PreferencePrompts(data_config(data))
