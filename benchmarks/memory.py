"""Peak device memory of the MSA layer against dense SDPA, on the GPU:

    python benchmarks/memory.py [--tokens 32768,131072] [--chunk 16384]

MSA runs through the torch op (torch allocates out/lse, MAX its
intermediates in its own pool), so its peak is read device-wide: free
memory before the first call minus free memory after it (MAX keeps the
pool it grew), each measurement in a fresh process. Dense SDPA's peak is torch's max_memory_allocated over the
call. Inputs are excluded from both. The largest MSA buffers are listed from
their shapes: they grow with T x topk (partials), never with T x blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msa_py import _validate as V  # noqa: E402


def _gib(n: float) -> float:
    return n / 2**30


def buffers(T: int, spec) -> dict:
    """Bytes of the intermediates the layer allocates (one sequence of T tokens)."""
    R = T // spec.block_size + 1
    nent = T * spec.topk
    e = 2 if spec.dtype in ("bfloat16", "float16") else 4
    H, K = spec.num_kv_heads, spec.topk
    nw = V.work_windows(T, spec.q_budget)
    return {
        "o_partial": T * spec.num_heads * K * spec.head_dim * e,
        "lse_partial": T * spec.num_heads * K * 4,
        "block_ids": H * T * K * 4,
        "inversion (entries, row_ptr, work, scratch)": 4 * (2 * H * nent + H * ((2 * nw + 2) * R + 1)
                                                            + 4 * V.work_capacity(H, T, K, R, spec.q_budget)),
        "out + lse": T * spec.num_heads * (spec.head_dim * e + 4),
    }


def _inputs(torch, spec, T):
    from msa_py import bench as Bn

    return Bn.make_inputs(torch, spec, T, T, "cuda", "uniform", seed=1)


def measure_msa(T: int, chunk: int) -> dict:
    """In this (fresh) process: device memory taken by one MSA call (chunk 0)
    or by a prefill in chunks of `chunk` queries over the growing prefix."""
    import torch

    import msa_py
    from msa_py import engine as E
    from max.driver import Accelerator

    spec = E.Spec()
    q, k, v, qi, ki = _inputs(torch, spec, T)
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    stats0 = Accelerator(0).stats
    with torch.no_grad():
        for c0 in range(0, T, chunk or T):
            c1 = min(T, c0 + (chunk or T))
            o, l = msa_py.msa_attention(q[c0:c1], k[:c1], v[:c1], qi[c0:c1], ki[:c1], topk=spec.topk)
            del o, l
    torch.cuda.synchronize()
    return dict(peak=free0 - torch.cuda.mem_get_info()[0], stats_before=stats0, stats_after=Accelerator(0).stats)


def measure_sdpa(T: int) -> float:
    import torch

    from msa_py import bench as Bn
    from msa_py import engine as E

    q, k, v, _, _ = _inputs(torch, E.Spec(), T)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        Bn.dense_sdpa(torch, q, k, v, T)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> int:
    import subprocess

    from msa_py import engine as E

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32768,131072")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=2, type=int, metavar=("T", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure_msa(*args.one)))
        return 0
    spec = E.Spec()
    rows = []
    for T in (int(x) for x in args.tokens.split(",")):
        got = {}
        for name, chunk in (("msa", 0), ("chunked", args.chunk)):
            p = subprocess.run([sys.executable, __file__, "--one", str(T), str(chunk)], capture_output=True,
                               text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            got[name] = json.loads(line[-1][7:]) if line else {"error": (p.stdout + p.stderr)[-1500:]}
        sdpa = measure_sdpa(T)
        e = 2 if spec.dtype != "float32" else 4
        inputs = T * (spec.num_heads * spec.head_dim + 2 * spec.num_kv_heads * spec.head_dim
                      + spec.num_kv_heads * spec.idx_dim + spec.idx_dim) * e
        row = dict(T=T, chunk=args.chunk, inputs_gib=_gib(inputs), sdpa_peak_gib=_gib(sdpa),
                   buffers_gib={n: _gib(b) for n, b in buffers(T, spec).items()})
        for name in ("msa", "chunked"):
            if "error" in got[name]:
                row[f"{name}_error"] = got[name]["error"]
            else:
                row[f"{name}_peak_gib"] = _gib(got[name]["peak"])
                row[f"{name}_max_stats"] = [got[name]["stats_before"], got[name]["stats_after"]]
        rows.append(row)
        print(f"T={T}: inputs {row['inputs_gib']:.2f} GiB | MSA peak {row.get('msa_peak_gib', float('nan')):.2f} GiB, "
              f"chunked by {args.chunk}: {row.get('chunked_peak_gib', float('nan')):.2f} GiB | dense SDPA peak "
              f"{row['sdpa_peak_gib']:.2f} GiB")
        for n, b in row["buffers_gib"].items():
            print(f"    {n:45s} {b:8.2f} GiB")
        for name in ("msa", "chunked"):
            print(f"    {name}: {row.get(name + '_max_stats') or row.get(name + '_error')}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
