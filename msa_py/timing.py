"""Device timing: median of device-event timings after warm-up."""

from __future__ import annotations

import time

import numpy as np


def time_max(fn, device: str, *, warmup: int = 3, iters: int = 10) -> dict:
    """Times fn() (which enqueues MAX work) on the GPU with device events on the
    default queue, cross-checked with a host clock around a synchronize.
    On the CPU, host time only. Returns ms: median, min, host_median."""
    if device == "cpu":
        for _ in range(max(1, warmup // 2)):
            fn()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return dict(median=float(np.median(ts)), min=float(np.min(ts)), host_median=float(np.median(ts)))
    from max.driver import Accelerator, DeviceEvent

    acc = Accelerator(0)
    q = acc.default_queue
    for _ in range(warmup):
        fn()
    acc.synchronize()
    ev, host = [], []
    for _ in range(iters):
        start, end = DeviceEvent(acc, enable_timing=True), DeviceEvent(acc, enable_timing=True)
        t0 = time.perf_counter()
        q.record_event(start)
        fn()
        q.record_event(end)
        end.synchronize()
        acc.synchronize()
        host.append((time.perf_counter() - t0) * 1e3)
        ev.append(start.elapsed_time(end))
    return dict(median=float(np.median(ev)), min=float(np.min(ev)), host_median=float(np.median(host)))


def time_torch(fn, *, warmup: int = 3, iters: int = 10) -> dict:
    """Median of CUDA-event timings of fn() on torch's current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return dict(median=float(np.median(ts)), min=float(np.min(ts)), host_median=float("nan"))
