"""Compile the model-shape GPU models here, for sm_90a, through MAX's virtual
device, and collect the compiled-model cache entries (MEF files, a few
hundred KB each) that the compile adds, so they can travel to the device
machine instead of being compiled there (each fresh machine otherwise spends
2-5 minutes of device time compiling the same graphs).

  python benchmarks/precompile.py --out .gpu/mef     # here, no GPU
  # on the device, before the run:
  bash benchmarks/gpu_run.sh mef ...      # with .gpu/mef carried: installs them first

Experimental, and so far no gain: it only pays off if the device's MAX
(same version) keys its cache the same way for a real H100 as for the
virtual sm_90a device. The first run that carried the files (2026-11-27,
results/bench_h100_2026-11-27_v13.log) still spent 129 s compiling."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# the kinds msa bench, msa_py.check and the torch ops compile at the model shape
KINDS = ("select", "invert", "block_attention", "combine", "msa", "stages", "sparse")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu/mef", help="folder for the new cache entries")
    ap.add_argument("--arch", default="sm_90a", help="virtual device target (the H100 reports sm_90a)")
    ap.add_argument("--decode", action="store_true", help="also the decode models (decode_stages, msa with decode)")
    a = ap.parse_args()
    # a private cache, so exactly the entries of these compiles are collected
    home = tempfile.mkdtemp(prefix="msa_precompile_")
    os.environ["HOME"] = home
    cache = Path(home) / ".cache" / "modular" / ".max_cache" / "mof" / "mef"
    from max import driver

    driver.set_virtual_device_api("cuda")
    driver.set_virtual_device_target_arch(a.arch)
    driver.set_virtual_device_count(1)
    from msa_py import engine as E

    spec = E.Spec()
    jobs = [(k, spec) for k in KINDS]
    if a.decode:
        jobs += [("decode_stages", replace(spec, decode=True)), ("msa", replace(spec, decode=True))]
    for kind, s in jobs:
        t0 = time.time()
        E.model(kind, s, "gpu")
        print(f"{kind:16s} decode={s.decode!s:5s} compiled for {a.arch} in {time.time() - t0:5.1f} s", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    new = [p for p in cache.rglob("*") if p.is_file()]
    for p in new:
        shutil.copy2(p, out / p.name)
    print(f"{len(new)} cache entries ({sum(p.stat().st_size for p in new) / 1e6:.1f} MB) -> {out}", flush=True)
    shutil.rmtree(home, ignore_errors=True)  # the private cache (with Mojo's, ~200 MB)
    sys.stdout.flush()
    os._exit(0)  # MAX 26.7 can abort in teardown after compile-only loads (see msa_py.check)


if __name__ == "__main__":
    main()
