"""A plain install (no dev extra) runs every console script and the public flows that write pictures.

How the environment is made (faster than a second 6 GB install, and as strict about what is declared):

1. the package is built as a wheel (``pip wheel --no-deps``, the same build ``pip install spformer``
   runs) and installed with ``--no-deps`` into a fresh virtual environment: its console scripts, its
   package data (the C kernel source) and nothing of the source tree;
2. that environment sees only the distributions the wheel's ``Requires-Dist`` pulls in, recursively
   (markers evaluated, extras followed): each of them is linked into its ``site-packages`` from the
   environment running the tests (CI's, installed from the README's command). Everything else there
   (the dev extra: pytest, pytest-timeout) is absent, so a runtime import declared only as a dev
   extra fails here as it would for a user;
3. every console script runs once, in a fresh process, from a folder outside the repository, offline,
   with its own Hub cache.
"""
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ('spformer-demo', 'spformer-eval-superpixels', 'spformer-visualize', 'spformer-hub')


def _normalize(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def _closure(requirements, environment) -> dict:
    """Installed distributions the requirements pull in (name -> Distribution), following their own."""
    found, todo = {}, [(r, frozenset()) for r in requirements]
    while todo:
        text, extras = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not any(
                req.marker.evaluate(dict(environment, extra=e)) for e in (extras or {''})):
            continue
        name = _normalize(req.name)
        if name in found and not req.extras:
            continue
        dist = importlib.metadata.distribution(req.name)  # PackageNotFoundError: a requirement not installed
        found[name] = dist
        todo += [(r, frozenset(req.extras)) for r in dist.requires or []]
    return found


def _top_level_entries(dist) -> set:
    """What a distribution put directly into site-packages (packages, modules, its .dist-info)."""
    entries = set()
    for f in dist.files or []:
        parts = pathlib.PurePosixPath(str(f)).parts
        if parts and parts[0] != '..' and not parts[0].endswith('.pth'):
            entries.add(parts[0])
    return entries


@pytest.fixture(scope='module')
def plain_env(tmp_path_factory):
    """(bin folder, python, env vars) of the plain install."""
    tmp = tmp_path_factory.mktemp('plain')
    # Built from a copy of what the package is made of (setuptools writes build/ next to its sources).
    source = tmp / 'source'
    source.mkdir()
    for name in ('pyproject.toml', 'README.md', 'spformer', 'kernels', 'hub'):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({'ignore': shutil.ignore_patterns('__pycache__')}
                                            if (ROOT / name).is_dir() else {}))
    wheels = tmp / 'wheels'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(wheels), str(source)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next(wheels.glob('spformer-*.whl'))
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))).decode()
        shipped = z.namelist()
    assert 'spformer/kernels/cpu_kernels.c' in shipped, 'the C kernel source is not in the wheel'
    requires = [line.split(':', 1)[1].strip() for line in metadata.splitlines() if line.startswith('Requires-Dist:')]

    venv = tmp / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    site = pathlib.Path(subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                       check=True, capture_output=True, text=True).stdout.strip())
    here = pathlib.Path(sysconfig.get_paths()['purelib'])
    environment = {k: v for k, v in __import__('packaging.markers', fromlist=['default_environment'])
                   .default_environment().items()}
    runtime = _closure(requires, environment)
    for dist in runtime.values():
        for entry in _top_level_entries(dist):
            source = here / entry
            if source.exists() and not (site / entry).exists():
                (site / entry).symlink_to(source)
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '--no-index', '-q',
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'VIRTUAL_ENV'))}
    env.update(PATH=f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}', HF_HOME=str(tmp / 'hf_home'),
               HF_HUB_OFFLINE='1', MPLBACKEND='Agg', OMP_NUM_THREADS='2')
    return dict(bin=venv / 'bin', python=python, env=env, work=tmp / 'work', runtime=set(runtime), requires=requires)


def _run(plain_env, *command, timeout=600):
    plain_env['work'].mkdir(exist_ok=True)
    proc = subprocess.run([str(c) for c in command], cwd=plain_env['work'], env=plain_env['env'],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout


def test_plain_install_is_the_declared_runtime_only(plain_env):
    # The dev extra is not there, the package and what it declares are, and the package is the wheel's,
    # not the source tree.
    assert 'pytest' not in plain_env['runtime'] and 'matplotlib' in plain_env['runtime']
    code = ('import importlib.util as u, spformer, spformer.kernels, spformer.hub; '
            'print(u.find_spec("pytest") is None, u.find_spec("pytest_timeout") is None, spformer.__file__)')
    missing_pytest, missing_timeout, location = _run(plain_env, plain_env['python'], '-c', code).split()
    assert missing_pytest == missing_timeout == 'True'
    assert not pathlib.Path(location).resolve().is_relative_to(ROOT), location
    for script in CONSOLE_SCRIPTS:
        assert f'usage: {script}' in _run(plain_env, plain_env['bin'] / script, '--help')


def test_requirements_are_ranges_and_constraints_pin_what_ci_installs(plain_env):
    # A library that pins one torch breaks its users' environments: exact versions belong in
    # constraints.txt (our own install command and CI), not in the wheel's requirements.
    pinned = [r for r in plain_env['requires'] if any(s.operator in ('==', '===') for s in Requirement(r).specifier)]
    assert pinned == [], pinned
    declared = {_normalize(Requirement(r).name): Requirement(r).specifier for r in plain_env['requires']}
    constraints = [Requirement(line) for line in (ROOT / 'constraints.txt').read_text().splitlines()
                   if line.strip() and not line.startswith('#')]
    for c in constraints:  # every pinned version satisfies the declared range
        [version] = [s.version for s in c.specifier if s.operator == '==']
        assert declared[_normalize(c.name)].contains(version), (c, declared[_normalize(c.name)])
    assert {_normalize(c.name) for c in constraints} >= {'torch', 'torchvision', 'timm'}


def test_every_console_script_runs_on_a_plain_install(plain_env):
    python, bin_ = plain_env['python'], plain_env['bin']
    tiny = 'spformer_tiny_sp16_224'
    out = _run(plain_env, bin_ / 'spformer-demo', '--model', tiny, '--out', 'demo.png')
    assert 'UNTRAINED' in out and 'wrote       : demo.png' in out

    # A dataset and an image from the package itself, then the evaluation with its pictures.
    _run(plain_env, python, '-c', "from spformer.eval.datasets import write_shapes_dataset; "
                                  "write_shapes_dataset('shapes', 'folder', num_images=1, size=(96, 128), seed=0)")
    out = _run(plain_env, bin_ / 'spformer-eval-superpixels', 'shapes', '--model', tiny, '--pictures', '1',
               '--out-dir', 'eval', '--no-progress')
    assert f'| {tiny} | ' in out and (plain_env['work'] / 'eval' / 'pictures' / '000_shapes_000.png').is_file()
    image = next((plain_env['work'] / 'shapes' / 'images').iterdir())
    out = _run(plain_env, bin_ / 'spformer-visualize', image, '--model', tiny, '--out', 'vis.png')
    assert 'wrote   : vis.png' in out

    # The Hub folder (save_pretrained draws superpixels.png), then spformer-hub export of it.
    _run(plain_env, python, '-c', f"import timm, spformer; from spformer.hub import save_pretrained; "
                                  f"save_pretrained(timm.create_model('{tiny}', img_size=64, num_classes=3), 'saved')")
    out = _run(plain_env, bin_ / 'spformer-hub', 'export', 'saved', 'exported')
    assert out.strip().endswith('exported')
    for folder in ('saved', 'exported'):
        assert {p.name for p in (plain_env['work'] / folder).iterdir()} == {
            'config.json', 'model.safetensors', 'README.md', 'superpixels.png'}
    for png in ('demo.png', 'vis.png', 'exported/superpixels.png'):
        assert (plain_env['work'] / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
