"""Where a run's messages go: a short terminal, and every log record in a file under the workdir.

rmscale's own progress lines are INFO records on the ``rmscale`` logger tree (one when a stage starts,
one when it ends). Third-party libraries (orbax, absl, jax) log dozens of INFO records per
checkpoint; those belong in the run's log file, not on the terminal.

- `log_file(workdir)`: while a run lasts, every record at INFO and above, third-party included, is
  appended to ``<workdir>/logs/run.log`` (``run.p<i>.log`` on process i > 0). A remote workdir's log
  is written locally and uploaded whole by `LogFile.sync`.
- `terminal(verbose)`: for command-line entry points. Not verbose: the terminal shows rmscale's
  progress lines, warnings and errors (and tqdm's progress bars, which write to it directly).
  Verbose (absl's ``--verbosity`` given): every record, absl-formatted, as absl prints them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

from rmscale import fs

# ``logger.info(..., extra=FILE_ONLY)``: a detail for the log file, kept off the short terminal.
FILE_ONLY = {"file_only": True}
FORMAT = "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"


class LogFile:
  """A FileHandler on the root logger for the duration of a run."""

  def __init__(self, workdir: str, process_index: int = 0):
    name = "run.log" if process_index == 0 else f"run.p{process_index}.log"
    self.path = os.path.join(workdir, "logs", name)
    if fs.is_remote(workdir):  # Object stores cannot append: write locally, upload in `sync`.
      fd, self._local = tempfile.mkstemp(prefix="rmscale-", suffix=".log")
      os.close(fd)
      if fs.exists(self.path):  # Carry on the log of the invocations before this one.
        with open(self._local, "wb") as f:
          f.write(fs.read_bytes(self.path))
    else:
      fs.makedirs(os.path.dirname(self.path))
      self._local = self.path
    self.handler = logging.FileHandler(self._local, mode="a", encoding="utf-8")
    self.handler.setLevel(logging.INFO)
    self.handler.setFormatter(logging.Formatter(FORMAT))

  def sync(self) -> None:
    """Flushes the file; a remote workdir gets the whole log uploaded."""
    self.handler.flush()
    if self._local != self.path:
      with open(self._local, "rb") as f:
        data = f.read()
      fs.write(self.path, lambda out: out.write(data))

  def close(self) -> None:
    """Syncs, closes the file and removes a remote workdir's local copy."""
    try:
      self.sync()
    finally:
      self.handler.close()
      if self._local != self.path:
        os.unlink(self._local)


@contextlib.contextmanager
def log_file(workdir: str, process_index: int = 0):
  """Attaches a `LogFile` to the root logger (lowering the root level to INFO if needed)."""
  log = LogFile(workdir, process_index)
  root = logging.getLogger()
  level = root.level
  root.addHandler(log.handler)
  if root.level == logging.NOTSET or root.level > logging.INFO:
    root.setLevel(logging.INFO)
  try:
    yield log
  finally:
    root.removeHandler(log.handler)
    root.setLevel(level)
    log.close()


class _Progress(logging.Filter):
  """rmscale's INFO lines meant for the terminal (warnings reach it through absl's handler)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING and not getattr(record, "file_only", False)


def terminal(verbose: bool) -> None:
  """Sets up the terminal of a command-line run (after absl has parsed its flags).

  Not verbose: absl's stderr handler keeps WARNING and above from every library; the root level
  stays at INFO so that the run's log file (`log_file`) gets everything. Verbose: absl's own set-up.
  """
  from absl import logging as absl_logging

  if verbose:
    return
  absl_logging.get_absl_handler().setLevel(logging.WARNING)
  logging.getLogger().setLevel(logging.INFO)
  logging.captureWarnings(True)  # Python warnings: once, as WARNING records (and into the log).


def progress_lines() -> None:
  """rmscale's own INFO lines on the terminal as ``HH:MM:SS message`` (after `terminal(False)`)."""
  progress = logging.StreamHandler(sys.stderr)
  progress.setLevel(logging.INFO)
  progress.addFilter(_Progress())
  progress.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  logging.getLogger("rmscale").addHandler(progress)
