"""Preference-data sweep (Gao et al. Fig. 4, a 12M RM): one run per number of training comparisons.

    python -m launch.sweep --config=configs/sweeps/data_size.py --workdir_root=/mnt/shared/data_size \
        --target=slurm --nodes=1 --gpus_per_node=8 --partition=gpu --dry_run
    python -m launch.sweep --config=configs/sweeps/data_size.py:runlocal --workdir_root=runs/data_size

Arguments: ``rm`` (proxy size, default 12m as in the paper), ``runlocal`` (CPU-sized; data sizes scale
down with the labelled set, 2k -> 20 ... 90k -> 900).
"""

from rmscale.configs import parse_arg

DATA_LADDER = (
  "2k",
  "4k",
  "8k",
  "16k",
  "32k",
  "64k",
  "90k",
)  # Below ~2k RMs are near chance (Gao et al.).


def get_sweep(arg=None):
  a = parse_arg(arg, rm="12m", runlocal=False)
  return dict(
    name="data-size",  # Prefix of pod and job names.
    config="configs/overopt.py",  # Base config; run from the repository root.
    arg=dict(rm=a.rm, **({"runlocal": True} if a.runlocal else {})),  # Shared get_config arguments.
    grid=dict(
      data=list(DATA_LADDER)
    ),  # One run per training-set size (the first rows of one labelled set).
    shared_stages="policy_init,gold,label",  # Trained once, linked into every run.
  )
