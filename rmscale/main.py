"""Entry point: ``python -m rmscale.main --config=configs/quickstart.py[:k=v,...] --workdir=DIR``.

Any config field can be overridden with ``--config.a.b=v``; unknown keys and inconsistent values stop
the run before any work is done, with a message naming the key.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from rmscale import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, results and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  summary = pipeline.run(_CONFIG.value, _WORKDIR.value)
  print(summary)


if __name__ == "__main__":
  app.run(main)
