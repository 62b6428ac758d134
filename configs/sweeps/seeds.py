"""Seed sweep: the same proxy (size, data) retrained with different seeds (RM init and data order),
one run per seed, for the spread of fitted coefficients between seeds.

    python -m launch.sweep --config=configs/sweeps/seeds.py:rm=85m,num=5 --workdir_root=/mnt/shared/seeds --dry_run
    python -m launch.sweep --config=configs/sweeps/seeds.py:runlocal --workdir_root=runs/seeds --parallel=2

Arguments: ``rm`` (default 85m), ``data`` (default 90k), ``num`` (seeds 0 .. num-1, default 3),
``runlocal`` (CPU-sized).
"""

from rmscale.configs import parse_arg
from rmscale.errors import UserError


def get_sweep(arg=None):
  a = parse_arg(arg, rm="85m", data="90k", num=3, runlocal=False)
  if a.num < 1:
    raise UserError(f"seeds sweep: num={a.num} must be >= 1")
  return dict(
    name="seeds",  # Prefix of pod and job names.
    config="configs/overopt.py",  # Base config; run from the repository root.
    arg=dict(
      rm=a.rm, data=a.data, **({"runlocal": True} if a.runlocal else {})
    ),  # Shared get_config arguments.
    # The proxy seed only (config.seed would change the policy, gold and labels too).
    runs=[{"config.proxies.seeds": (s,), "name": f"seed-{s}"} for s in range(a.num)],
    shared_stages="policy_init,gold,label",  # Trained once, linked into every run.
  )
