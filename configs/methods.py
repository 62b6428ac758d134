"""Every registered alignment method against the quickstart's proxies, on one gold-vs-KL axis.

    python -m rmscale.main --config=configs/quickstart.py --workdir=runs/qs     # first, ~6 min
    python -m rmscale.main --config=configs/methods.py --workdir=runs/qs        # then the methods
    python -m rmscale.main --config=configs/methods.py:tiny --workdir=/tmp/qs   # seconds (tests)

It is the quickstart config (same world, models, proxies and reference) with ``optimise.methods``
set to every method of ``rmscale.methods``: pointed at a finished quickstart workdir, every stage
up to ``reference`` is skipped, best-of-n and PPO are read back from their finished runs, and only
the other methods run, each against every proxy; ``fit`` then fits and plots them all side by side
(``plots/methods.png``, the summary's "Methods side by side"). Each method's section holds the
values tuned for these sizes (a comparable KL budget in the quickstart's 20 iterations).

Arguments after ``:`` are the quickstart's (``tiny``, ``oracle``).
"""

import importlib.util
import os

from rmscale import methods
from rmscale.configs import parse_arg

# Values for the quickstart's sizes over each method's defaults (rmscale/methods/<name>.py).
SECTIONS = {
  "reinforce": dict(lr=3e-4),
  "remax": dict(lr=3e-4),
  "rloo": dict(lr=3e-4),
  "grpo": dict(lr=3e-4),
  "rejection": dict(lr=1e-3, sft_epochs=2),
}


def _quickstart():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
  spec = importlib.util.spec_from_file_location("rmscale_configs_quickstart", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _quickstart().get_config(arg)
  tiny = parse_arg(arg, tiny=False, oracle=False).tiny
  c.optimise.methods = tuple(methods.REGISTRY)
  for name, section in methods.sections().items():
    if name not in c.optimise:
      c.optimise[name] = {**section, **SECTIONS.get(name, {})}
      if tiny and "k" in section:  # 16 sequences as 8 prompts x 2: a prompt per fake device.
        c.optimise[name].k = 2
  return c
