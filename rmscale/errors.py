"""Errors in what the user gave (config values and keys, flags, files), told apart from internal ones.

Command-line entry points print a `UserError` as one line, ``error: <message>``, and exit with status
2, without a traceback unless asked (``--debug``); any other exception is a bug and keeps its
traceback. `UserError` is a ValueError, so library callers that catch ValueError still do.
"""

from __future__ import annotations

import contextlib
import sys


class UserError(ValueError):
  """The user's input is at fault; the message names the key, flag or file and what is wrong."""


EXIT_USER_ERROR = 2


@contextlib.contextmanager
def reported(debug: bool = False):
  """Ends the command with ``error: <message>`` and exit status 2 on a `UserError` (re-raised with
  its traceback when ``debug``)."""
  try:
    yield
  except UserError as e:
    if debug:
      raise
    message = " ".join(str(e).split())  # One line, however the message was wrapped.
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
