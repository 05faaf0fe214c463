"""Compile time and steady-state call overhead of the torch ops.

    python benchmarks/torch_overhead.py [--device cuda]

First call of a configuration (compiles the MAX model), then per-call wall
time on a tiny input (where the kernels are negligible), eager and through a
CUDA graph replay, and a second sequence length (must not recompile).
"""
import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import msa_py  # noqa: E402
from msa_py import engine as E  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def inputs(T, seed=0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g).to(dev, torch.bfloat16)  # noqa: E731
        return r(T, 64, 128), r(T, 4, 128), r(T, 4, 128), r(T, 4, 128), r(T, 128)

    x = inputs(256)
    t0 = time.perf_counter()
    msa_py.msa_attention(*x, topk=16)
    sync()
    first = time.perf_counter() - t0
    n0 = len(E.compile_log)
    t0 = time.perf_counter()
    msa_py.msa_attention(*inputs(1000, 1), topk=16)
    sync()
    second_len = time.perf_counter() - t0
    assert len(E.compile_log) == n0, "a new length recompiled"
    ts = []
    for _ in range(200):
        t0 = time.perf_counter()
        msa_py.msa_attention(*x, topk=16)
        sync()
        ts.append((time.perf_counter() - t0) * 1e6)
    eager = statistics.median(ts)
    t0 = time.perf_counter()
    for _ in range(200):
        msa_py.msa_attention(*x, topk=16)
    sync()
    pipelined = (time.perf_counter() - t0) / 200 * 1e6
    line = (f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}): first call (compile) "
            f"{first:.1f} s; another length {second_len * 1e3:.1f} ms, no recompile; T=256 bf16 model shape: "
            f"eager call {eager:.0f} us (synchronized), {pipelined:.0f} us back to back")
    if dev == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            msa_py.msa_attention(*x, topk=16)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out, lse = msa_py.msa_attention(*x, topk=16)
        g.replay()
        sync()
        t0 = time.perf_counter()
        for _ in range(200):
            g.replay()
        sync()
        line += f", CUDA graph replay {(time.perf_counter() - t0) / 200 * 1e6:.0f} us"
    print(line)


if __name__ == "__main__":
    main()
