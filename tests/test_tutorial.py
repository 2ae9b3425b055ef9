"""The tutorial: the committed notebook is tutorial.py's, and it runs top to bottom."""

from __future__ import annotations

import pathlib
import shutil

import jupytext
import nbformat

TUTORIAL = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'tutorial.py'


def _cells(nb) -> list[tuple[str, str]]:
  return [(c.cell_type, c.source) for c in nb.cells]


def test_notebook_is_the_script():
  """tutorial.ipynb has the cells jupytext makes of tutorial.py."""
  committed = nbformat.read(TUTORIAL.with_suffix('.ipynb'), as_version=4)
  assert _cells(committed) == _cells(jupytext.read(TUTORIAL)), 'run `jupytext --sync experiments/tutorial.py`'


def test_notebook_runs_outside_the_checkout(tmp_path):
  """The notebook runs in a kernel of this interpreter whose working directory is not the
  checkout, draws the partition (or prints its DOT without Graphviz) and runs the export at two
  batch sizes."""
  from ipykernel.kernelspec import write_kernel_spec
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  from nbclient import NotebookClient

  # A spec of this very interpreter, found nowhere else: an installed `python3` spec may
  # start another Python, without this environment's packages.
  kernels = tmp_path / 'kernels'
  write_kernel_spec(str(kernels / 'oto-jax-tests'))
  km = KernelManager(
    kernel_name='oto-jax-tests', kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
  )
  work = tmp_path / 'work'
  work.mkdir()
  nb = jupytext.read(TUTORIAL)
  NotebookClient(nb, km=km, timeout=300, resources={'metadata': {'path': str(work)}}).execute()

  def outputs(marker: str) -> list:
    (cell,) = [c for c in nb.cells if c.cell_type == 'code' and marker in c.source]
    return cell.outputs

  picture = outputs('part.to_dot()')
  if shutil.which('dot'):
    assert any('image/png' in o.get('data', {}) for o in picture), picture
  else:
    assert 'digraph' in ''.join(o.get('text', '') for o in picture)
  text = ''.join(o.get('text', '') for o in outputs('export_subnet'))
  assert 'batch 1: logits (1, 10)' in text and 'batch 100: logits (100, 10)' in text, text
  assert '-> (3, 3, 1, ' in ''.join(o.get('text', '') for o in outputs('slice_like')), 'no sliced momentum'
