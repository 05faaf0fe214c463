"""The indexer alone (select, MSA.md steps 1-3) at the model shape: one
compiled model, no other stage and no dense baseline, so an A/B of indexer
changes costs a fraction of `msa bench`'s device time
(`benchmarks/ab_trees.sh select`).

  python benchmarks/select_bench.py --lengths 32k,128k [--repeats 5] [--out results.json]

Prints one line per length: median ms of device-event timings after warm-up
(input sets rotated between runs, as `msa bench` does) and effective TFLOP/s
(2 x causal pairs x Hkv x Di, the count `msa bench` uses)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msa_py import engine as E  # noqa: E402
from msa_py.bench import MSARunner, _timer, commit, make_inputs, select_tflops, time_stage  # noqa: E402
from msa_py.cli import _lengths  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32k,128k")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rotate", type=int, default=2, help="input sets rotated between timed runs")
    ap.add_argument("--scenario", choices=("uniform", "hot"), default="uniform")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="cpu: a smoke test of this script")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import torch

    spec, device = E.Spec(), a.device
    tdev = "cuda" if device == "gpu" else "cpu"
    run, tm = MSARunner(spec, device), _timer(device)
    rows = []
    print(f"select on {torch.cuda.get_device_name() if device == 'gpu' else 'cpu'}, commit {commit()}")
    for T in _lengths(a.lengths):
        bufs = [run.buffers(torch, *make_inputs(torch, spec, T, T, tdev, a.scenario, s), T, T)
                for s in range(a.rotate)]
        ms = time_stage(run, tm, "select", bufs, a.repeats)
        tflops = select_tflops(spec, T, T, ms)
        rows.append(dict(T=T, select_ms=ms, select_tflops=tflops))
        print(f"  T {T:7d}  select {ms:8.3f} ms  {tflops:6.1f} TF/s", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(config=asdict(spec), device=device,
                                               scenario=a.scenario, repeats=a.repeats, rows=rows, commit=commit(),
                                               date=time.strftime("%Y-%m-%d %H:%M:%S")), indent=1))


if __name__ == "__main__":
    main()
