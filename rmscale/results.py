"""Atomic result files: JSON, JSONL records and NumPy archives under the workdir.

Every file is written to a temporary name in the same directory and renamed into place, so a
killed run leaves either the old file or the new one, never half of one. In a multi-host job only
process 0 writes (every process computes the same replicated results); the others skip the write.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import jax
import numpy as np

from rmscale import atomic


def atomic_write(path: str, write) -> None:
  """``atomic.write`` on process 0 only: readers on other hosts wait at a barrier (pipeline.run)."""
  if jax.process_index() == 0:
    atomic.write(path, write)


def _default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"cannot serialise {type(x).__name__} to JSON")


def write_json(path: str, obj) -> None:
  atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=_default).encode()))


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_jsonl(path: str, records: Iterable[dict]) -> None:
  text = "".join(json.dumps(r, default=_default) + "\n" for r in records)
  atomic_write(path, lambda f: f.write(text.encode()))


def parse_jsonl(text: str, source: str) -> list[dict]:
  """Records of a JSONL text; a corrupt line raises naming ``source`` and the line number."""
  out = []
  for i, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{source}:{i}: corrupt JSON record ({e.msg})") from None
  return out


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return parse_jsonl(f.read(), path)


def write_npz(path: str, **arrays) -> None:
  atomic_write(path, lambda f: np.savez(f, **arrays))


def read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{path}: corrupt or truncated array file ({e})") from None


def write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text.encode()))
