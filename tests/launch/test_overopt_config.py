"""configs/overopt.py: the paper's protocol from get_config arguments, valid at pod scale and on CPU."""

import importlib.util
import os

import pytest

from rmscale import methods, pipeline
from rmscale.models import sizes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
  "overopt", os.path.join(ROOT, "configs", "overopt.py")
)
overopt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overopt)


def test_defaults_follow_gao_et_al():
  c = overopt.get_config("rm=85m,data=90k")
  assert (c.policy.size, c.gold.size, c.proxies.sizes, c.proxies.data_sizes) == (
    "1.2b",
    "pythia-6.9b",
    ("85m",),
    (90_000,),
  )
  assert (c.label.num_comparisons, c.label.val_fraction, c.label.noise) == (100_000, 0.1, 0.0)
  assert (c.proxies.batch_size, c.proxies.init) == (64, "pretrained")
  assert (c.reference.samples_per_prompt, c.optimise.methods) == (10_000, ("bon", "ppo"))
  # Every method is evaluated on the reference prompts: as many as best-of-n and PPO evaluations
  # used each before (1000 and 1024).
  assert c.reference.num_prompts == 1024
  assert (c.optimise.ppo.lr, c.optimise.rollout_batch_size, c.optimise.bon.num_n) == (3e-6, 256, 20)
  assert not c.optimise.kl_study.method  # The KL-penalty study is opt-in at this scale.
  # The ladder's names are its non-embedding parameter counts; the gold RM is ~6.9B like Gao's 6B.
  assert 6.4e9 < sizes.size_params("pythia-6.9b") < 7.0e9
  pipeline.validate(c, 64)  # One v4-128 / v5e-64 slice: batch 64 over 64 data-parallel devices.
  with pytest.raises(ValueError, match="proxies.batch_size=64 is not divisible by the 128"):
    pipeline.validate(c, 128)
  c.mesh.tensor = 2  # ... where tensor parallelism takes the rest (the vocab stays replicated).
  pipeline.validate(c, 128)


def test_arguments_select_sizes_data_and_seeds():
  c = overopt.get_config("rm=all,data=2k+8k+90k,seeds=3,n=60k,policy=3b")
  assert c.proxies.sizes == overopt.LADDER and c.proxies.data_sizes == (2_000, 8_000, 90_000)
  assert (c.proxies.seeds, c.reference.samples_per_prompt, c.policy.size) == (
    (0, 1, 2),
    60_000,
    "3b",
  )
  assert overopt.get_config("data=all").proxies.data_sizes == overopt.DATA_LADDER
  with pytest.raises(ValueError, match="'lots' is not a count"):
    overopt.get_config("data=lots")
  with pytest.raises(ValueError, match="unknown config argument 'size'"):
    overopt.get_config("size=3m")


def test_methods_argument_selects_registered_methods_and_their_sections():
  assert overopt.get_config("methods=all").optimise.methods == overopt.METHODS
  c = overopt.get_config("methods=bon")
  assert c.optimise.methods == ("bon",) and "ppo" not in c.optimise and c.optimise.bon.num_n == 20
  pipeline.validate(c, 64)
  c = overopt.get_config("methods=ppo+bon")
  assert c.optimise.methods == ("ppo", "bon") and c.optimise.ppo.clip_eps == 0.2
  # Real-scale values only name keys the methods have (else validation would refuse the config).
  for name, values in {**overopt.SECTIONS, **overopt.RUNLOCAL_SECTIONS}.items():
    assert set(values) <= set(methods.sections([name])[name]), name
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    overopt.get_config("methods=bon+nope")


def test_runlocal_is_the_same_protocol_at_cpu_size():
  c = overopt.get_config("rm=all,data=all,runlocal")
  assert c.proxies.sizes == (
    "100k",
    "200k",
    "400k",
    "800k",
    "1.6m",
  )  # Distinct: no duplicate proxies.
  assert c.proxies.data_sizes == (20, 40, 80, 160, 320, 640, 900)
  assert c.stages == overopt.get_config().stages
  assert c.optimise.methods == overopt.DEFAULT_METHODS == ("bon", "ppo")
  assert (c.reference.num_prompts, c.optimise.bon.num_n, c.optimise.ppo.lr) == (16, 5, 1e-3)
  pipeline.validate(c, 8)
