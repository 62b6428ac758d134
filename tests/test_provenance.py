"""Provenance records: the code, packages, device and CPU a figure came from."""

import importlib.metadata
import os
import subprocess

import pytest

from rmscale import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_collect_names_the_code_packages_and_machine():
  r = provenance.collect(seed=3, stages=["gold"])
  assert r["seed"] == 3 and r["stages"] == ["gold"]
  assert r["packages"]["jax"] == importlib.metadata.version("jax")
  assert r["packages"]["orbax-checkpoint"] == importlib.metadata.version("orbax-checkpoint")
  assert r["device_kind"] == "cpu" and r["num_devices"] >= 1
  assert r["cpu"] and r["cpu_count"] == os.cpu_count()
  if os.path.exists(os.path.join(ROOT, ".git")):
    head = subprocess.run(
      ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert r["git_commit"] == head and isinstance(r["git_dirty"], bool)


@pytest.fixture
def record():
  return {
    "seed": 0,
    "git_commit": "abc123",
    "git_dirty": False,
    "packages": {"jax": "0.10.2", "flax": "0.12.8", "transformers": None},
    "python": "3.11.7",
    "platform": "Linux",
    "device_kind": "cpu",
    "device_platform": "cpu",
    "num_devices": 1,
    "cpu": "Some CPU",
    "cpu_count": 2,
  }


def test_markdown_shows_the_latest_record(record):
  text = "\n".join(provenance.markdown([record]))
  assert "seed: 0; code: abc123" in text and "jax 0.10.2, flax 0.12.8" in text
  assert "transformers" not in text  # not installed: not listed
  assert "1 x cpu (cpu); CPU: Some CPU (2 cores)" in text
  assert "warning" not in text
  assert provenance.markdown([]) == []


def test_markdown_warns_when_invocations_ran_under_different_packages(record):
  later = {**record, "packages": {**record["packages"], "jax": "0.11.0"}}
  text = "\n".join(provenance.markdown([record, record, later]))
  assert "jax 0.11.0" in text
  assert "3 invocations under 2 different code/package/device combinations" in text
  dirty = {**record, "git_dirty": True}
  assert "(with uncommitted changes)" in "\n".join(provenance.markdown([dirty]))
