"""One run of each MSA stage at one shape, for Nsight Compute (benchmarks/profile.sh).

  python benchmarks/ncu_driver.py --prefill 32768        # select, invert, block attention, combine
  python benchmarks/ncu_driver.py --decode 32 131072     # decode layer: B sequences, one new token each
  python benchmarks/ncu_driver.py --prefill 65536 --index-dtype fp8 --select-only   # the FP8 indexer alone
  python benchmarks/ncu_driver.py --decode 32 131072 --paged-fp8   # decode over paged e4m3 caches
  python benchmarks/ncu_driver.py --decode 32 131072 --plan-fp8    # PagedDecodePlan, FP8 indexer
  python benchmarks/ncu_driver.py --backward 16384      # a training step: msa_attention forward, .backward
                                                        # (past 16K at the model shape the call runs in pieces
                                                        # under the default workspace budget: 2 at 32K)

Each stage runs once to compile and warm up, then once more for the profiler
(profile.sh skips the first launches of each kernel)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msa_py import engine as E  # noqa: E402
from msa_py.bench import MSARunner, layer_stage_kinds, make_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", type=int, default=0, help="T tokens, one sequence")
    ap.add_argument("--decode", type=int, nargs=2, default=None, metavar=("B", "TK"))
    ap.add_argument("--index-dtype", choices=("auto", "fp8"), default="auto", help="prefill: the FP8 indexer")
    ap.add_argument("--select-only", action="store_true", help="prefill: the indexer alone")
    ap.add_argument("--paged-fp8", action="store_true", help="decode: the paged layer over e4m3 caches")
    ap.add_argument("--plan-fp8", action="store_true",
                    help="decode: PagedDecodePlan.run() over e4m3 caches with the FP8 indexer (an engine's step)")
    ap.add_argument("--backward", type=int, default=0, metavar="T",
                    help="torch forward + backward of one T-token sequence; only the second step is profiled "
                         "(profile.sh with PROFILE_FROM_START=off)")
    a = ap.parse_args()
    import torch

    spec = E.Spec(idx_dtype="float8_e4m3fn" if a.index_dtype == "fp8" else "")
    if a.prefill:
        T = a.prefill
        run = MSARunner(spec, "gpu")
        kinds = layer_stage_kinds(spec, "gpu")  # the stages the layer runs (forced pass or combine)
        b = run.buffers(torch, *make_inputs(torch, spec, T, T, "cuda", "uniform", 0), T, T)
        for _ in range(2):
            b["block_ids"] = run.run(kinds["select"], b)[0]
            if a.select_only:
                torch.cuda.synchronize()
                continue
            inv = run.run(kinds["invert"], b)
            b.update(row_offsets=inv[0], entries=inv[2], work=inv[3], num_work=inv[4])
            b["o_partial"], b["lse_partial"] = run.run(kinds["block_attention"], b)
            run.run(kinds["combine"], b)
            torch.cuda.synchronize()
    if a.backward:
        import msa_py

        q, k, v, qi, ki = make_inputs(torch, spec, a.backward, a.backward, "cuda", "uniform", 0)
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        dout = torch.randn_like(q)
        for step in range(2):
            if step == 1:
                torch.cuda.profiler.start()
            out, _ = msa_py.msa_attention(*leaves, qi, ki)
            out.backward(dout)
            torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    if a.decode:
        from msa_py.torch_ops import _buf

        B, Tk = a.decode
        run = MSARunner(replace(spec, decode=True), "gpu")
        b = run.buffers(torch, *make_inputs(torch, spec, B, B * Tk, "cuda", "uniform", 0), B, B * Tk)
        b["cu_q"] = _buf(torch.arange(0, B + 1, dtype=torch.int32, device="cuda"))
        b["cu_k"] = _buf(torch.arange(0, B + 1, dtype=torch.int32, device="cuda") * Tk)
        kind = "msa"
        if a.plan_fp8:
            from msa_py.bench import _paged_buffers, decode_plan

            q, qi, k, v, ki = (torch.from_dlpack(b[n]) for n in ("q", "q_idx", "k", "v", "k_idx"))
            pb = _paged_buffers(torch, run, b, k, v, ki, B, Tk, seed=0, fp8=True)
            plan = decode_plan(torch, spec, pb, q, qi, B, 1, fp8=True)
            for _ in range(2):
                plan.run()
                torch.cuda.synchronize()
            return
        if a.paged_fp8:
            from msa_py.bench import _paged_buffers

            run = MSARunner(replace(spec, decode=True, kv_cache_dtype="float8_e4m3fn", idx_cache_dtype="float8_e4m3fn"),
                            "gpu")
            k, v, ki = (torch.from_dlpack(b[n]) for n in ("k", "v", "k_idx"))
            b = _paged_buffers(torch, run, b, k, v, ki, B, Tk, seed=0, fp8=True)
            kind = "paged_msa"
        for _ in range(2):
            run.run(kind, b)
            torch.cuda.synchronize()


if __name__ == "__main__":
    main()
