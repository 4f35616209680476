"""Benchmark: the local attention op's backends, and SPFormer-S against DeiT-S.

Everything is compared side by side in one run (ratios, since shared machines are noisy): the
backends of one op case, and the two models, run in turns within one process, and each ratio is
the median of the per-round ratios. On a virtual machine whose host takes cores away (steal time)
even that drifts, so the models are also compared on one thread in CPU time (``process_time``).
Peak memory is the peak of live tensor bytes during one step (parameters, gradients, optimizer
state, activations and temporaries), from torch's MemTracker: exact and independent of the allocator, unlike the process RSS.

    python bench/bench_spformer.py                 # everything (~5 min on 2 cores)
    python bench/bench_spformer.py --only op       # just the op (CPU backends)
    python bench/bench_spformer.py --only models   # just SPFormer-S vs DeiT-S (CPU)
    python bench/bench_spformer.py --only cuda     # Triton kernels' achieved bandwidth (needs a GPU)
    python bench/bench_spformer.py --repeats 9 --doc   # also rewrite the CPU tables of docs/performance.md

On a machine with CUDA, the default run adds the GPU section: forward and forward+backward time of
the fused Triton kernels (and the torch backend) at SPFormer-S shapes (batch 128) and the bandwidth
they achieve, counting the bytes they must move at least (inputs, outputs, saved probabilities,
gradients), against a large device copy's; then SPFormer-S with either backend against DeiT-S under
bf16 autocast (inference and train-step img/s, train peak memory). `bash .ci/gpu` runs it after
the GPU tests.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from model_table import machine_info, write_between_markers  # bench/ is on sys.path when run as a script


def _peak_tensor_mb(step, *tracked) -> float:
    """Peak live tensor memory (MB) of one call of ``step`` (after a warm-up call)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(*tracked)
    with tracker:
        step()
        tracker.reset_mod_stats()
        step()
    return tracker.get_tracker_snapshot('peak')[torch.device('cpu')]['Total'] / 2 ** 20


def interleaved_times(steps: dict, repeats: int, warmup: int = 2, clock=time.perf_counter) -> dict:
    """Times the steps in turn (A, B, A, B, ...) so that load from other jobs, and the machine's own
    drift, hit them alike. Returns each step's median seconds and, for every step, the median over
    rounds of (first step's time / this step's time) within the same round: the ratio to report,
    steadier than a ratio of medians on a noisy machine."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    first = next(iter(times.values()))
    return {name: dict(seconds=statistics.median(t), ratio=statistics.median(a / b for a, b in zip(first, t)))
            for name, t in times.items()}


# --- measurements (each run inside its own subprocess) ---------------------------------------

# SPFormer-S at 224 px: 56x56 pixels, 14x14 superpixels, 2 association heads. "per head": the
# direct formulation (head dim 32, superpixel values 384 / 2 = 192 wide); "shared": the
# projection-free one the model runs (one 64-channel pixel tensor for both heads, k = v).
OP_CASES = {
    'superpixel, per head': ('superpixel', dict(q=(2, 'sp', 32), k=(2, 'px', 32), v=(2, 'px', 192))),
    'superpixel, shared (model)': ('superpixel', dict(q=(2, 'sp', 64), k=(1, 'px', 64), v='k')),
    'pixel, per head': ('pixel', dict(q=(2, 'px', 32), k=(2, 'sp', 32), v=(2, 'sp', 32))),
    'pixel, shared + bias (model)': ('pixel', dict(q=(1, 'px', 64), k=(2, 'sp', 64), v=(2, 'sp', 32), bias=True)),
}


def measure_op(case: str, batch: int, repeats: int) -> dict:
    """Reference and torch backends on one case: interleaved times, and each one's peak memory."""
    from spformer.kernels import pixel_attention, superpixel_attention
    torch.manual_seed(0)
    B, h, w, cell = batch, 14, 14, 4
    direction, spec = OP_CASES[case]
    grid = {'sp': (h, w), 'px': (h * cell, w * cell)}
    tensors = {}
    for name in ('q', 'k', 'v'):
        if spec[name] == 'k':
            continue
        heads, where, ch = spec[name]
        tensors[name] = torch.randn(B, heads, *grid[where], ch, requires_grad=True)
    args = [tensors['q'], tensors['k'], tensors.get('v', tensors['k'])]
    kwargs = {}
    if spec.get('bias'):
        tensors['bias'] = kwargs['bias'] = torch.randn(B, 2, h, w, requires_grad=True)
    op = superpixel_attention if direction == 'superpixel' else pixel_attention
    leaves = list(tensors.values())

    def step_for(backend):
        def step():
            out = op(*args, cell, backend=backend, **kwargs)
            out.backward(torch.ones_like(out))
            for t in leaves:
                t.grad = None
        return step

    from spformer.kernels import cpu_backend
    backends = ('reference', 'torch') + (('cpu',) if cpu_backend.available() else ())
    steps = {backend: step_for(backend) for backend in backends}
    results = interleaved_times(steps, repeats)
    # Beyond its inputs the op holds their gradients (the same for every backend) and its
    # working memory (saved tensors and temporaries): report both.
    inputs_mb = sum(t.numel() * t.element_size() for t in leaves) / 2 ** 20
    for backend, step in steps.items():
        above_inputs = _peak_tensor_mb(step, *leaves) - inputs_mb
        results[backend].update(peak_mb=above_inputs, working_mb=above_inputs - inputs_mb)
    return results


def _model_step(name: str, mode: str, batch: int, device: str = 'cpu', amp_dtype=None, **model_kwargs):
    """One inference batch or one train step (forward, backward, AdamW) of a timm model;
    ``amp_dtype``: under autocast to that dtype, as timm's and Accelerate's mixed precision run it."""
    import contextlib
    import timm
    import spformer  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(name, **model_kwargs).to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)

    def autocast():
        return torch.autocast(device, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(x)
        return step, (model, x)
    model.train()
    target = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, (model, opt, x)


def measure_model_memory(name: str, mode: str, batch: int) -> dict:
    step, tracked = _model_step(name, mode, batch)
    return dict(peak_mb=_peak_tensor_mb(step, *tracked))


def measure_models_time(names, mode: str, batch: int, repeats: int) -> dict:
    """Interleaved timing of the models' steps in one process (:func:`interleaved_times`)."""
    return interleaved_times({name: _model_step(name, mode, batch)[0] for name in names}, repeats)


def measure_models_cpu_time(names, mode: str, batch: int, repeats: int) -> dict:
    """Like :func:`measure_models_time` on one thread, counting the CPU time the process got
    (``time.process_time``): on a virtual machine whose host takes cores away (steal time),
    wall-clock ratios drift with the host's load; CPU time on one thread does not."""
    torch.set_num_threads(1)
    return interleaved_times({name: _model_step(name, mode, batch)[0] for name in names}, repeats,
                             clock=time.process_time)


def _cuda_times(fn, repeats: int, warmup: int = 3) -> list:
    """Seconds per call of ``fn`` on the current CUDA stream, from CUDA events, after a warm-up."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def cuda_bandwidth(batch: int = 128, repeats: int = 20):
    """Fused Triton kernels on CUDA at SPFormer-S shapes: time and achieved bandwidth."""
    from spformer.kernels import pixel_attention, superpixel_attention
    dev = torch.device('cuda')
    props = torch.cuda.get_device_properties(dev)
    clock_khz, bus_bits = getattr(props, 'memory_clock_rate', 0), getattr(props, 'memory_bus_width', 0)
    spec_peak = 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else float('nan')  # DDR: 2 per clock
    # The ceiling a kernel can reach in practice: a large device-to-device copy (bytes read + written).
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_s = statistics.median(_cuda_times(lambda: dst.copy_(src), repeats))
    peak = 2 * src.numel() / copy_s
    src = dst = None  # free the 2 GiB
    print(f'\n## Triton kernels on {props.name} (batch {batch}; memory bandwidth: {peak / 1e9:.0f} GB/s '
          f'measured by a 1 GiB device copy, {spec_peak / 1e9:.0f} GB/s from the memory clock and bus width)\n')
    print('| case | dtype | backend | fwd (ms) | fwd GB/s | fwd+bwd (ms) | fwd+bwd GB/s | fwd+bwd % of copy bandwidth |')
    print('|---|---|---|---|---|---|---|---|')
    B, h, w, cell, M = batch, 14, 14, 4, 2

    def timed(fn):
        return statistics.median(_cuda_times(fn, repeats))

    for dtype in (torch.bfloat16, torch.float32):
        esize = torch.tensor([], dtype=dtype).element_size()
        cases = {
            'superpixel, shared (model)': (
                superpixel_attention,
                [torch.randn(B, M, h, w, 64), torch.randn(B, 1, h * cell, w * cell, 64)], dict(), 64, (h, w)),
            'pixel, shared + bias (model)': (
                pixel_attention,
                [torch.randn(B, 1, h * cell, w * cell, 64), torch.randn(B, M, h, w, 64), torch.randn(B, M, h, w, 32)],
                dict(bias=torch.randn(B, M, h, w)), 32, (h * cell, w * cell)),
        }
        for case, (op, tensors, kw, dv, out_grid) in cases.items():
            tensors = [t.to(dev, dtype).requires_grad_() for t in tensors]
            kw = {k: v.to(dev, dtype).requires_grad_() for k, v in kw.items()}
            args = tensors + ([tensors[1]] if op is superpixel_attention else [])  # k = v shared
            leaves = tensors + list(kw.values())
            in_bytes = sum(t.numel() for t in leaves) * esize
            out_bytes = B * M * out_grid[0] * out_grid[1] * dv * esize
            probs_bytes = B * h * w * cell * cell * 9 * M * 4
            fwd_bytes = in_bytes + out_bytes + probs_bytes
            # backward reads inputs, grad_out, probs (and out) and writes every input's gradient
            bwd_bytes = 2 * in_bytes + 2 * out_bytes + probs_bytes
            for backend in ('triton', 'torch'):
                def fwd():
                    with torch.no_grad():
                        op(*args, cell, backend=backend, **kw)

                def fwd_bwd():
                    out = op(*args, cell, backend=backend, **kw)
                    out.backward(torch.ones_like(out))
                    for t in leaves:
                        t.grad = None
                t_f, t_fb = timed(fwd), timed(fwd_bwd)
                bw = (fwd_bytes + bwd_bytes) / t_fb
                print(f'| {case} | {str(dtype).split(".")[-1]} | {backend} | {t_f * 1e3:.3f} | {fwd_bytes / t_f / 1e9:.0f} | '
                      f'{t_fb * 1e3:.3f} | {bw / 1e9:.0f} | {100 * bw / peak:.0f}% |')


def _cuda_clock() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def cuda_models(batch: int = 128, repeats: int = 10):
    """SPFormer-S with the Triton kernels and with the torch backend against DeiT-S on CUDA, under
    bf16 autocast: inference img/s, train-step img/s and the train step's peak allocated memory."""
    runs = {'deit_small_patch16_224': ('deit_small_patch16_224', {}),
            'spformer_small_sp16_224 (triton)': ('spformer_small_sp16_224', dict(attn_backend='triton')),
            'spformer_small_sp16_224 (torch)': ('spformer_small_sp16_224', dict(attn_backend='torch'))}
    print(f'\n## SPFormer-S vs DeiT-S on {torch.cuda.get_device_name()} (batch {batch}, bf16 autocast, '
          f'224 px; interleaved rounds, medians)\n')
    print('| model | inference img/s | vs DeiT-S | train img/s | vs DeiT-S | train peak memory (GB) | vs DeiT-S |')
    print('|---|---|---|---|---|---|---|')
    results = {}
    for mode in ('infer', 'train'):
        steps, memory = {}, {}
        for label, (name, kwargs) in runs.items():
            # what this model holds: its parameters, input, gradients, optimizer state, activations
            # (the models measured before it stay allocated, hence the baseline)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step, _ = _model_step(name, mode, batch, 'cuda', torch.bfloat16, **kwargs)
            step()
            step()
            torch.cuda.synchronize()
            memory[label] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            steps[label] = step
        results[mode] = interleaved_times(steps, repeats, clock=_cuda_clock)
        results[mode + '_memory'] = memory
        del steps
        torch.cuda.empty_cache()
    deit = next(iter(runs))
    for label in runs:
        infer, train, mem = results['infer'][label], results['train'][label], results['train_memory']
        print(f"| {label} | {batch / infer['seconds']:.0f} | {infer['ratio']:.2f}x | {batch / train['seconds']:.0f} | "
              f"{train['ratio']:.2f}x | {mem[label]:.2f} | {mem[label] / mem[deit]:.2f}x |")


def _run_child(kind: str, *args, env: dict = None) -> dict:
    cmd = [sys.executable, __file__, '--child', json.dumps([kind, *args])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


# glibc returns freed heap memory to the OS once more than its trim threshold sits free at the top
# of the heap, and the next allocations fault the pages back in. Both models are also measured with
# that off (read at process start, hence a child process), the setting docs/performance.md ("The allocator") describes.
NO_TRIM_ENV = {'MALLOC_TRIM_THRESHOLD_': '1000000000', 'MALLOC_MMAP_THRESHOLD_': '1000000000'}


README_START, README_END = '<!-- bench:start -->', '<!-- bench:end -->'
DOC_PAGE = 'docs/performance.md'  # where the CPU tables live, relative to the repository root (--doc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', choices=['op', 'models', 'cuda'], default=None)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--doc', '--readme', nargs='?', default=None, metavar='PATH',
                        const=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DOC_PAGE),
                        help=f'also write the CPU tables between {README_START} and {README_END} of PATH '
                             f'(default: {DOC_PAGE}, where they live)')
    parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        kind, *rest = json.loads(args.child)
        measure = dict(op=measure_op, model=measure_model_memory, time=measure_models_time,
                       cpu_time=measure_models_cpu_time)[kind]
        result = measure(*rest)
        print(json.dumps(result))
        return

    lines = []

    def emit(text: str = ''):
        print(text)
        lines.append(text)

    emit(f'Machine: {machine_info(torch.get_num_threads())}; batch {args.batch_size}; '
         f'`python bench/bench_spformer.py {" ".join(argv if argv is not None else sys.argv[1:])}`'.rstrip())
    if args.only in (None, 'op'):
        emit()
        emit('**Local attention op**, SPFormer-S layer shapes (14×14 superpixels, 56×56 pixels, 2 heads), '
             'forward + backward:')
        emit()
        emit('| case | backend | fwd+bwd time (ms) | speed-up vs reference | peak above inputs (MB) '
             '| vs reference | of which working memory (MB) | vs reference |')
        emit('|---|---|---|---|---|---|---|---|')
        for case in OP_CASES:
            results = _run_child('op', case, args.batch_size, args.repeats)
            ref = results['reference']
            for backend, res in results.items():
                emit(f"| {case} | {backend} | {res['seconds'] * 1e3:.1f} | {res['ratio']:.2f}x | "
                     f"{res['peak_mb']:.0f} | {ref['peak_mb'] / res['peak_mb']:.1f}x less | "
                     f"{res['working_mb']:.1f} | {ref['working_mb'] / max(res['working_mb'], 0.1):.1f}x less |")
    if args.only in (None, 'models'):
        emit()
        emit('**SPFormer-S vs DeiT-S**, 224 px (train step = forward, backward, AdamW step):')
        emit()
        emit('| model | inference img/s | train step (s) | train img/s | train peak memory (MB) |')
        emit('|---|---|---|---|---|')
        names = ('deit_small_patch16_224', 'spformer_small_sp16_224')
        infer = measure_models_time(names, 'infer', args.batch_size, args.repeats)
        train = measure_models_time(names, 'train', args.batch_size, max(2, args.repeats - 2))
        memory = {name: _run_child('model', name, 'train', args.batch_size)['peak_mb'] for name in names}
        cpu_infer = _run_child('cpu_time', names, 'infer', args.batch_size, args.repeats)
        cpu_train = _run_child('cpu_time', names, 'train', args.batch_size, max(2, args.repeats - 4))
        for name in names:
            emit(f"| {name} | {args.batch_size / infer[name]['seconds']:.1f} | {train[name]['seconds']:.2f} | "
                 f"{args.batch_size / train[name]['seconds']:.1f} | {memory[name]:.0f} |")
        deit, spf = names
        emit()
        emit(f"SPFormer-S / DeiT-S (medians of the ratios within each interleaved round): inference throughput "
             f"{infer[spf]['ratio']:.2f}x, train-step throughput {train[spf]['ratio']:.2f}x, "
             f"train peak memory {memory[spf] / memory[deit]:.2f}x")
        emit()
        emit(f"On one thread, in CPU time (`time.process_time`, blind to time the host takes away from this "
             f"machine): inference {cpu_infer[deit]['seconds'] * 1e3:.0f} vs {cpu_infer[spf]['seconds'] * 1e3:.0f} ms "
             f"per batch, {cpu_infer[spf]['ratio']:.2f}x; train step {cpu_train[deit]['seconds']:.2f} vs "
             f"{cpu_train[spf]['seconds']:.2f} s, {cpu_train[spf]['ratio']:.2f}x")
        no_trim = {mode: _run_child('time', names, mode, args.batch_size, reps, env=NO_TRIM_ENV)
                   for mode, reps in (('infer', args.repeats), ('train', max(2, args.repeats - 2)))}
        cpu_no_trim = _run_child('cpu_time', names, 'infer', args.batch_size, args.repeats, env=NO_TRIM_ENV)
        env = ' '.join(f'{k}={v}' for k, v in NO_TRIM_ENV.items())
        emit()
        emit(f"With glibc's heap trimming off for both models (`{env}`): inference throughput "
             f"{no_trim['infer'][spf]['ratio']:.2f}x, train-step throughput {no_trim['train'][spf]['ratio']:.2f}x "
             f"(interleaved, two threads); inference {cpu_no_trim[spf]['ratio']:.2f}x on one thread in CPU time")
    if args.doc:
        write_between_markers(args.doc, '\n'.join(lines) + '\n', README_START, README_END)
        print(f'updated {args.doc}')
    if args.only == 'cuda' or (args.only is None and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit('--only cuda needs a CUDA device; torch.cuda.is_available() is False here')
        cuda_bandwidth()
        cuda_models()


if __name__ == '__main__':
    main()
