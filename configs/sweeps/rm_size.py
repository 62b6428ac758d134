"""Proxy RM size sweep (Gao et al. Figs. 1 and 3): one run per ladder size, 90k comparisons each.

    python -m launch.sweep --config=configs/sweeps/rm_size.py --workdir_root=/mnt/shared/rm_size \
        --target=tpu --zone=us-central2-b --accelerator=v4-32 --spot --parallel=3 --dry_run
    python -m launch.sweep --config=configs/sweeps/rm_size.py:runlocal --workdir_root=runs/rm_size --parallel=2

One policy, one gold RM and one labelled set serve every proxy: ``shared_stages`` runs them once in
``<root>/shared`` and links them into each run. Arguments: ``data`` (comparisons per proxy, default
90k), ``runlocal`` (the CPU-sized protocol of configs/overopt.py; the five smallest sizes).
"""

from rmscale.configs import parse_arg

LADDER = ("3m", "12m", "25m", "42m", "85m", "300m", "680m", "1.2b", "3b")


def get_sweep(arg=None):
  a = parse_arg(arg, data="90k", runlocal=False)
  return dict(
    name="rm-size",  # Prefix of pod and job names.
    config="configs/overopt.py",  # Base config; run from the repository root.
    arg=dict(
      data=a.data, **({"runlocal": True} if a.runlocal else {})
    ),  # Shared get_config arguments.
    # The runlocal ladder maps 3m..85m onto the distinct CPU sizes 100k..1.6m.
    grid=dict(rm=list(LADDER[:5] if a.runlocal else LADDER)),  # One run per proxy size.
    shared_stages="policy_init,gold,label",  # Trained once, linked into every run.
  )
