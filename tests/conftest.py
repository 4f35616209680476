import os

# Both must be set before any module that defines a @triton.jit kernel, or huggingface_hub,
# is imported: the Triton interpreter runs kernels on CPU tensors (CI has no GPU), and the
# Hub client must never reach the network from a test.
os.environ.setdefault('TRITON_INTERPRET', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')

import torch  # noqa: E402

# Two cores: keep intra-op threads at the core count and results reproducible.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


def script_env(**overrides) -> dict:
    """The environment of a training script run in a fresh process by a test: this one, with one intra-op thread,
    the Hub offline, unbuffered output, and none of the scripts' test hooks (SPFORMER_TRAIN_TEST_*) unless
    ``overrides`` set them (values as strings)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    env.pop('SPFORMER_TRAIN_TEST_KILL_AT', None)
    env.pop('SPFORMER_TRAIN_TEST_DUMP', None)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


TRITON_NO_DEVICE = 'TRITON_INTERPRET is not 1 and there is no CUDA device to run the Triton kernels on'


def triton_test_device():
    """Where tests run the Triton kernels: CPU tensors through the interpreter (the default, and CI),
    or CUDA tensors when TRITON_INTERPRET=0 on a machine with a GPU (``.ci/gpu``), where the same
    checks run the compiled kernels; None if neither (skip with TRITON_NO_DEVICE). The Triton test
    modules call it at import (``from conftest import ...``), other tests take :func:`triton_device`."""
    if os.environ.get('TRITON_INTERPRET') == '1':
        return torch.device('cpu')
    return torch.device('cuda') if torch.cuda.is_available() else None


@pytest.fixture
def triton_device():
    """:func:`triton_test_device` as a fixture. TF32 is switched off for the test so that the torch
    backend it is compared with computes in true fp32 on the GPU too."""
    device = triton_test_device()
    if device is None:
        pytest.skip(TRITON_NO_DEVICE)
    if device.type == 'cpu':
        yield device
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device('cuda')
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def compile_for_sm90():
    """Runs a kernel-compiling script (it prints 'compiled' when every job compiled) for sm_90 in
    two processes, jobs split by ``argv = part parts``, without the interpreter: front end, LLVM and
    ptxas, no GPU needed. Skips if this triton has no bundled ptxas."""
    def run(script: str, timeout: float):
        import triton
        ptxas = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
        if not os.path.exists(ptxas):
            pytest.skip('this triton has no bundled ptxas: cannot compile for the GPU here')
        env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        procs = [subprocess.Popen([sys.executable, '-c', script, str(part), '2'], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=root) for part in range(2)]
        try:
            for proc in procs:
                out, err = proc.communicate(timeout=timeout)
                assert proc.returncode == 0 and 'compiled' in out, err[-4000:]
        finally:
            for proc in procs:
                proc.kill()
    return run


@pytest.fixture(scope='module')
def script():
    """train_imagenet.py imported as a module (its parser, helpers and main), for in-process checks."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'train_imagenet.py')
    spec = importlib.util.spec_from_file_location('train_imagenet', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# timm's vendored model tests (tests/timm_suite) run in their own pytest process
# (tests/test_timm_suite.py): collecting them here would parametrize over every timm model and clash
# with tests/test_models.py's module name. Naming the file on the command line still runs it.
collect_ignore = ['timm_suite']
