"""The package layout reads as the data flow: no import cycles among spformer's modules, and each layer
imports only the layers below it (docs/layout.md).

The import graph is read from the sources (``ast``), not from ``sys.modules``: every ``import`` and
``from ... import`` counts, at module level or inside a function (a lazy import hides a cycle from the
interpreter, not from a reader). ``kernels/`` and ``hub/`` are mapped to ``spformer.kernels`` and
``spformer.hub``, as pyproject.toml ships them. The implicit import of a module's parent package is not
an edge (every package ``__init__`` that re-exports its modules would otherwise be a cycle).
"""
import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> package name, as pyproject.toml's package-dir ships them
PACKAGE_DIRS = {'spformer': 'spformer', 'kernels': 'spformer.kernels', 'hub': 'spformer.hub'}


def module_files(root: Path, package_dirs: Dict[str, str]) -> Dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the package folders."""
    modules = {}
    for folder, package in package_dirs.items():
        for path in sorted((root / folder).rglob('*.py')):
            parts = list(path.relative_to(root / folder).with_suffix('').parts)
            if parts[-1] == '__init__':
                parts = parts[:-1]
            modules['.'.join([package, *parts])] = path
    return modules


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Module -> the modules of ``modules`` it imports anywhere in its source."""
    graph = {}
    for name, path in modules.items():
        is_package = path.name == '__init__.py'
        package = name if is_package else name.rpartition('.')[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')
                    base = base[:len(base) - node.level + 1]
                    base = '.'.join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                candidates = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base
                              for alias in node.names]
            else:
                continue
            for target in candidates:
                while target and target not in modules:  # `import spformer.eval.metrics as m` and the like
                    target = target.rpartition('.')[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a cycle path."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_cycle_path(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_path(graph: Dict[str, Set[str]], component: Set[str]) -> List[str]:
    """One cycle through a strongly connected component, for the message: a -> b -> ... -> a."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in component)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [w for w in nxt if w not in seen]
        if not fresh:  # only back-edges into the path left: close the cycle there
            w = nxt[0]
            return path[path.index(w):] + [w]
        path.append(fresh[0])
        seen.add(fresh[0])


MODULES = module_files(ROOT, PACKAGE_DIRS)
GRAPH = import_graph(MODULES)


def test_the_walk_finds_what_it_should(tmp_path):
    # the walker against a planted layout: a cycle through a lazy import in a function, a relative import,
    # `from package import module`, and a parent-package import that must not count.
    (tmp_path / 'pkg' / 'sub').mkdir(parents=True)
    files = {
        'pkg/__init__.py': 'from .sub import b\n',
        'pkg/a.py': 'import os\nfrom pkg.sub import b\n',
        'pkg/sub/__init__.py': 'from . import b\n',
        'pkg/sub/b.py': 'def f():\n    from ..c import g\n',
        'pkg/c.py': 'def g():\n    import pkg.a as a\n',
        'pkg/leaf.py': 'from pkg.sub.b import f\n',
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    graph = import_graph(module_files(tmp_path, {'pkg': 'pkg'}))
    assert graph == {
        'pkg': {'pkg.sub.b'}, 'pkg.a': {'pkg.sub.b'}, 'pkg.sub': {'pkg.sub.b'}, 'pkg.sub.b': {'pkg.c'},
        'pkg.c': {'pkg.a'}, 'pkg.leaf': {'pkg.sub.b'}}
    assert cycles(graph) == [['pkg.a', 'pkg.sub.b', 'pkg.c', 'pkg.a']]
    (tmp_path / 'pkg/c.py').write_text('def g():\n    pass\n')
    assert cycles(import_graph(module_files(tmp_path, {'pkg': 'pkg'}))) == []


def test_the_walk_sees_the_whole_package():
    for name in ('spformer', 'spformer.kernels', 'spformer.kernels.functional', 'spformer.hub.checkpoint',
                 'spformer.models.spformer', 'spformer.models.pretrained', 'spformer.eval.metrics',
                 'spformer.eval.cli', 'spformer.training', 'spformer.pictures'):
        assert name in MODULES, name
    # edges the sources are known to hold, so that an empty graph cannot pass the tests below
    assert 'spformer.models.pretrained' in GRAPH['spformer.models.spformer']
    assert 'spformer.kernels.functional' in GRAPH['spformer.models.spformer']
    assert 'spformer.models.pretrained' in GRAPH['spformer.hub.checkpoint']
    assert 'spformer.hub.checkpoint' in GRAPH['spformer.eval.cli']


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, 'import cycles among spformer modules:\n' + '\n'.join(' -> '.join(c) for c in found)


# Each layer and the spformer modules it may import (prefixes; its own layer is always allowed). The data
# flow of docs/layout.md: ops -> models -> model loading (hub) -> evaluation / pictures -> command lines.
LEAVES = ('spformer.errors', 'spformer.images', 'spformer.cli', 'spformer.allocator')
LAYERS = {
    'spformer.kernels': ('spformer.allocator',),
    'spformer.layers': ('spformer.kernels',),
    'spformer.models': ('spformer.layers', 'spformer.kernels', 'spformer.allocator'),
    'spformer.sna': ('spformer.kernels',),
    'spformer.flops': ('spformer.kernels',),  # fvcore handles written from the ops' FLOP formulas
    'spformer.pictures': (),
    'spformer.hub': ('spformer.models', 'spformer.kernels', 'spformer.pictures', *LEAVES),
    'spformer.eval': ('spformer.hub.checkpoint', 'spformer.pictures', *LEAVES),  # models only through loading
    'spformer.training': ('spformer.models', 'spformer.kernels', 'spformer.hub', 'spformer.eval', 'spformer.pictures',
                          *LEAVES),
}


def _within(target: str, allowed) -> bool:
    if target == 'spformer':  # the top package: its __init__ registers the models (import spformer)
        return 'spformer.models' in allowed
    return any(target == a or target.startswith(a + '.') for a in allowed)


@pytest.mark.parametrize('layer', sorted(LAYERS))
def test_layers_import_only_what_is_below_them(layer):
    allowed = (layer, *LAYERS[layer], 'spformer.errors')
    bad = sorted(
        f'{module} imports {target}' for module, targets in GRAPH.items()
        if module == layer or module.startswith(layer + '.')
        for target in targets if not _within(target, allowed))
    assert not bad, f'{layer} may import only {allowed}:\n' + '\n'.join(bad)


@pytest.mark.parametrize('leaf', LEAVES)
def test_leaves_import_no_other_spformer_module(leaf):
    assert GRAPH[leaf] <= {'spformer.errors'}, f'{leaf} imports {sorted(GRAPH[leaf])}'


def _loaded_after(statement: str) -> Set[str]:
    code = f'import sys; {statement}; print("\\n".join(sorted(sys.modules)))'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(out.stdout.split())


def test_importing_the_evaluation_loads_no_pictures_training_or_command_line():
    loaded = _loaded_after('import spformer.eval')
    assert 'spformer.eval.metrics' in loaded and 'spformer.eval.evaluation' in loaded  # the probe works
    unwanted = sorted(m for m in loaded if m.split('.')[0] == 'matplotlib' or m.startswith(
        ('spformer.training', 'spformer.eval.cli', 'spformer.pictures', 'accelerate')))
    assert not unwanted, unwanted


def test_the_old_module_names_still_work():
    # spformer.superpixel_eval and spformer.datasets are aliases for one release: same objects, a FutureWarning
    code = ('import warnings; warnings.simplefilter("error", FutureWarning)\n'
            'try:\n    import spformer.superpixel_eval\nexcept FutureWarning as w:\n    print(w)\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert 'import spformer.eval instead' in out.stdout, out.stderr[-3000:]
    with pytest.warns(FutureWarning, match='spformer.eval.datasets'):
        import spformer.datasets as old_datasets
        import importlib
        importlib.reload(old_datasets)
    with pytest.warns(FutureWarning):
        import spformer.superpixel_eval as old_eval
        importlib.reload(old_eval)
    import spformer.eval
    import spformer.eval.cli
    import spformer.eval.datasets
    import spformer.pictures
    import spformer.visualize
    for name in old_eval.__all__:
        assert getattr(old_eval, name) is getattr(spformer.eval.cli if name == 'main' else spformer.eval, name), name
    for name in old_datasets.__all__:
        assert getattr(old_datasets, name) is getattr(spformer.eval.datasets, name), name
    for name in ('superpixel_boundaries', 'tensor_to_image', 'stage_labels', 'save_superpixel_figure',
                 'save_stages_figure', 'save_comparison_figure'):  # the drawing functions at their old home
        assert getattr(spformer.visualize, name) is getattr(spformer.pictures, name), name
