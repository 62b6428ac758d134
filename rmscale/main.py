"""Entry point: ``python -m rmscale.main --config=configs/quickstart.py[:k=v,...] --workdir=DIR``.

Any config field can be overridden with ``--config.a.b=v``; unknown keys and inconsistent values stop
the run before any work is done, with a message naming the key. ``--workdir`` may be relative, start
with ``~`` or be a ``gs://`` URL.

The terminal shows one line per stage start and end, progress bars, warnings and errors, and at the
end the path of summary.md; every library's log records go to ``<workdir>/logs/run.log``.
``--verbosity=0`` (absl's flag; 1 for debug) shows them on the terminal too.

An error in the user's input (a config value or key, a flag, a missing or damaged file) ends the
command with one line, ``error: ...``, and exit status 2, before anything is written where it can be
caught at start-up; ``--debug`` shows its traceback. Any other exception is a bug and shows its own.

On several hosts every process runs this same command; ``--distributed`` and the coordinator flags
(or ``RMSCALE_*`` variables, see rmscale/parallel/distributed.py) join them before anything else.
"""

from __future__ import annotations

import ast
import sys

from absl import app, flags
from ml_collections import config_flags

from rmscale import errors, fs, pipeline, run_log
from rmscale.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (get_config(arg)).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, results and plots.")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  None,
  list(distributed.MODES),
  "Multi-host start-up: auto (detect SLURM/MPI/TPU pods, the default), on "
  "(always jax.distributed.initialize), off. Env: RMSCALE_DISTRIBUTED.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0 (explicit multi-host start-up). Env: RMSCALE_COORDINATOR.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes in the job. Env: RMSCALE_NUM_PROCESSES."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's id in [0, num_processes). Env: RMSCALE_PROCESS_ID."
)


_DEBUG = flags.DEFINE_bool(
  "debug", False, "Show the traceback of errors in the user's input too (config, flags, files)."
)


def _one_line(e: BaseException) -> str:
  """The gist of an error from loading the config file or parsing a flag, whose message may hold a
  whole traceback: the line naming a missing file, else the last line, without its exception type."""
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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config file reported as one line (exit status 2)."""
  try:
    rest = flags.FLAGS(argv)
    # A config file that failed to load is a placeholder that raises when first read: read it now.
    _CONFIG.value.get("stages")
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    if "--debug" in argv:
      raise
    print(f"error: --config: {_one_line(e)}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  return rest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  verbose = flags.FLAGS["verbosity"].present
  run_log.terminal(verbose)
  with errors.reported(debug=_DEBUG.value):
    distributed.initialize(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, mode=_DISTRIBUTED.value
    )
    # Every process computes and keeps a full log file; only process 0 shows progress on the
    # terminal (the others show warnings and errors).
    if distributed.is_writer() and not verbose:
      run_log.progress_lines()
    pipeline.run(_CONFIG.value, fs.resolve(_WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
