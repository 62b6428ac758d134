"""Workdir files on a local disk or in an object store (``gs://bucket/run``), through one set of helpers.

A path with a URL scheme (``gs://``, ``s3://``, ...) goes through ``etils.epath``, the layer orbax
checkpoints and ``rmscale.report`` already use (TensorFlow's gfile where TensorFlow is installed,
else fsspec with gcsfs/s3fs). Every other path is a POSIX path and keeps plain ``os``/``open`` and
``atomic.write`` (temporary file, fsync, rename), so local runs behave exactly as before and never
import epath.

Free of JAX, like ``atomic``, so launch scripts can use it without starting a runtime.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from typing import BinaryIO

from rmscale import atomic
from rmscale.errors import UserError

_BACKEND_HINT = (
  "install a backend for it: `pip install gcsfs` for gs:// (or TensorFlow), s3fs for s3://"
)


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user, or an earlier stage, should have put there is missing."""


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` names an object in a remote store (it has a URL scheme)."""
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike):
  """An ``epath.Path`` for ``path``; an unknown URL scheme is a ValueError naming the path."""
  from etils import epath

  try:
    return epath.Path(path)
  except KeyError:  # epath knows a fixed set of schemes and raises KeyError for the others.
    raise UserError(
      f"{os.fspath(path)}: unsupported URL scheme; use a local path or gs://, s3://, az://"
    ) from None


@contextlib.contextmanager
def _naming(path, doing: str):
  """Re-raises a remote store's error with the path in it: gcsfs and gfile errors often omit it."""
  try:
    yield
  except ImportError as e:  # epath names the missing backend (gcsfs, s3fs or tensorflow).
    raise ImportError(f"cannot {doing} {path}: {e}; {_BACKEND_HINT}") from None
  except FileNotFoundError as e:
    raise MissingFileError(f"cannot {doing} {path}: no such file ({e})") from None
  except Exception as e:  # Transport errors (HTTP, auth, quota) come in many types.
    raise OSError(f"cannot {doing} {path}: {type(e).__name__}: {e}") from e


def resolve(path: str | os.PathLike) -> str:
  """One spelling of ``path`` that means the same from any process and working directory.

  ``~`` is expanded and a relative local path made absolute against the current directory, as a
  user typing it means; a remote URL (``gs://...``) is returned unchanged. Entry points resolve
  their path arguments once, so nothing below (orbax needs absolute paths, subprocesses may run
  elsewhere) sees a relative one.
  """
  path = os.fspath(path)
  if not path:
    raise UserError("empty path")
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def exists(path: str | os.PathLike) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  p = as_path(path)
  with _naming(path, "read"):
    return p.exists()


def isdir(path: str | os.PathLike) -> bool:
  """True for a directory, or for a remote prefix that has objects under it."""
  if not is_remote(path):
    return os.path.isdir(path)
  p = as_path(path)
  with _naming(path, "read"):
    return p.is_dir()


def makedirs(path: str | os.PathLike) -> None:
  """Creates a local directory and its parents; remote stores have no directories to create (a
  prefix exists once an object is written under it), and creating one could create a bucket."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def _local(path):
  """A missing local file as a `MissingFileError` naming it, as ``_naming`` does for remote ones."""
  try:
    yield
  except FileNotFoundError:
    raise MissingFileError(f"cannot read {path}: no such file") from None


def read_bytes(path: str | os.PathLike) -> bytes:
  if not is_remote(path):
    with _local(path), open(path, "rb") as f:
      return f.read()
  p = as_path(path)
  with _naming(path, "read"):
    return p.read_bytes()


def read_text(path: str | os.PathLike) -> str:
  """UTF-8 text; a missing or undecodable file is a `UserError` naming it."""
  try:
    if not is_remote(path):
      with _local(path), open(path, encoding="utf-8") as f:
        return f.read()
    return read_bytes(path).decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); damaged?") from None


def write(path: str | os.PathLike, fill: Callable[[BinaryIO], object]) -> None:
  """Writes ``path`` all at once: a reader (or a resumed run) sees the old content or the new.

  Local: ``atomic.write``. Remote: ``fill`` runs on an in-memory buffer and the finished bytes are
  uploaded to the final name in one write. An object store replaces an object only when its upload
  completes (GCS: a new generation, visible at once and whole; an interrupted upload leaves the old
  one), so this is already atomic. A temporary object copied into place would cost a second full
  write (a GCS copy is a server-side rewrite) and a delete, leave orphans when killed, and make
  nothing safer. What the buffer guards against is our own serialisation failing midway: gcsfs and
  gfile writers upload what they were given when their ``with`` block exits, even on an exception,
  so streaming ``fill`` into one could publish half a file. The cost is the file's size in memory
  (the arrays it serialises are in memory already); no fsync is needed, the upload's success is
  the durability.
  """
  if not is_remote(path):
    atomic.write(path, fill)
    return
  p = as_path(path)
  buf = io.BytesIO()
  fill(buf)
  data = buf.getvalue()
  with _naming(path, "write"):
    p.write_bytes(data)


# --- TensorBoard event files.


class _ObjectRecordWriter:
  """An event file in an object store. Objects cannot be appended to, so each flush uploads the
  whole file so far (tensorboardX's own gs:// writer does the same); scalar logs stay small."""

  def __init__(self, path: str):
    self.path = path
    self._buf = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buf.write(data)

  def flush(self) -> None:
    write(self.path, lambda f: f.write(self._buf.getvalue()))

  def close(self) -> None:
    self.flush()


class _ObjectWriterFactory:
  def open(self, path: str) -> _ObjectRecordWriter:
    return _ObjectRecordWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # A prefix needs no creating.


def summary_writer(logdir: str):
  """A tensorboardX ``SummaryWriter`` for ``logdir``, local or remote.

  Remote event files are written through this module (epath) rather than tensorboardX's own gs://
  writer, which needs google-cloud-storage: one storage layer for every workdir file.
  """
  from tensorboardX import SummaryWriter, record_writer

  if is_remote(logdir):
    scheme = os.fspath(logdir).split("://", 1)[0]
    record_writer.register_writer_factory(scheme, _ObjectWriterFactory())
  return SummaryWriter(logdir)
