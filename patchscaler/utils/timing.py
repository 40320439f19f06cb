"""Wall-time and peak-memory measurement the way benchmark tables need it: warm-up runs excluded, the
median of repeats, CUDA synchronised before the clock is read, peak memory per measurement."""
import statistics
import time

import torch


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def measure(fn, device='cpu', repeats=3, warmup=1):
    """Run ``fn()`` ``warmup`` + ``repeats`` times; returns dict(median_s, min_s, times_s, peak_mem_mb, result).

    ``peak_mem_mb`` is the CUDA allocator's peak over the timed runs (None on CPU, where no per-call
    figure is reliable), ``result`` the last return value of ``fn``.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    _sync(device)
    cuda = torch.device(device).type == 'cuda'
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
    return {'median_s': statistics.median(times), 'min_s': min(times), 'times_s': times, 'peak_mem_mb': peak,
            'result': result}


def measure_interleaved(fns, device='cpu', repeats=3, warmup=1):
    """Time several ``fn()`` round-robin (A B C A B C …) so that drift of the machine (clock boost, caches,
    the allocator growing) spreads over all of them instead of favouring whichever runs last; returns one
    :func:`measure`-style dict per function."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    runs = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for i, fn in enumerate(fns):
            runs[i].append(measure(fn, device, repeats=1, warmup=0))
    out = []
    for rs in runs:
        times = [r['times_s'][0] for r in rs]
        peaks = [r['peak_mem_mb'] for r in rs if r['peak_mem_mb'] is not None]
        out.append({'median_s': statistics.median(times), 'min_s': min(times), 'times_s': times,
                    'peak_mem_mb': max(peaks) if peaks else None, 'result': rs[-1]['result']})
    return out
