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

from absl import app, flags
from ml_collections import config_flags

from rmscale import cli, errors, pipeline, run_log
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
    pipeline.run(_CONFIG.value, _WORKDIR.value)  # Resolves the workdir (relative, ~, gs://).


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG))
