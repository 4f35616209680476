"""The fused CPU backend (kernels/cpu_kernels.c, compiled on first use) against the reference
backend, the test oracle: values and every gradient in float64 over a sweep of grids (1x1, 1xN,
Nx1, non-square, borders), cells 1-7, 1-3 heads, d != dv, batch > 1, both pixel layouts; fp64
gradcheck; and what happens without a C compiler. Each test checks that the kernels, not the
torch backend they fall back to, ran.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from spformer.kernels import cpu_backend, image_to_cells, pixel_attention, superpixel_attention, torch_backend
from spformer.kernels.functional import cells_to_image

pytestmark = pytest.mark.skipif(not cpu_backend.available(), reason=f'no C compiler: {cpu_backend.unavailable_reason()}')


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if the torch backend's attention runs: the C kernels must have done the work."""
    def refuse(*args, **kwargs):
        raise AssertionError('the torch backend ran instead of the C kernels')
    for name in ('superpixel_attention_fwd', 'superpixel_attention_bwd', 'pixel_attention_fwd', 'pixel_attention_bwd'):
        monkeypatch.setattr(torch_backend, name, refuse)


# (B, M, h, w, cell, d, dv, scale)
CONFIGS = [
    (1, 1, 1, 1, 1, 3, 3, None),
    (1, 2, 1, 1, 4, 4, 2, None),
    (2, 1, 1, 4, 2, 3, 5, None),
    (1, 3, 4, 1, 3, 2, 4, 0.7),
    (2, 2, 3, 5, 4, 4, 3, None),
    (1, 2, 2, 3, 7, 2, 3, 1.3),
    (3, 3, 4, 4, 2, 5, 3, 0.25),
]


def _inputs(B, M, h, w, cell, d, dv, dtype=torch.float64, seed=0, pixel_heads=1):
    g = torch.Generator().manual_seed(seed)
    H, W = h * cell, w * cell
    Mp = pixel_heads

    def rnd(*shape, mult=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * mult).to(dtype).requires_grad_()
    return dict(
        q_s=rnd(B, M, h, w, d, mult=2.0), k_p=rnd(B, Mp, H, W, d), v_p=rnd(B, Mp, H, W, dv),
        q_p=rnd(B, Mp, H, W, d, mult=2.0), k_s=rnd(B, M, h, w, d), v_s=rnd(B, M, h, w, dv), bias=rnd(B, M, h, w),
    )


def _run(x, cell, scale, backend, layout, shared_kv):
    """Both ops on the inputs; outputs in image layout and the gradients of every input."""
    cells = layout == 'cells'
    conv = (lambda t: image_to_cells(t, cell)) if cells else (lambda t: t)
    k_p = conv(x['k_p'])
    v_p = k_p if shared_kv else conv(x['v_p'])
    out_s = superpixel_attention(x['q_s'], k_p, v_p, cell, scale=scale, backend=backend, pixel_layout=layout)
    out_p = pixel_attention(conv(x['q_p']), x['k_s'], x['v_s'], cell, scale=scale, bias=x['bias'], backend=backend,
                            pixel_layout=layout)
    if cells:
        out_p = cells_to_image(out_p, cell)
    return _with_grads(x, out_s, out_p, shared_kv)


def _with_grads(x, out_s, out_p, shared_kv):
    """The outputs and the gradients of every input for fixed random upstream gradients (drawn in
    float64, so every dtype gets the same ones)."""
    g = torch.Generator().manual_seed(5)
    up = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in (out_s, out_p)]
    loss = (out_s * up[0]).sum() + (out_p * up[1]).sum()
    leaves = [t for name, t in x.items() if not (shared_kv and name == 'v_p')]
    return [out_s, out_p], torch.autograd.grad(loss, leaves)


def _run_reference(x, cell, scale, shared_kv):
    # the reference backend has no shared-head path of its own: a shared tensor expanded to M heads
    M = x['q_s'].shape[1]
    e = lambda t: t.expand(t.shape[0], M, *t.shape[2:])  # noqa: E731
    k_p = e(x['k_p'])
    v_p = k_p if shared_kv else e(x['v_p'])
    out_s = superpixel_attention(x['q_s'], k_p, v_p, cell, scale=scale, backend='reference')
    out_p = pixel_attention(e(x['q_p']), x['k_s'], x['v_s'], cell, scale=scale, bias=x['bias'], backend='reference')
    return _with_grads(x, out_s, out_p, shared_kv)


@pytest.mark.parametrize('pixel_heads', ['shared', 'per head'])
@pytest.mark.parametrize('shared_kv', [True, False], ids=['k=v', 'k,v'])
@pytest.mark.parametrize('layout', ['image', 'cells'])
@pytest.mark.parametrize('cfg', CONFIGS, ids=lambda c: 'B{}M{}_{}x{}_cell{}_d{}dv{}'.format(*c[:7]))
def test_cpu_kernels_match_reference(cfg, layout, shared_kv, pixel_heads, no_fallback):
    """Pixel tensors shared by all heads (the model's case) or one per head; keys = values or not."""
    B, M, h, w, cell, d, dv, scale = cfg
    if shared_kv:
        dv = d
    x = _inputs(B, M, h, w, cell, d, dv, pixel_heads=1 if pixel_heads == 'shared' else M)
    got, got_grads = _run(x, cell, scale, 'cpu', layout, shared_kv)
    want, want_grads = _run_reference(x, cell, scale, shared_kv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # not vacuous: the values' gradients (the others are 0 where a softmax has one candidate)
    assert want_grads[1 if shared_kv else 2].abs().max() > 0 and want_grads[-2].abs().max() > 0


@pytest.mark.parametrize('cfg', [(1, 2, 3, 2, 2, 3, 2, None), (2, 1, 1, 3, 3, 2, 3, 0.5), (1, 3, 2, 2, 1, 2, 2, None)],
                         ids=['2x3_cell2', '1x3_cell3', '2x2_cell1'])
def test_cpu_kernels_gradcheck(cfg, no_fallback):
    """float64 gradcheck of both ops (every input: queries, keys, values, bias) on the C kernels."""
    B, M, h, w, cell, d, dv, scale = cfg
    x = _inputs(B, M, h, w, cell, d, dv, seed=3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: superpixel_attention(q, k, v, cell, scale=scale, backend='cpu'), (x['q_s'], x['k_p'], x['v_p']))
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: pixel_attention(q, k, v, cell, scale=scale, bias=b, backend='cpu'),
        (x['q_p'], x['k_s'], x['v_s'], x['bias']))


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)], ids=['float32', 'bfloat16'])
def test_cpu_kernels_low_precision(dtype, tol, no_fallback):
    """fp32 in the C kernels, and bf16 inputs computed in fp32 (as every backend accumulates), against
    the float64 reference; outputs keep the input dtype."""
    x64 = _inputs(2, 2, 3, 4, 4, 8, 8)
    x = {k: v.detach().to(dtype).requires_grad_() for k, v in x64.items()}
    got, got_grads = _run(x, 4, None, 'cpu', 'cells', shared_kv=True)
    want, want_grads = _run_reference({k: v.detach().to(dtype).double().requires_grad_() for k, v in x64.items()},
                                      4, None, shared_kv=True)
    assert all(o.dtype == dtype for o in got)
    for a, b in zip(list(got) + list(got_grads), list(want) + list(want_grads)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_cpu_backend_on_other_devices_is_refused():
    """backend='cpu' on CUDA tensors (none here: the dispatch itself) names the device."""
    from spformer.kernels import functional
    with pytest.raises(ValueError, match="backend='cpu' runs the fused C kernels on CPU tensors, got tensors on cuda"):
        functional._impl('cpu', torch.device('cuda'))
    assert functional._impl('auto', torch.device('cpu')) is cpu_backend


@pytest.mark.parametrize('args', ['', ' -O2'], ids=['CC', 'CC with arguments'])
def test_without_a_compiler(monkeypatch, tmp_path, args):
    """No C compiler: 'auto' warns once (naming $CC) and runs the torch backend; backend='cpu' says why it
    cannot run."""
    monkeypatch.setattr(cpu_backend, '_libraries', {})
    monkeypatch.setattr(cpu_backend, '_unavailable', None)
    cc = f'{tmp_path / "no-such-compiler"}{args}'
    monkeypatch.setenv('CC', cc)
    monkeypatch.setenv('SPFORMER_CACHE_DIR', str(tmp_path / 'cache'))
    torch.manual_seed(0)
    q_s, x_p = torch.randn(1, 2, 2, 3, 4), torch.randn(1, 1, 8, 12, 4)
    with pytest.warns(RuntimeWarning, match=f'fused CPU attention kernels are unavailable \\(CC={re.escape(repr(cc))}: .*'
                                            'no-such-compiler.*Set CC to a C compiler'):
        out = superpixel_attention(q_s, x_p, x_p, 4)
    torch.testing.assert_close(out, superpixel_attention(q_s, x_p, x_p, 4, backend='torch'))
    with pytest.raises(ValueError, match="backend='cpu': the fused C kernels are unavailable"):
        superpixel_attention(q_s, x_p, x_p, 4, backend='cpu')


def _failing_compiler(monkeypatch, tmp_path):
    """A compiler that answers --version but fails every build, as CC, with an empty cache in tmp_path and
    this process's loaded libraries forgotten; returns its path."""
    monkeypatch.setattr(cpu_backend, '_libraries', {})
    monkeypatch.setattr(cpu_backend, '_unavailable', None)
    broken = tmp_path / 'broken-cc'
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "broken-cc 1.0" && exit 0\n'
                      'echo "broken-cc: error: no luck today" >&2; exit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv('CC', str(broken))
    monkeypatch.setenv('SPFORMER_CACHE_DIR', str(tmp_path / 'cache'))
    return broken


def test_failing_compiler_leaves_no_temporary_file(monkeypatch, tmp_path):
    """A compiler that runs but fails (every flag set): the warning gives its last line of errors and
    blames it; nothing is left in the cache directory but its lock file."""
    _failing_compiler(monkeypatch, tmp_path)
    with pytest.warns(RuntimeWarning, match='kernels are unavailable .*no luck today.*Set CC to a C compiler'):
        assert not cpu_backend.available(torch.float32)
    assert [p.name for p in (tmp_path / 'cache' / 'cpu_kernels').iterdir()] == ['.lock']


def test_broken_library_and_failing_rebuild(monkeypatch, tmp_path):
    """A cached library that fails its check, and a compiler that cannot rebuild it: one warning naming
    the file, why, and that this process runs the PyTorch backend, which it does. The file is never
    loaded (its size is not the recorded one), so this runs in this process."""
    broken = _failing_compiler(monkeypatch, tmp_path)
    lib = cpu_backend._library_path(cpu_backend._cache_dir(), 'f32', [str(broken)], 'broken-cc 1.0\n',
                                    cpu_backend.FLAGS)
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b'\x7fELF' + bytes(60))
    lib.with_name(lib.name + '.json').write_text(json.dumps(dict(size=82368, sha256='0' * 64)))
    torch.manual_seed(0)
    q_s, x_p = torch.randn(1, 2, 2, 3, 4), torch.randn(1, 1, 8, 12, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = superpixel_attention(q_s, x_p, x_p, 4)
    (warning,) = [str(w.message) for w in caught if 'spformer' in str(w.message)]
    assert str(lib) in warning and '64 bytes where 82368 were written' in warning, warning
    assert 'no luck today' in warning and 'PyTorch backend' in warning, warning
    assert not cpu_backend.available() and not lib.exists()
    torch.testing.assert_close(out, superpixel_attention(q_s, x_p, x_p, 4, backend='torch'))


def test_kernels_switched_off(monkeypatch):
    """SPFORMER_CPU_KERNELS=0: no library is loaded and no warning given (the user asked); the model
    then reads its pixels cell-major on the torch backend, without the inference kernels, and gives
    the same output as with them."""
    torch.manual_seed(0)
    model = timm.create_model('spformer_tiny_sp16_224', img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with_kernels = model(x)
    monkeypatch.setattr(cpu_backend, '_libraries', {})
    monkeypatch.setattr(cpu_backend, '_unavailable', None)
    monkeypatch.setenv('SPFORMER_CPU_KERNELS', '0')
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter('always')
        without = model(x)
    assert not [w for w in caught if 'spformer' in str(w.message)]
    assert not cpu_backend.available() and cpu_backend.unavailable_reason() == 'SPFORMER_CPU_KERNELS=0'
    assert not any(cpu_backend._libraries.values())  # nothing compiled or loaded
    assert cpu_backend.conv_rescale(torch.randn(1, 2, 2, 4), torch.randn(9, 4), None, torch.eye(4), 1e-6) is None
    torch.testing.assert_close(without, with_kernels, rtol=1e-5, atol=1e-5)


def test_compiled_library_is_cached(monkeypatch, tmp_path):
    """The first use compiles into the cache directory, later processes load it from there."""
    monkeypatch.setattr(cpu_backend, '_libraries', {})
    monkeypatch.setenv('SPFORMER_CACHE_DIR', str(tmp_path))
    assert cpu_backend.available(torch.float32)
    built = list((tmp_path / 'cpu_kernels').glob('spformer_cpu_f32_*.so'))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_backend, '_libraries', {})
    assert cpu_backend.available(torch.float32)
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


@pytest.mark.parametrize('with_bias', [True, False], ids=['bias', 'no bias'])
@pytest.mark.parametrize('B, H, W, C, dtype', [
    (2, 5, 13, 64, torch.float32),  # the vector path for 64 channels: rows not a multiple of its 8-pixel tile
    (1, 1, 1, 64, torch.float32),  # one pixel: all 8 neighbours outside
    (1, 6, 1, 64, torch.float64),
    (3, 4, 9, 33, torch.float32),  # any C: the portable path, a partial 16-column block of the factor
    (2, 3, 7, 20, torch.float64),
])
def test_conv_rescale_matches_unfused(B, H, W, C, dtype, with_bias):
    """The fused inference pixel features of an SCA iteration (depthwise 3x3 conv plus identity, then
    z (z^T G z + eps)^-1/2 through G's triangular factor) against torch's conv2d and the explicit
    quadratic form in float64. The pixels are a non-contiguous view (the kernel reads a copy)."""
    torch.manual_seed(0)
    x = torch.randn(B, W, H, C, dtype=dtype).transpose(1, 2)
    weight = torch.randn(C, 1, 3, 3, dtype=dtype) * 0.3
    bias = torch.randn(C, dtype=dtype) if with_bias else None
    proj = torch.randn(3 * C, C, dtype=torch.float64)
    wc = proj - proj.mean(0)
    gram = wc.t() @ wc / proj.shape[0]
    taps = weight.reshape(C, 9).t().clone()
    taps[4] += 1  # the identity in the centre tap
    got = cpu_backend.conv_rescale(x, taps, bias, torch.linalg.cholesky(gram, upper=True).to(dtype), 1e-6)
    x64 = x.double()
    z = x64 + F.conv2d(x64.permute(0, 3, 1, 2), weight.double(), None if bias is None else bias.double(),
                       padding=1, groups=C).permute(0, 2, 3, 1)
    want = z * ((z @ gram) * z).sum(-1, keepdim=True).add(1e-6).rsqrt()
    assert got.dtype == dtype and got.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize('B, h, w, cell, Cp, C, dtype', [
    (2, 3, 2, 4, 12, 48, torch.float32),  # the vector path (C % 16 == 0); rows of 8 pixels, not a multiple of 8
    (1, 1, 2, 7, 64, 384, torch.float32),  # SPFormer's widths, cells of 7
    (3, 1, 1, 4, 5, 20, torch.float32),  # the portable path
    (2, 2, 3, 3, 8, 12, torch.float64),
])
def test_cell_pooled_projection_matches_unfused(B, h, w, cell, Cp, C, dtype):
    """The superpixel initialization for CPU inference in one pass (projection, LayerNorm, GELU and
    cell mean without the wide map) against the unfused torch ops in float64, from a non-contiguous
    view of the pixels."""
    torch.manual_seed(0)
    x = torch.randn(B, w * cell, h * cell, Cp, dtype=dtype).transpose(1, 2)
    weight = torch.randn(C, Cp, dtype=dtype) * 0.3
    gamma, beta = 1 + 0.5 * torch.randn(C, dtype=dtype), 0.5 * torch.randn(C, dtype=dtype)
    got = cpu_backend.cell_pooled_projection(x, weight, gamma, beta, 1e-6, cell)
    y = F.gelu(F.layer_norm(x.double() @ weight.double().t(), (C,), gamma.double(), beta.double(), 1e-6))
    want = F.avg_pool2d(y.permute(0, 3, 1, 2), cell).permute(0, 2, 3, 1)
    assert got.dtype == dtype and got.shape == (B, h, w, C)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.double(), want, **tol)


def test_first_compilation_says_so_once(tmp_path):
    """A process that compiles (here both libraries, float32 and float64) prints one line on stderr
    saying why its first call is slow; a later process that finds them cached prints nothing."""
    code = ('import torch\nfrom spformer.kernels import cpu_backend\n'
            'assert cpu_backend.available(torch.float32) and cpu_backend.available(torch.float64)\n')
    env = dict(os.environ, SPFORMER_CACHE_DIR=str(tmp_path / 'cache'), PYTHONWARNINGS='always')
    runs = [subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=240, check=True) for _ in range(2)]
    line = f'spformer: compiling the fused CPU kernels (once per machine and version, a few seconds; cached in ' \
           f'{tmp_path / "cache" / "cpu_kernels"})'
    assert runs[0].stderr.splitlines() == [line], runs[0].stderr
    assert len(list((tmp_path / 'cache' / 'cpu_kernels').glob('*.so'))) == 2
    assert runs[1].stderr == '', runs[1].stderr


# The cache of compiled libraries under faults, each as it happens: in child processes with a cache
# directory of their own (this process's library stays as it is), each running both attention ops once and
# comparing them with the torch backend. A child prints what it saw as JSON on its last stdout line.
_CHILD = '''
import json, warnings
import torch
from spformer.kernels import cpu_backend, pixel_attention, superpixel_attention
torch.manual_seed(0)
q_s, k_s, x_p = torch.randn(1, 2, 2, 3, 4), torch.randn(1, 2, 2, 3, 4), torch.randn(1, 1, 8, 12, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    got = [superpixel_attention(q_s, x_p, x_p, 4), pixel_attention(x_p, k_s, k_s, 4)]
    kernels = cpu_backend.available()
want = [superpixel_attention(q_s, x_p, x_p, 4, backend='torch'), pixel_attention(x_p, k_s, k_s, 4, backend='torch')]
print(json.dumps(dict(kernels=kernels, warnings=[str(w.message) for w in caught],
                      error=max(float((a - b).abs().max()) for a, b in zip(got, want)))))
'''
_NOTICE = 'spformer: compiling the fused CPU kernels'


def _child_env(cache, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ('CC', 'SPFORMER_CPU_KERNELS', 'PYTHONWARNINGS')}
    return dict(env, SPFORMER_CACHE_DIR=str(cache), **extra)


def _check(proc):
    """The child's report, after checking that it ran to the end (a SIGBUS shows as returncode -7)."""
    why = f'killed by {signal.Signals(-proc.returncode).name}' if proc.returncode < 0 else f'exit {proc.returncode}'
    assert proc.returncode == 0, f'the child process died ({why}): {proc.stderr[-3000:]}'
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['error'] < 1e-5, report  # the same results as the torch backend
    return report


def _run_child(tmp_path, cache, **extra):
    proc = subprocess.run([sys.executable, '-c', _CHILD], cwd=tmp_path, env=_child_env(cache, **extra),
                          capture_output=True, text=True, timeout=240)
    return _check(proc), proc.stderr


def _folder(cache):
    return cache / 'cpu_kernels'


def _leftovers(cache):
    """Files in the cache that are neither a library, its record nor the lock file."""
    return sorted(p.name for p in _folder(cache).iterdir() if not p.name.startswith('spformer_cpu_')
                  and p.name != '.lock')


def _library(cache):
    (lib,) = _folder(cache).glob('spformer_cpu_f32_*.so')
    return lib


def _cc():
    cc = shutil.which('cc') or shutil.which('gcc')
    if cc is None:
        pytest.skip('no cc on PATH')
    return cc


@pytest.fixture(scope='module')
def built_cache(tmp_path_factory):
    """A cache directory in which a process compiled the float32 library (copied by the tests that break it)."""
    root = tmp_path_factory.mktemp('built')
    report, stderr = _run_child(root, root / 'cache')
    assert report['kernels'] and not report['warnings'] and _NOTICE in stderr, (report, stderr)
    return root / 'cache'


@pytest.fixture
def cache(tmp_path, built_cache):
    """A copy of :func:`built_cache` for one test."""
    shutil.copytree(built_cache, tmp_path / 'cache')
    return tmp_path / 'cache'


@pytest.fixture
def wrapper(tmp_path):
    """A compiler wrapper as ccache is (a command that runs the command after it), in a path with a space:
    logs its arguments to ``.log`` and, with SLOW_CC=s, touches ``.compiling`` and sleeps s seconds before
    compiling."""
    path = tmp_path / 'bin dir' / 'my-ccache'
    path.parent.mkdir()
    path.write_text('#!/bin/sh\necho "$*" >> "$0.log"\n'
                    'if [ -n "$SLOW_CC" ] && [ "$1" != "--version" ] && [ "$2" != "--version" ]; then\n'
                    '  touch "$0.compiling"; sleep "$SLOW_CC"\nfi\nexec "$@"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize('size', ['half', 'empty'])
def test_truncated_library_is_rebuilt_not_loaded(tmp_path, cache, size):
    """A cached library cut short after it was built (a full disk, a power loss) is never mapped (it would
    kill the process with SIGBUS at the first call into it): its size and hash are checked against the
    record written after it. The next process warns once, naming the file, removes it, rebuilds it and
    runs the kernels; the process after that loads the rebuilt library silently."""
    lib = _library(cache)
    os.truncate(lib, lib.stat().st_size // 2 if size == 'half' else 0)
    report, stderr = _run_child(tmp_path, cache)
    assert report['kernels'], report
    (warning,) = report['warnings']
    assert str(lib) in warning, warning
    assert 'truncated' in warning.replace(str(lib), '') and 'rebuilt' in warning.replace(str(lib), ''), warning
    report, stderr = _run_child(tmp_path, cache)
    assert report['kernels'] and not report['warnings'] and stderr == '', (report, stderr)
    assert _library(cache) == lib and _leftovers(cache) == []


def test_library_without_the_kernels_is_rebuilt(tmp_path, cache):
    """A library under the expected name and with a matching size/hash record, but without the kernels'
    functions: a warning naming it and the missing functions (no AttributeError), and the kernels run
    from a rebuilt library that replaced it."""
    lib = _library(cache)
    (tmp_path / 'other.c').write_text('int spformer_something_else(void) { return 1; }\n')
    subprocess.run([_cc(), '-shared', '-fPIC', str(tmp_path / 'other.c'), '-o', str(lib)], check=True)
    data = lib.read_bytes()
    lib.with_name(lib.name + '.json').write_text(json.dumps(dict(size=len(data),
                                                                 sha256=hashlib.sha256(data).hexdigest())))
    report, _ = _run_child(tmp_path, cache)
    assert report['kernels'], report
    (warning,) = report['warnings']
    assert str(lib) in warning, warning
    assert 'lacks' in warning.replace(str(lib), '') and 'superpixel_fwd_f32' in warning, warning
    assert 'rebuilt' in warning.replace(str(lib), ''), warning
    rebuilt = lib.read_bytes()
    assert b'superpixel_fwd_f32' in rebuilt
    assert json.loads(lib.with_name(lib.name + '.json').read_text())['sha256'] == hashlib.sha256(rebuilt).hexdigest()


def _writable(folder):
    try:
        (folder / 'probe').touch()
    except OSError:
        return False
    (folder / 'probe').unlink()
    return True


@pytest.mark.parametrize('how', ['read-only directory', 'path under a file'])
def test_unwritable_cache_directory(tmp_path, how):
    """A cache directory that cannot be written (it exists, read-only) or created (its path runs through a
    regular file): the kernels are compiled into a temporary directory of the process (removed again) and
    run; the one warning names the cache directory and SPFORMER_CACHE_DIR and does not blame the compiler,
    and no line says the kernels are cached. (root writes into read-only directories: for root the
    directory is made immutable, where the file system allows it.)"""
    root, undo = tmp_path / 'cache', []
    if how == 'read-only directory':
        _folder(root).mkdir(parents=True)
        _folder(root).chmod(0o500)
        undo.append(['chmod', '700', str(_folder(root))])
        if _writable(_folder(root)):
            if shutil.which('chattr') is None or subprocess.run(['chattr', '+i', str(_folder(root))],
                                                                capture_output=True).returncode:
                pytest.skip('this user writes into read-only directories (root) and cannot make one immutable')
            undo.insert(0, ['chattr', '-i', str(_folder(root))])
    else:
        (tmp_path / 'a-file').write_text('')
        root = tmp_path / 'a-file' / 'cache'
    (tmp_path / 'tmp').mkdir()
    try:
        assert how != 'read-only directory' or not _writable(_folder(root))
        report, stderr = _run_child(tmp_path, root, TMPDIR=str(tmp_path / 'tmp'))
    finally:
        for command in undo:
            subprocess.run(command, check=True)
    assert report['kernels'], report
    (warning,) = report['warnings']
    assert str(_folder(root)) in warning, warning
    text = warning.replace(str(_folder(root)), '')
    assert 'not writable' in text and 'SPFORMER_CACHE_DIR' in text, warning
    assert 'compiler' not in text and 'unavailable' not in text, warning
    assert 'cached in' not in stderr, stderr
    assert not [p.name for p in (tmp_path / 'tmp').iterdir() if 'spformer' in p.name]


def test_compiler_command_with_arguments(tmp_path, wrapper):
    """$CC is a command with arguments, split as a shell splits it (CC='ccache gcc', 'gcc -m64'): here a
    wrapper in a quoted path with a space, then the compiler and a flag. The kernels compile through it."""
    cache = tmp_path / 'cache'
    report, stderr = _run_child(tmp_path, cache, CC=f"'{wrapper}' {_cc()} -O2")
    assert report['kernels'] and not report['warnings'], report
    calls = wrapper.with_name(wrapper.name + '.log').read_text().splitlines()
    assert any(call.endswith('-O2 --version') for call in calls) and any('cpu_kernels.c' in call for call in calls)
    assert _NOTICE in stderr and len(list(_folder(cache).glob('*.so'))) == 1 and _leftovers(cache) == []


def test_killed_compilation_leaves_nothing_behind(tmp_path, wrapper):
    """A process killed (with its compiler) while it compiles leaves its temporary file in the cache; the
    next process removes it, compiles and runs the kernels, and leaves only the library and its record."""
    cache = tmp_path / 'cache'
    cc = f"'{wrapper}' {_cc()}"
    proc = subprocess.Popen([sys.executable, '-c', _CHILD], cwd=tmp_path, env=_child_env(cache, CC=cc, SLOW_CC='60'),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not wrapper.with_name(wrapper.name + '.compiling').exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert _leftovers(cache), 'the killed process left no temporary file: the test does not test anything'
    report, stderr = _run_child(tmp_path, cache, CC=cc)
    assert report['kernels'] and not report['warnings'] and _NOTICE in stderr, (report, stderr)
    assert _leftovers(cache) == [] and len(list(_folder(cache).glob('*.so'))) == 1


def test_concurrent_processes_compile_once(tmp_path, wrapper):
    """Two processes that start together on an empty cache: one compiles, the other waits for it and loads
    that library (no warning, no second compilation, no temporary file left)."""
    cache = tmp_path / 'cache'
    env = _child_env(cache, CC=f"'{wrapper}' {_cc()}", SLOW_CC='1')
    procs = [subprocess.Popen([sys.executable, '-c', _CHILD], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    reports = [_check(subprocess.CompletedProcess(p.args, p.returncode, *out)) for p, out in zip(procs, outs)]
    assert all(r['kernels'] and not r['warnings'] for r in reports), reports
    assert sum(_NOTICE in err for _, err in outs) == 1, [err for _, err in outs]
    assert len(list(_folder(cache).glob('*.so'))) == 1 and _leftovers(cache) == []
