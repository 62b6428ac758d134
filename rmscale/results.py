"""Atomic result files: JSON, JSONL records and NumPy archives under the workdir.

Every file is written whole (``fs.write``: locally a temporary file renamed into place, remotely one
object upload), so a killed run leaves either the old file or the new one, never half of one. The
workdir may be local or remote (``gs://...``). In a multi-host job only process 0 writes (every
process computes the same replicated results); the others skip the write.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from collections.abc import Callable, Iterable

import jax
import numpy as np

from rmscale import fs
from rmscale.errors import UserError


def atomic_write(path: str, write) -> None:
  """``fs.write`` on process 0 only: readers on other hosts wait at a barrier (pipeline.run)."""
  if jax.process_index() == 0:
    fs.write(path, write)


def _default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"cannot serialise {type(x).__name__} to JSON")


def write_json(path: str, obj) -> None:
  atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=_default).encode()))


def read_json(path: str):
  """The JSON value of ``path``; a missing, truncated or corrupt file is a UserError naming it."""
  try:
    return json.loads(fs.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(
      f"{path}: corrupt or truncated JSON ({e.msg} at line {e.lineno} column {e.colno})"
    ) from None


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
        raise UserError(f"{source}:{i}: corrupt JSON record ({e.msg})") from None
  return out


def read_jsonl(path: str) -> list[dict]:
  return parse_jsonl(fs.read_text(path), path)


def write_npz(path: str, **arrays) -> None:
  atomic_write(path, lambda f: np.savez(f, **arrays))


def read_npz(path: str, keep: Callable[[str], bool] = lambda key: True) -> dict[str, np.ndarray]:
  """The arrays of ``path`` whose names pass ``keep``. A local file is read lazily (only the kept
  arrays); a remote one in a single read, since each lazy read would be a request. A missing,
  truncated or corrupt file is a UserError naming it."""
  source = io.BytesIO(fs.read_bytes(path)) if fs.is_remote(path) else path
  try:
    with np.load(source) as z:
      return {k: z[k] for k in z.files if keep(k)}
  except FileNotFoundError:
    raise fs.MissingFileError(f"cannot read {path}: no such file") from None
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise UserError(f"{path}: corrupt or truncated array file ({e})") from None


def write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text.encode()))
