"""The package's shape: data flows one way between modules, and the public names are the README's.

Imports are read from the source (every ``import`` statement, at module level, in functions
and under ``TYPE_CHECKING``), so a cycle hidden in a function body still counts.
"""

from __future__ import annotations

import ast
import pathlib
import re

import oto_jax

ROOT = pathlib.Path(oto_jax.__file__).parent
README = pathlib.Path(__file__).parent.parent / 'README.md'


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in ROOT.rglob('*.py'):
    parts = path.relative_to(ROOT.parent).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    out[name] = path
  return out


def _imports(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
  """The oto_jax modules that module ``name`` imports."""
  deps = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      # `from oto_jax.x import y` imports module oto_jax.x.y when that is a module.
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in modules:
        t = t.rpartition('.')[0]
      if t and t.startswith('oto_jax') and t != name:
        deps.add(t)
  return deps


def test_no_import_cycles():
  modules = _modules()
  graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
  # Only the package itself gathers the public names; nothing inside may import it.
  for name, deps in graph.items():
    assert 'oto_jax' not in deps, f'{name} imports the oto_jax package; import the module it needs'
  state: dict[str, int] = {}

  def visit(n: str, stack: list[str]) -> None:
    state[n] = 1
    for d in sorted(graph[n]):
      if state.get(d) == 1:
        cycle = stack[stack.index(d) :] + [d] if d in stack else [n, d]
        raise AssertionError('import cycle: ' + ' -> '.join(cycle))
      if d not in state:
        visit(d, stack + [d])
    state[n] = 2

  for n in sorted(graph):
    if n not in state:
      visit(n, [n])


def test_no_private_jax_imports():
  for name, path in _modules().items():
    src = path.read_text()
    assert 'jax._src' not in src, f'{name} imports from jax._src'


def test_public_names_are_exported_explicitly():
  assert len(set(oto_jax.__all__)) == len(oto_jax.__all__)
  for n in oto_jax.__all__:
    assert hasattr(oto_jax, n), n
  public = {n for n in vars(oto_jax) if not n.startswith('_')}
  modules = {n for n in public if isinstance(getattr(oto_jax, n), type(oto_jax))}
  assert public - modules - set(oto_jax.__all__) == set(), 'public names missing from __all__'


def test_every_name_in_the_readme_table_exists():
  table = README.read_text().split('## Public API', 1)[1].split('\n## ', 1)[0]
  names = set(re.findall(r'`oto_jax\.([A-Za-z_][A-Za-z_0-9]*)', table))
  assert names, 'no public API table in README.md'
  for n in sorted(names):
    assert hasattr(oto_jax, n), f'README names oto_jax.{n}, which does not exist'
  # Methods and attributes the table promises on the partition and the subnet.
  for cls, attrs in (
    (oto_jax.ZIGPartition, re.findall(r'`ZIGPartition\.([a-z_]+)', table)),
    (oto_jax.Subnet, re.findall(r'`Subnet\.([a-z_]+)', table)),
  ):
    for a in attrs:
      assert hasattr(cls, a) or a in cls.__dataclass_fields__, f'{cls.__name__}.{a}'
