"""SPFormer-S (Triton backend) vs DeiT-S on CUDA, bf16 autocast, batch 128 inference: eager against
torch.compile (default, and mode='reduce-overhead' = CUDA graphs). Prints img/s per variant.

    python bench/cuda_compile.py [eager,default,reduce-overhead]

Eager SPFormer-S inference is bound by the host launching its many small kernels (see
bench/cuda_host_overhead.py); CUDA graphs remove most of that. Needs a GPU; results in
docs/performance.md ("CUDA graphs and torch.compile")."""
import sys, time
import torch, timm
import spformer  # noqa
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
modes = sys.argv[1].split(',') if len(sys.argv) > 1 else ['eager', 'default', 'reduce-overhead']
batch = 128
x = torch.randn(batch, 3, 224, 224, device='cuda')
res = {}
for name, kw in (('deit_small_patch16_224', {}), ('spformer_small_sp16_224', dict(attn_backend='triton'))):
    model = timm.create_model(name, **kw).cuda().eval()
    for mode in modes:
        torch._dynamo.reset()
        m = model if mode == 'eager' else torch.compile(model, mode=None if mode == 'default' else mode)
        t0 = time.time()
        with torch.inference_mode(), torch.autocast('cuda', torch.bfloat16):
            for _ in range(3):
                m(x)
            torch.cuda.synchronize()
            t_compile = time.time() - t0
            times = []
            for _ in range(5):
                s = time.perf_counter()
                for _ in range(10):
                    m(x)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - s) / 10)
        best = sorted(times)[len(times) // 2]
        res[name, mode] = batch / best
        print(f'{name:28s} {mode:16s} {batch / best:8.0f} img/s  (warm-up/compile {t_compile:.0f} s)', flush=True)
for mode in modes:
    if ('spformer_small_sp16_224', mode) in res:
        print(f'ratio {mode}: {res["spformer_small_sp16_224", mode] / res["deit_small_patch16_224", mode]:.3f}')
