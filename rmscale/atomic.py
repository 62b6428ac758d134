"""Atomic file writes: a temporary file beside the target, fsynced, then renamed into place.

A reader (or a run resumed after a kill) sees either the old file or the new one, never half of
one. Free of JAX so that launch scripts can use it without starting a runtime.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def write(path: str | os.PathLike, fill: Callable[[BinaryIO], object]) -> None:
  """Calls ``fill(binary_file)`` on a temporary file beside ``path``, then renames it to ``path``."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide shared results and checkpoints from others.
    with os.fdopen(fd, "wb") as f:
      fill(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
