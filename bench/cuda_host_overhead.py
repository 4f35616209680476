"""SPFormer-S inference on CUDA (bf16 autocast, Triton backend) next to DeiT-S: the time per forward
at batch 1 (the GPU idles: what the host takes to launch a forward) and at batch 128, kernel
launches per forward, and SPFormer-S's GPU time per aten op and input shapes.

    python bench/cuda_host_overhead.py

Needs a GPU; results in docs/performance.md ("Host overhead")."""
import time
import torch, timm
import spformer  # noqa
from torch.profiler import profile, ProfilerActivity
batch = 128
for name, kw in (('deit_small_patch16_224', {}), ('spformer_small_sp16_224', dict(attn_backend='triton'))):
    model = timm.create_model(name, **kw).cuda().eval()
    for b in (1, batch):
        x = torch.randn(b, 3, 224, 224, device='cuda')
        with torch.inference_mode(), torch.autocast('cuda', torch.bfloat16):
            for _ in range(3): model(x)
            torch.cuda.synchronize()
            t = []
            for _ in range(20):
                s = time.perf_counter(); model(x); torch.cuda.synchronize(); t.append(time.perf_counter() - s)
        print(f'{name} batch {b}: {sorted(t)[10]*1e3:.2f} ms per forward (wall, synchronized)', flush=True)
    with torch.inference_mode(), torch.autocast('cuda', torch.bfloat16):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            model(x); torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == 'CUDA']
    print(f'{name}: {len(kernels)} GPU kernels/memsets per forward; {sum(1 for e in prof.events() if e.device_type.name == "CPU")} CPU events')
    if 'spformer' in name:
        rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_device_time_total)
        for e in rows[:45]:
            if e.self_device_time_total > 0:
                print(f'{e.self_device_time_total/1e3:7.3f} ms {e.count:4d}  {e.key[:45]:45s} {str(e.input_shapes)[:120]}')
        rows = sorted(prof.key_averages(), key=lambda e: -e.count)
        print('most frequent ops:', [(e.key, e.count) for e in rows[:25]])
