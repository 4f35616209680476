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
