"""The `msa` command (also `python -m msa_py`): `msa demo` and `msa bench`."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import engine as E


def _has_gpu() -> bool:
    try:
        from max.driver import accelerator_count

        return accelerator_count() > 0
    except Exception:
        return False


def _device(arg: str) -> str:
    if arg == "auto":
        return "gpu" if _has_gpu() else "cpu"
    if arg == "gpu" and not _has_gpu():
        raise SystemExit("msa: --device gpu asked for, but MAX sees no accelerator")
    return arg


def _device_name(device: str) -> str:
    if device == "cpu":
        import platform

        return f"CPU ({platform.processor() or platform.machine()})"
    from max.driver import Accelerator

    return Accelerator(0).model_name


def _spec_args(ap: argparse.ArgumentParser, gpu_defaults: bool = True) -> None:
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument("--heads", type=int, help="query heads Hq (GPU default 64)")
    ap.add_argument("--kv-heads", type=int, help="KV heads Hkv (GPU default 4)")
    ap.add_argument("--head-dim", type=int, help="D (GPU default 128)")
    ap.add_argument("--idx-dim", type=int, help="index head dim Di (GPU default 128)")
    ap.add_argument("--topk", type=int, help="blocks per query (GPU default 16)")
    ap.add_argument("--block-size", type=int, help="keys per block (default 128)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--q-budget", type=int, default=64, help="queries per work item")
    ap.add_argument("--no-forced-pass", action="store_true",
                    help="the plain pipeline: forced blocks through the inversion, block attention and combine")


GPU_SPEC = dict(dtype="bfloat16", num_heads=64, num_kv_heads=4, head_dim=128, idx_dim=128, topk=16, block_size=128)
CPU_SPEC = dict(dtype="float32", num_heads=8, num_kv_heads=2, head_dim=64, idx_dim=64, topk=8, block_size=64)


def _spec(args, device: str) -> E.Spec:
    kw = dict(GPU_SPEC if device != "cpu" else CPU_SPEC)
    for a, k in (("heads", "num_heads"), ("kv_heads", "num_kv_heads"), ("head_dim", "head_dim"),
                 ("idx_dim", "idx_dim"), ("topk", "topk"), ("block_size", "block_size"), ("dtype", "dtype"),
                 ("q_budget", "q_budget")):
        if getattr(args, a, None) is not None:
            kw[k] = getattr(args, a)
    if getattr(args, "index_dtype", "auto") == "fp8":
        kw["idx_dtype"] = "float8_e4m3fn"
    from ._validate import Config

    Config(kw["topk"], kw["block_size"], q_budget=kw["q_budget"]).check()
    return E.Spec(**kw, forced_pass=not getattr(args, "no_forced_pass", False))


# --------------------------------------------------------------------------- demo
def demo(args, device: str, spec: E.Spec) -> int:
    import torch

    from . import bench as Bn
    from . import verify as Vf

    T = args.tokens or (32768 if device != "cpu" else 16384)
    S = T
    tdev = "cpu" if device == "cpu" else "cuda"
    print(f"MSA demo on {_device_name(device)}")
    print(f"  one sequence of {T} tokens, {spec.dtype}, Hq {spec.num_heads}, Hkv {spec.num_kv_heads}, "
          f"D {spec.head_dim}, Di {spec.idx_dim}, topk {spec.topk} blocks of {spec.block_size} keys, "
          f"1 sink + 2 local blocks")
    t0 = time.time()
    runner = Bn.MSARunner(spec, device)
    inputs = Bn.make_inputs(torch, spec, T, S, tdev, "uniform", seed=0)
    bufs = runner.buffers(torch, *inputs, T, S)
    print("  compiling the kernels (first run only; cached afterwards) ...", flush=True)
    kinds = Bn.layer_stage_kinds(spec, device)  # the stages as the layer runs them
    for stage in Bn.STAGES:
        E.model(kinds[stage], spec, device)
    print(f"  ready in {time.time() - t0:.1f} s")
    bid = Bn.prepare_layer(runner, [bufs], kinds)[0]
    Bn.store_partials(runner, [bufs])
    out, lse = runner.run(kinds["combine"], bufs)
    tm = Bn._timer(device)
    reps = 3 if device == "cpu" else 10
    stage_ms = {}
    for stage in Bn.STAGES:
        kind = kinds[stage]
        outs = runner.run(kind, bufs) if kind in E.DPS_KINDS else None
        stage_ms[stage] = tm(lambda kind=kind, outs=outs: runner.run(kind, bufs, outputs=outs), reps)
    total = sum(stage_ms.values())
    # check against the float64 reference on a slice of queries
    q, k, v, qi, ki = (x.float().cpu().numpy() for x in inputs)
    bid_np = E.to_numpy(bid)
    cu_q, cu_k = np.array([0, T], np.int32), np.array([0, S], np.int32)
    rows = np.unique(np.concatenate([[0, T - 1], np.random.default_rng(1).choice(T, 14, replace=False)]))
    sel = Vf.selection_report(bid_np, qi, ki, cu_q, cu_k, block_size=spec.block_size, init_blocks=1,
                              local_blocks=2, rows=rows)
    ro, rl = Vf.attention_rows_reference(q, k, v, bid_np, cu_q, cu_k, rows, block_size=spec.block_size)
    got = E.to_numpy(out)[rows]
    err = float(np.abs(got - ro).max())
    rel = Vf.rel_err(got, ro)
    ok = not sel["bad"] and rel < Vf.tolerance(spec.dtype)
    keys = Bn.attended_keys(torch, torch.from_dlpack(bid), T, S, spec.block_size) / T
    dense_keys = (S + 1) / 2
    forced = kinds["combine"] == "forced_combine"
    labels = (("select", "select (indexer, top-k)"), ("invert", "invert (block -> queries)"),
              ("block_attention", "block attention"), ("combine", "sinks+local, merge" if forced else "combine"))
    w = max(len(label) for _, label in labels)
    print(f"\n  {'stage':{w}s} {'ms':>9s}")
    for kind, label in labels:
        print(f"  {label:{w}s} {stage_ms[kind]:9.3f}")
    print(f"  {'MSA total':{w}s} {total:9.3f}")
    print(f"\n  keys attended per query: {keys:.0f} on average (dense causal: {dense_keys:.0f}, "
          f"{dense_keys / keys:.1f}x more)")
    print(f"  check vs float64 reference on {len(rows)} queries: selection {sel['exact']}/{sel['rows']} exact"
          f"{' (+%d near ties)' % sel['near_ties'] if sel['near_ties'] else ''}, output max abs err {err:.2e}, "
          f"rel err {rel:.2e} -> {'OK' if ok else 'FAILED'}")
    try:
        dense_ms = Bn._torch_timer(torch, device)(lambda: Bn.dense_sdpa(torch, *inputs[:3], S), reps)
        ratio = dense_ms / total if dense_ms > total else total / dense_ms
        print(f"  dense causal attention (torch SDPA) on the same inputs: {dense_ms:.3f} ms -> MSA is "
              f"{ratio:.2f}x {'faster' if dense_ms > total else 'slower'}")
    except Exception as e:  # the comparison is informative, not essential
        print(f"  (dense SDPA comparison unavailable: {e})")
    return 0 if ok else 1


# --------------------------------------------------------------------------- bench
def bench(args, device: str, spec: E.Spec) -> int:
    from . import bench as Bn

    if args.decode:
        return _bench_decode(args, device, spec)
    if args.world_size:
        return _bench_distributed(args, device, spec)
    if args.backward:
        lengths = _lengths(args.lengths) if args.lengths else ([4096, 16384, 32768, 65536, 131072] if device != "cpu"
                                                               else [2048, 8192])
        res = Bn.run_backward_bench(spec, lengths, device=device, repeats=args.repeats)
        return _report(res, "msa bench --backward", device, Bn.backward_table, args.out, Bn.backward_plot)
    if args.lengths:
        lengths = _lengths(args.lengths)
    else:
        lengths = [4096, 16384, 32768, 65536, 131072] if device != "cpu" else [4096, 8192, 16384, 32768]
    res = Bn.run_bench(spec, lengths, device=device, repeats=args.repeats, rotate_sets=args.rotate,
                       scenario=args.scenario, chunk=args.chunk, gather_max=args.gather_max)
    res["command"] = "msa " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("msa") else " ".join(sys.argv)
    return _report(res, "msa bench", device, Bn.table, args.out)


def _bench_distributed(args, device: str, spec) -> int:
    import os

    from . import bench as Bn

    if int(os.environ.get("WORLD_SIZE", "0")) != args.world_size:
        raise SystemExit(f"msa bench --world-size {args.world_size}: launch it with torchrun --nproc_per_node "
                         f"{args.world_size} -m msa_py bench --world-size {args.world_size} ...")
    lengths = _lengths(args.lengths) if args.lengths else ([131072, 262144, 1048576] if device != "cpu" else [2048])
    res = Bn.run_distributed_bench(spec, lengths, device=device, repeats=args.repeats)
    if int(os.environ["RANK"]) == 0:
        res["device_name"] = _device_name(device)
        print(f"msa bench --world-size {args.world_size} on {res['device_name']}, commit {res['commit']}, {res['date']}")
        print(Bn.distributed_table(res))
        out = Path(args.out).with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        import json

        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")
    return 0


def _lengths(text: str) -> list[int]:
    """"4096,32k,1m" -> [4096, 32768, 1048576] (k = 1024, m = 1024 * 1024)."""
    out = []
    for x in text.lower().split(","):
        mult = {"k": 1 << 10, "m": 1 << 20}.get(x.strip()[-1:], 1)
        out.append(int(x.strip().rstrip("km")) * mult)
    return out


def _bench_decode(args, device: str, spec) -> int:
    from . import bench as Bn

    batches = [int(x) for x in args.batches.split(",")] if args.batches else ([1, 8, 32, 64] if device != "cpu" else [2])
    contexts = _lengths(args.contexts) if args.contexts else ([16384, 32768, 65536, 131072] if device != "cpu" else [256])
    if spec.idx_dtype and args.kv_dtype != "fp8":
        print("msa bench --decode --index-dtype fp8 (the FP8 indexer over e4m3 index keys) needs --paged --kv-dtype "
              "fp8", file=sys.stderr)
        return 2
    if args.kv_dtype == "fp8" and not args.paged:
        print("msa bench --decode --kv-dtype fp8 needs --paged (FP8 caches are paged caches)", file=sys.stderr)
        return 2
    res = Bn.run_decode_bench(replace(spec, idx_dtype=""), batches, contexts, device=device, n_new=args.n_new,
                              repeats=args.repeats, paged=args.paged, kv_fp8=args.kv_dtype == "fp8",
                              fp8_index=bool(spec.idx_dtype), lean=args.lean)
    return _report(res, "msa bench --decode", device, Bn.decode_table, args.out, Bn.decode_plot)


def _report(res: dict, title: str, device: str, table, out: str, plotter=None) -> int:
    """Prints a bench result's table under its card, commit and date; writes its JSON and plot."""
    from . import bench as Bn

    res["device_name"] = _device_name(device)
    print(f"{title} on {res['device_name']}, commit {res['commit']}, {res['date']}")
    print(table(res))
    js, png = Bn.save(res, Path(out), plotter)
    print(f"wrote {js} and {png}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="msa", description="MSA block-sparse attention: demo and benchmarks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run a built-in example, check it, compare with dense attention")
    _spec_args(d)
    d.add_argument("--tokens", type=int, help="sequence length (GPU default 32768, CPU 16384)")
    b = sub.add_parser("bench", help="sweep sequence lengths against dense SDPA and a gather baseline")
    _spec_args(b)
    b.add_argument("--lengths", help="comma list, e.g. 4k,16k,32k (GPU default 4k..128k, CPU 4k..32k)")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--rotate", type=int, default=2, help="input sets rotated between timed runs")
    b.add_argument("--scenario", choices=["uniform", "hot"], default="uniform")
    b.add_argument("--chunk", type=int, help="also time chunked prefill with this many queries per call")
    b.add_argument("--gather-max", type=int, default=32768, help="longest length for the gather baseline")
    b.add_argument("--out", default="msa_out/bench", help="output path stem (.json and .png)")
    b.add_argument("--decode", action="store_true", help="decode shapes: few new tokens per sequence over a KV cache")
    b.add_argument("--paged", action="store_true", help="decode: also time the paged layer on the same caches as pages")
    b.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                   help="decode --paged: fp8 also times e4m3 caches (K, V, index keys)")
    b.add_argument("--index-dtype", choices=("auto", "fp8"), default="auto",
                   help="fp8 runs the FP8 indexer (q_idx and k_idx quantized to e4m3, e4m3 tensor cores); decode: "
                        "with --paged --kv-dtype fp8")
    b.add_argument("--world-size", type=int, default=0,
                   help="several devices under torchrun: context- and tensor-parallel MSA against one device")
    b.add_argument("--backward", action="store_true",
                   help="training: forward + backward against dense SDPA forward + backward")
    b.add_argument("--batches", help="decode: comma list of batch sizes (GPU default 1,8,32,64)")
    b.add_argument("--contexts", help="decode: comma list of cache lengths (GPU default 16k,32k,64k,128k)")
    b.add_argument("--n-new", type=int, default=1, help="decode: new tokens per sequence (speculative: up to 8)")
    b.add_argument("--lean", action="store_true",
                   help="decode: only the layer, dense and the e4m3 rows (no stages apart, no general path, no paged "
                        "16-bit layer): long contexts inside one call")
    args = ap.parse_args(argv)
    device = _device(args.device)
    try:
        spec = _spec(args, device)  # bad options: a usage error, before any compile
    except ValueError as e:
        ap.error(str(e))
    return (demo if args.cmd == "demo" else bench)(args, device, spec)


if __name__ == "__main__":
    sys.exit(main())
