"""Every Colab notebook runs top to bottom on CPU with small settings; stored notebooks carry no outputs.

The quickstart notebook gets a copy of the session's finished tiny run (tests/conftest.py), so its
``pipeline.run`` finds every stage done and only reads results back: the run itself is tested in
tests/test_pipeline.py. The kernel inherits this process's environment (8 fake CPU devices) and
jupyter_client starts it with this interpreter (``python`` in the kernel spec means sys.executable).
"""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.xdist_group(
  "tiny_run"
)  # Shares the session's tiny run with test_pipeline.py.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


def execute(name: str, params: dict, cwd) -> nbformat.NotebookNode:
  """Runs colab/<name>.ipynb with its parameters cell replaced; any cell error raises."""
  nb = nbformat.read(os.path.join(ROOT, "colab", f"{name}.ipynb"), as_version=4)
  [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  NotebookClient(
    nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}
  ).execute()
  return nb


def outputs(nb, kind: str) -> list[str]:
  """Every output of a MIME type (e.g. 'text/markdown', 'image/png'), and stream text as 'stream'."""
  out = []
  for c in nb.cells:
    for o in c.get("outputs", []):
      if kind == "stream" and o.output_type == "stream":
        out.append(o.text)
      elif kind in o.get("data", {}):
        out.append(o.data[kind])
  return out


def test_there_are_notebooks():
  assert [os.path.basename(p) for p in NOTEBOOKS] == ["quickstart.ipynb", "scaling_laws.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_without_outputs_with_badge_and_one_parameters_cell(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for c in nb.cells:
    if c.cell_type == "code":
      assert c.outputs == [] and c.execution_count is None, c.source[:60]
  assert len([c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]) == 1
  badge = (
    "https://colab.research.google.com/github/rmscale/rmscale/blob/main/colab/"
    + os.path.basename(path)
  )
  assert badge in nb.cells[0].source
  assert "https://github.com/rmscale/rmscale" in nb.cells[1].source  # The install cell.


def test_quickstart_notebook(tiny_run, copy_run, tmp_path):
  workdir = copy_run(tiny_run[0], tmp_path)
  stages = os.path.join(workdir, "stages")
  markers = {f: os.path.getmtime(os.path.join(stages, f)) for f in os.listdir(stages)}
  nb = execute("quickstart", {"SETTINGS": "tiny,oracle", "WORKDIR": workdir}, tmp_path)
  # Every stage was found done: nothing ran again.
  assert {f: os.path.getmtime(os.path.join(stages, f)) for f in markers} == markers
  assert any("Found 8 CPU device(s)" in s for s in outputs(nb, "stream"))
  md = "\n".join(outputs(nb, "text/markdown"))
  assert "### The offline world" in md and "| prompt | response | words | requested |" in md
  assert "## Proxy reward models" in md and "## KL-penalty study" in md  # summary.md
  # methods, score_vs_sqrt_kl, gold_vs_proxy, coefficients, kl_penalty, rm_validation
  assert len(outputs(nb, "image/png")) == 6
  assert "Best-of-16 by proxy `100k_d100_s0`" in md
  assert "PPO against `100k_d300_s0` after 4 iterations" in md
  assert md.count("| prompt | initial response |") + md.count("No prompt where") == 2


def test_scaling_laws_notebook_on_a_workdir(tiny_run, tmp_path):
  # Reads only; its figures go to OUTDIR.
  nb = execute(
    "scaling_laws",
    {"RESULTS": tiny_run[0], "OUTDIR": str(tmp_path / "out"), "NUM_BOOTSTRAP": 50, "SEED": 0},
    tmp_path,
  )
  md = "\n".join(outputs(nb, "text/markdown"))
  assert "- Best-of-n: 2 curves (2 with per-prompt scores)" in md
  assert "| method | name | alpha | alpha_lo |" in md
  # The tiny run has proxies of two sizes: the notebook says why it cannot extrapolate.
  assert md.count("_Not extrapolated:") == 2  # Best-of-n and PPO.
  assert len(outputs(nb, "image/png")) == 3  # Bands, coefficients vs size, curves with fits.
  assert sorted(os.listdir(tmp_path / "out")) == [
    "coefficients_vs_size.png",
    "score_vs_sqrt_kl.png",
  ]


def test_scaling_laws_notebook_on_a_sweep(synthetic_sweep, tmp_path):
  nb = execute(
    "scaling_laws",
    {"RESULTS": synthetic_sweep, "OUTDIR": str(tmp_path / "out"), "NUM_BOOTSTRAP": 20, "SEED": 0},
    tmp_path,
  )
  md = "\n".join(outputs(nb, "text/markdown"))
  assert "Loaded 4 runs under" in md and "_Not extrapolated" not in md
  for method in ("bon", "ppo"):
    assert (
      f"**{method}, 1,000 comparisons: trend on 3 sizes predicts the 6,400,000-parameter proxy**"
      in md
    )
  assert len(outputs(nb, "image/png")) == 5  # Bands, coefficients, curves, two extrapolations.
