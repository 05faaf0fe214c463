"""How much precision the stored partials could give up (NOTES, "Stored partials").

Float64 reference partials of random inputs (the model's D 128, topk 16,
block 128; 4096 queries, 16 heads of one KV group), stored as bf16 (what the
kernels store), as int8 with one absmax scale per 128-value row, and as fp8
e4m3 with one scale per row; each merged by the reference combine and
compared with the float64 output.

  python benchmarks/partial_precision.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msa_py import reference as R  # noqa: E402


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    return torch.from_numpy(x).to(dtype).to(torch.float64).numpy()


def main() -> None:
    rng = np.random.default_rng(0)
    T, Hq, Hkv, D, Di, topk, bs = 4096, 16, 1, 128, 64, 16, 128
    q, k, v = (rng.standard_normal(s) for s in ((T, Hq, D), (T, Hkv, D), (T, Hkv, D)))
    qi, ki = rng.standard_normal((T, Hkv, Di)), rng.standard_normal((T, Di))
    cu = np.array([0, T], np.int32)
    block_ids = R.select_blocks(qi, ki, cu, cu, topk=topk, block_size=bs)
    o_partial, lse_partial = R._block_partials(q, k, v, block_ids, cu, cu, bs, 1 / np.sqrt(D))
    exact, _ = R.combine(o_partial, lse_partial)

    amax = np.abs(o_partial).max(-1, keepdims=True)
    s_i8 = np.where(amax > 0, amax / 127, 1.0)
    s_f8 = np.where(amax > 0, amax / 448, 1.0)
    stored = {
        "bf16 (the kernels')": _cast(o_partial, torch.bfloat16),
        "int8, absmax scale per row": np.clip(np.round(o_partial / s_i8), -127, 127) * s_i8,
        "fp8 e4m3, scale per row": _cast(o_partial / s_f8, torch.float8_e4m3fn) * s_f8,
    }
    print(f"the bf16 output's own rounding: {np.linalg.norm(_cast(exact, torch.bfloat16) - exact) / np.linalg.norm(exact):.2e}")
    for name, o in stored.items():
        out, _ = R.combine(o, lse_partial)
        d = out - exact
        print(f"{name:30s} rel err {np.linalg.norm(d) / np.linalg.norm(exact):.2e}  "
              f"max abs / max |out| {np.abs(d).max() / np.abs(exact).max():.2e}")


if __name__ == "__main__":
    main()
