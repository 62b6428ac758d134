"""What the absl entry points with a config file share (``rmscale.main``, ``rmscale.aot``):
flags parsed with any error in them, or in the config file, as
one line, ``error: ...``, and exit status 2 (``--debug`` re-raises it with its traceback).
"""

from __future__ import annotations

import ast
import sys

from absl import flags

from rmscale import errors


def one_line(e: BaseException) -> str:
  """The gist of an error from loading the config file or parsing a flag, whose message may hold a
  whole traceback: the line naming a missing file, else the last line without its exception type."""
  text = str(e)
  if isinstance(e, (AttributeError, KeyError)) and text[:1] in "'\"":
    try:  # ml_collections quotes the message of an unknown key like a KeyError's.
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if not lines:
    return type(e).__name__
  missing = [ln for ln in lines if "No such file or directory" in ln]
  if missing:
    return missing[-1]
  if isinstance(e, (AttributeError, KeyError)):  # An unknown --config.a.b key, and a suggestion.
    return f"unknown config field {'; '.join(lines)}"
  last = lines[-1]
  head, sep, rest = last.partition(": ")
  return rest if sep and head.endswith(("Error", "Exception")) else last


def parse_flags(argv: list[str], config: flags.FlagHolder) -> list[str]:
  """absl's flag parsing (``app.run(main, flags_parser=...)``) for a program whose ``config`` is a
  ``config_flags.DEFINE_config_file`` flag: a bad flag or config file ends it in one line."""
  try:
    rest = flags.FLAGS(argv)
    config.value.get("stages")  # A config file that failed to load raises when first read.
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    if "--debug" in argv:
      raise
    gist = one_line(e)
    # absl's messages name their flag, except where the gist comes from the config file itself.
    names_flag = gist.startswith("flag --") or (
      isinstance(e, flags.Error) and not str(e).startswith("flag --config")
    )
    print(f"error: {'' if names_flag else '--config: '}{gist}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  return rest
