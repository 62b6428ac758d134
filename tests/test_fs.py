"""Workdir files on a remote store (``gs://``) and locally: round trips, done-markers, whole writes.

There is no GCS here, so ``gs://`` is served by fsspec's in-memory filesystem registered as fsspec's
``gs``/``gcs`` implementation (where gcsfs would be): ``rmscale.fs`` and ``etils.epath`` take their
real remote route (epath's fsspec backend, as on a TPU VM without TensorFlow). The stand-in is
weaker than GCS where it matters: an object opened for writing is published at once and holds what
was written so far (``test_the_stand_in_publishes_a_streamed_failure``), so a writer that streamed
into it and failed midway would leave half a file, and these tests would see it.

Orbax checkpoints go through TensorStore's own GCS driver, which cannot be pointed at this store,
so the end-to-end test takes a finished local run's non-checkpoint artefacts to ``gs://`` and runs
the rest of the pipeline there: done-markers, the ``fit`` stage, plots, TensorBoard, summary.md.
"""

import importlib.util
import json
import os
import struct
import sys
import uuid

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from rmscale import fs, pipeline, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InMemoryGCS(MemoryFileSystem):
  """fsspec's in-memory filesystem under the gs:// scheme, with a store of its own."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, str):
      for prefix in ("gs://", "gcs://"):
        path = path.removeprefix(prefix)
    return super()._strip_protocol(path)


@pytest.fixture
def gcs(monkeypatch):
  """A fresh ``gs://`` workdir root in the in-memory store; fsspec and epath restored afterwards."""
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("with TensorFlow installed epath sends gs:// to gfile, not fsspec")
  registry = sys.modules["fsspec.registry"]._registry  # fsspec's protocol -> class table.
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry, name, InMemoryGCS)
  cached = epath_backend._FileSystemSpecBackend._get_filesystem  # epath caches one fs per scheme.
  cached.cache_clear()
  InMemoryGCS.store.clear()
  InMemoryGCS.pseudo_dirs[:] = [""]
  yield f"gs://rmscale-test/{uuid.uuid4().hex}"
  cached.cache_clear()


def _objects(root: str) -> dict[str, bytes]:
  """``{path relative to root: bytes}`` of every object under a gs:// root, read from the store."""
  prefix = InMemoryGCS._strip_protocol(root) + "/"
  return {
    k[len(prefix) :]: v.getvalue() for k, v in InMemoryGCS.store.items() if k.startswith(prefix)
  }


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("gcs")


RECORDS = [{"name": "100k_d300_s0", "kl": np.float64(0.25), "gold": 0.5}, {"n": np.int64(4)}]
ARRAYS = {"ids": np.arange(12, dtype=np.int32).reshape(3, 4), "gold": np.linspace(-1, 1, 5)}


def test_round_trips_match_the_local_files_byte_for_byte(gcs, tmp_path):
  for base in (gcs, str(tmp_path)):
    results.write_json(f"{base}/stages/gold.json", {"kind": "oracle", "acc": np.float32(0.75)})
    results.write_jsonl(f"{base}/results/curves.jsonl", RECORDS)
    results.write_text(f"{base}/summary.md", "# rmscale — résumé\n")
    results.write_npz(f"{base}/reference/samples.npz", **ARRAYS)
  assert results.read_json(f"{gcs}/stages/gold.json") == {"kind": "oracle", "acc": 0.75}
  assert results.read_jsonl(f"{gcs}/results/curves.jsonl") == [
    {"name": "100k_d300_s0", "kl": 0.25, "gold": 0.5},
    {"n": 4},
  ]
  assert fs.read_text(f"{gcs}/summary.md") == "# rmscale — résumé\n"
  got = results.read_npz(f"{gcs}/reference/samples.npz")
  assert sorted(got) == ["gold", "ids"]
  for k, v in ARRAYS.items():
    np.testing.assert_array_equal(got[k], v)
    assert got[k].dtype == v.dtype
  assert list(results.read_npz(f"{gcs}/reference/samples.npz", lambda k: k == "ids")) == ["ids"]
  objects = _objects(gcs)
  assert sorted(objects) == [
    "reference/samples.npz",
    "results/curves.jsonl",
    "stages/gold.json",
    "summary.md",
  ]
  for name in ("results/curves.jsonl", "stages/gold.json", "summary.md"):  # npz embeds a timestamp.
    with open(os.path.join(tmp_path, name), "rb") as f:
      assert objects[name] == f.read(), name


def test_done_marker_semantics(root):
  marker = f"{root}/stages/label.json"
  assert not fs.exists(marker) and not fs.isdir(f"{root}/stages")
  fs.makedirs(root)  # Locally a directory; remotely nothing to create.
  results.write_json(marker, {"num_train": 3})
  assert fs.exists(marker) and not fs.isdir(marker)
  assert fs.isdir(f"{root}/stages") and fs.isdir(root)
  assert results.read_json(marker) == {"num_train": 3}
  results.write_json(marker, {"num_train": 4})  # A rerun stage overwrites its marker whole.
  assert results.read_json(marker) == {"num_train": 4}
  assert not fs.exists(f"{root}/stages/proxies.json")


class Unserialisable:
  pass


def test_a_failed_write_never_leaves_a_half_written_file(root):
  path = f"{root}/results/curves.jsonl"
  results.write_jsonl(path, RECORDS)
  before = fs.read_bytes(path)
  # json.dumps fails on the second record, after the first one was serialised.
  with pytest.raises(TypeError, match="cannot serialise Unserialisable"):
    results.write_jsonl(path, [{"ok": 1}, {"bad": Unserialisable()}])

  def half_then_fail(f):
    f.write(b'{"half": ')
    raise RuntimeError("killed midway")

  with pytest.raises(RuntimeError, match="killed midway"):
    fs.write(path, half_then_fail)
  with pytest.raises(RuntimeError):
    fs.write(f"{root}/results/new.jsonl", half_then_fail)
  assert fs.read_bytes(path) == before
  assert not fs.exists(f"{root}/results/new.jsonl")
  if fs.is_remote(root):
    assert sorted(_objects(root)) == ["results/curves.jsonl"]
  else:  # No temporary file left beside it either.
    assert os.listdir(f"{root}/results") == ["curves.jsonl"]


def test_the_stand_in_publishes_a_streamed_failure(gcs):
  # Why the test above can fail: writing into the store directly and failing midway publishes
  # the half file, which is what fs.write's in-memory buffer prevents.
  path = f"{gcs}/results/curves.jsonl"
  with pytest.raises(RuntimeError):
    with fs.as_path(path).open("wb") as f:
      f.write(b'{"half": ')
      raise RuntimeError("killed midway")
  assert fs.read_bytes(path) == b'{"half": '


def test_remote_errors_name_the_path(gcs):
  with pytest.raises(FileNotFoundError, match=f"cannot read {gcs}/stages/gold.json"):
    results.read_json(f"{gcs}/stages/gold.json")
  with pytest.raises(FileNotFoundError, match=f"cannot read {gcs}/reference/samples.npz"):
    results.read_npz(f"{gcs}/reference/samples.npz")
  results.write_text(f"{gcs}/summary.md", "x")
  with pytest.raises(OSError, match=f"cannot write {gcs}/summary.md/x.json: FileExistsError"):
    results.write_json(f"{gcs}/summary.md/x.json", {})  # Under an object, not a prefix.
  fs.write(f"{gcs}/reference/samples.npz", lambda f: f.write(b"PK\x03\x04 truncated"))
  with pytest.raises(ValueError, match=f"{gcs}/reference/samples.npz: corrupt or truncated"):
    results.read_npz(f"{gcs}/reference/samples.npz")
  with pytest.raises(ValueError, match="memory://run/x.json: unsupported URL scheme"):
    fs.exists("memory://run/x.json")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_a_missing_backend_is_named_with_the_path():
  with pytest.raises(ImportError, match="cannot write s3://bucket/run/x.json: .*s3fs"):
    fs.write("s3://bucket/run/x.json", lambda f: f.write(b"{}"))


def test_resolve_spells_each_path_once(tmp_path, monkeypatch):
  home, cwd = tmp_path / "home", tmp_path / "work"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv("HOME", str(home))
  assert fs.resolve("runs/x") == str(cwd / "runs" / "x")
  assert fs.resolve("./runs/../x/") == str(cwd / "x")
  assert fs.resolve("~/runs/x") == str(home / "runs" / "x")
  assert fs.resolve(cwd / "y") == str(cwd / "y")  # os.PathLike too.
  assert fs.resolve("/abs/run") == "/abs/run"
  assert fs.resolve("gs://b/x") == "gs://b/x"
  assert fs.resolve("gs://b/../x/~") == "gs://b/../x/~"  # A URL is never touched.
  with pytest.raises(ValueError, match="empty path"):
    fs.resolve("")


def _events(data: bytes) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i : i + 8])
    event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    i += 12 + n + 4
  return out


def test_tensorboard_events_on_the_remote_store(gcs, tmp_path):
  for logdir in (f"{gcs}/tensorboard", str(tmp_path / "tensorboard")):
    writer = fs.summary_writer(logdir)
    writer.add_scalar("gold/loss", 0.5, 1)
    writer.add_scalar("gold/loss", 0.25, 2)
    writer.close()
  (name,) = _objects(gcs)
  assert name.startswith("tensorboard/events.out.tfevents.")
  (local,) = os.listdir(tmp_path / "tensorboard")
  with open(tmp_path / "tensorboard" / local, "rb") as f:
    local_events = _events(f.read())
  assert (
    _events(_objects(gcs)[name]) == local_events == [("gold/loss", 1, 0.5), ("gold/loss", 2, 0.25)]
  )


# Artefacts of the fit stage (recomputed remotely) and orbax checkpoints (TensorStore, see above).
_FIT_OUTPUTS = {"stages/fit.json", "results/fits.jsonl", "results/trends.jsonl", "summary.md"}
_FIT_OUTPUTS |= {"results/methods.jsonl", "results/kl_study_fits.jsonl", "config.json"}
_NOT_COPIED = {"ckpt", "params", "tensorboard", "plots"}


def test_pipeline_resumes_and_finishes_on_a_remote_workdir(tiny_run, gcs):
  local, local_summary = tiny_run
  sys.path.insert(0, ROOT)
  from configs import quickstart

  copied = []
  for dirpath, dirnames, filenames in os.walk(local):
    dirnames[:] = [d for d in dirnames if d not in _NOT_COPIED]
    for name in filenames:
      rel = os.path.relpath(os.path.join(dirpath, name), local)
      if rel not in _FIT_OUTPUTS:
        fs.write(
          f"{gcs}/{rel}", lambda f, p=os.path.join(dirpath, name): f.write(open(p, "rb").read())
        )
        copied.append(rel)
  stages = [s for s in pipeline.ORDER if s != "fit"]
  assert {f"stages/{s}.json" for s in stages} <= set(copied)

  summary = pipeline.run(quickstart.get_config("tiny,oracle"), gcs)

  # The finished stages were skipped (rerunning any would need orbax on gs://), fit ran remotely
  # and matches the local run exactly: same inputs, same seeded bootstrap.
  fit_results = ("fits", "trends", "methods", "kl_study_fits")
  for name in (f"results/{r}.jsonl" for r in fit_results):
    with open(os.path.join(local, name), "rb") as f:
      assert fs.read_bytes(f"{gcs}/{name}") == f.read(), name
  assert summary == local_summary.replace(f"workdir: `{local}`", f"workdir: `{gcs}`")
  assert fs.read_text(f"{gcs}/summary.md") == summary
  marker = results.read_json(f"{gcs}/stages/fit.json")
  assert (
    marker["num_fits"] == results.read_json(os.path.join(local, "stages", "fit.json"))["num_fits"]
  )
  objects = _objects(gcs)
  for png in os.listdir(os.path.join(local, "plots")):
    assert objects[f"plots/{png}"].startswith(b"\x89PNG\r\n\x1a\n"), png
  with open(os.path.join(local, "config.json")) as f:
    assert json.loads(objects["config.json"]) == json.load(f)
  assert any(k.startswith("tensorboard/events.out.tfevents.") for k in objects)

  # Every stage now has its marker: a second run does nothing and reports the same summary; it
  # only adds its own provenance record and log lines.
  appended = ("provenance.jsonl", "logs/run.log")
  before = {k: v for k, v in _objects(gcs).items() if not k.startswith("tensorboard/")}
  assert pipeline.run(quickstart.get_config("tiny,oracle"), gcs) == summary
  after = {k: v for k, v in _objects(gcs).items() if not k.startswith("tensorboard/")}
  assert {k: v for k, v in after.items() if k not in appended} == {
    k: v for k, v in before.items() if k not in appended
  }
  for name in appended:  # Appended to, whole: what was there is kept.
    assert after[name].startswith(before[name]) and len(after[name]) > len(before[name])
  assert after["provenance.jsonl"].count(b"\n") == before["provenance.jsonl"].count(b"\n") + 1
