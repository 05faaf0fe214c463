"""One layer stage alone at the model shape: the indexer (select, MSA.md
steps 1-3), or the attention (the block attention and the forced pass with
its merge, steps 5-6, on the indexer's selection). Only the models those
stages need are compiled and there is no dense baseline, so an A/B of kernel
changes costs a fraction of `msa bench`'s device time (`benchmarks/ab_trees.sh
select` / `attn`).

  python benchmarks/stage_bench.py --stages select --lengths 32k,128k [--repeats 5] [--out results.json]
  python benchmarks/stage_bench.py --stages attention --lengths 32k,128k
  python benchmarks/stage_bench.py --stages attention --lengths 16k,16k --keys 64k,128k  # prefill chunks

Prints one line per length: median ms of device-event timings after warm-up
(input sets rotated between runs, as `msa bench` does) and effective TFLOP/s
with `msa bench`'s counts (indexer: 2 x causal pairs x Hkv x Di; block
attention: 4 x its own keys x Hq x D)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msa_py import engine as E  # noqa: E402
from msa_py.bench import (  # noqa: E402
    MSARunner, _timer, attention_tflops, commit, drop_partials, layer_stage_kinds, make_inputs, prepare_layer,
    rotations, select_tflops, store_partials, time_stage,
)
from msa_py.cli import _lengths  # noqa: E402


def _select(spec, run, tm, bufs, T, S, repeats) -> dict:
    ms = time_stage(run, tm, "select", bufs, repeats)
    return dict(select_ms=ms, select_tflops=select_tflops(spec, T, S, ms))


def _attention(torch, spec, run, tm, bufs, T, S, repeats, device, empty_grid=False) -> dict:
    kinds = layer_stage_kinds(spec, device)
    bids = prepare_layer(run, bufs, kinds)
    store_partials(run, bufs)
    row = dict(combine_kind=kinds["combine"])
    row["invert_ms"] = time_stage(run, tm, kinds["invert"], bufs, repeats)
    row["combine_ms"] = time_stage(run, tm, kinds["combine"], bufs, repeats)
    drop_partials(bufs)
    row["block_attention_ms"] = ms = time_stage(run, tm, "block_attention", bufs, repeats)
    row["attention_tflops"] = attention_tflops(torch, spec, bids[0], T, S, ms, kinds["combine"] == "forced_combine")
    row["work_items"] = int(E.to_numpy(bufs[0]["num_work"])[0])
    row["work_capacity"] = int(bufs[0]["work"].shape[0])
    if empty_grid:
        # the same launch with num_work 0: what the grid costs with no item to run
        full = [b["num_work"] for b in bufs]
        for b in bufs:
            b["num_work"] = E.to_buffer(np.zeros(1, np.int32), "int32", device)
        row["empty_grid_ms"] = time_stage(run, tm, "block_attention", bufs, repeats)
        for b, nw in zip(bufs, full):
            b["num_work"] = nw
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", choices=("select", "attention"), default="select")
    ap.add_argument("--lengths", default="32k,128k", help="queries per call")
    ap.add_argument("--keys", default="",
                    help="keys per call (the queries are the last of them, as in a prefill chunk over its prefix): "
                         "one length, or one per --lengths entry; default the query count")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rotate", type=int, default=2, help="input sets rotated between timed runs")
    ap.add_argument("--scenario", choices=("uniform", "hot"), default="uniform")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="cpu: a smoke test of this script")
    ap.add_argument("--empty-grid", action="store_true",
                    help="attention: also time the block attention with num_work 0 (the cost of its grid alone)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import torch

    spec, device = E.Spec(), a.device
    tdev = "cuda" if device == "gpu" else "cpu"
    run, tm = MSARunner(spec, device), _timer(device)
    rows = []
    print(f"{a.stages} on {torch.cuda.get_device_name() if device == 'gpu' else 'cpu'}, commit {commit()}")
    lengths = _lengths(a.lengths)
    keys = _lengths(a.keys) if a.keys else lengths
    if len(keys) == 1:
        keys = keys * len(lengths)
    if len(keys) != len(lengths) or any(S < T for T, S in zip(lengths, keys)):
        ap.error("--keys: one length, or one per --lengths entry, each >= its query count")
    for T, S in zip(lengths, keys):
        bufs = [run.buffers(torch, *make_inputs(torch, spec, T, S, tdev, a.scenario, s), T, S)
                for s in range(rotations(spec, T, a.rotate))]
        head = f"  T {T:7d} S {S:7d}"
        if a.stages == "select":
            row = _select(spec, run, tm, bufs, T, S, a.repeats)
            print(f"{head}  select {row['select_ms']:8.3f} ms  {row['select_tflops']:6.1f} TF/s", flush=True)
        else:
            row = _attention(torch, spec, run, tm, bufs, T, S, a.repeats, device, a.empty_grid)
            line = (f"{head}  block attention {row['block_attention_ms']:8.3f} ms  {row['attention_tflops']:6.1f} TF/s"
                    f"  {row['combine_kind']} {row['combine_ms']:8.3f} ms  invert {row['invert_ms']:.3f} ms"
                    f"  items {row['work_items']} of {row['work_capacity']}")
            if a.empty_grid:
                line += f"  empty grid {row['empty_grid_ms']:.3f} ms"
            print(line, flush=True)
        rows.append(dict(T=T, S=S, **row))
        del bufs
        if device == "gpu":
            torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps(dict(config=asdict(spec), device=device, stages=a.stages,
                                               scenario=a.scenario, repeats=a.repeats, rows=rows, commit=commit(),
                                               date=time.strftime("%Y-%m-%d %H:%M:%S")), indent=1))


if __name__ == "__main__":
    main()
