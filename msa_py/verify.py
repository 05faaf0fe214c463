"""Checks of kernel outputs against msa_py.reference, shared by the tests,
`python -m msa_py.check` and `msa demo`.

Selection is compared exactly; where the kernel (fp32 accumulation in another
order) and the float64 reference disagree, the kernel's choice must still be a
valid top-k within `score_tol` of the reference scores (a near tie).
"""

from __future__ import annotations

import math

import numpy as np

from . import reference as R


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    fin = np.isfinite(ref)
    # finite where the reference is, and non-finite entries equal: NaN with NaN, -inf with -inf
    if not np.array_equal(np.isfinite(got), fin) or not np.array_equal(
        np.where(fin, 0, got), np.where(fin, 0, ref), equal_nan=True
    ):
        return math.inf
    a, b = np.where(fin, got, 0), np.where(fin, ref, 0)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def query_positions(cu_q, cu_k):
    """For every query token: (sequence, first key index, key position p)."""
    cu_q = np.asarray(cu_q, np.int64)
    cu_k = np.asarray(cu_k, np.int64)
    seq, p, _ = R._positions(cu_q, cu_k)
    return seq, cu_k[seq], p


def block_scores(q_idx_row, k_seq, p, block_size, idx_scale):
    """float64 block scores [nblk] of one (query, group) row over keys 0..p."""
    s = idx_scale * (k_seq[: p + 1].astype(np.float64) @ q_idx_row.astype(np.float64))
    s = np.where(np.isnan(s), -np.inf, s)
    nblk = p // block_size + 1
    pad = np.full(nblk * block_size, -np.inf)
    pad[: p + 1] = s
    return pad.reshape(nblk, block_size).max(1)


def selection_report(block_ids, q_idx, k_idx, cu_q, cu_k, *, block_size, init_blocks, local_blocks,
                     idx_scale=None, rows=None, score_tol=1e-3):
    """Compares kernel block_ids [Hkv, T, topk] with the reference on query rows.

    Returns dict(rows, exact, near_ties, bad) where bad lists (g, t) rows whose
    selection is not a valid top-k even allowing near ties.
    """
    block_ids = np.asarray(block_ids)
    Hkv, T, topk = block_ids.shape
    Di = q_idx.shape[-1]
    sc = 1.0 / math.sqrt(Di) if idx_scale is None else idx_scale
    seq, kstart, pos = query_positions(cu_q, cu_k)
    rows = np.arange(T) if rows is None else np.asarray(rows)
    exact = ties = 0
    bad = []
    k_idx = np.asarray(k_idx)
    for t in rows:
        t = int(t)
        p = int(pos[t])
        k_seq = k_idx[kstart[t] : kstart[t] + p + 1]
        ref = R.select_blocks(q_idx[t : t + 1], k_seq, topk=topk, block_size=block_size,
                              init_blocks=init_blocks, local_blocks=local_blocks, idx_scale=sc)[:, 0]
        for g in range(Hkv):
            got = block_ids[g, t]
            if np.array_equal(got, ref[g]):
                exact += 1
                continue
            # a near tie: same count, forced blocks kept, free choice within score_tol
            f = R.forced_blocks(p, block_size, init_blocks, local_blocks)
            n = min(topk, p // block_size + 1)
            ok = (got[n:] == -1).all() and len(set(got[:n].tolist())) == n
            ok = ok and (np.diff(got[:n]) > 0).all() and got[:n].min() >= 0 and got[:n].max() <= p // block_size
            if ok:
                bs = block_scores(q_idx[t, g], k_seq, p, block_size, sc)
                free = np.array([j for j in range(len(bs)) if j not in f])
                if len(f) <= topk:
                    ok = set(f) <= set(got[:n].tolist())
                    chosen = np.array([j for j in got[:n] if j not in f], dtype=np.int64)
                    other = np.setdiff1d(free, chosen)
                    if ok and len(chosen) and len(other):
                        ok = bs[chosen].min() >= bs[other].max() - score_tol * max(1.0, abs(bs[other].max()))
            if ok:
                ties += 1
            else:
                bad.append((g, t))
    return dict(rows=len(rows) * Hkv, exact=exact, near_ties=ties, bad=bad)


def attention_rows_reference(q, k, v, block_ids, cu_q, cu_k, rows, *, block_size, scale=None):
    """Reference out/lse for the given query rows, over the kernel's block_ids."""
    seq, kstart, pos = query_positions(cu_q, cu_k)
    outs, lses = [], []
    for t in rows:
        t = int(t)
        p = int(pos[t])
        sl = slice(kstart[t], kstart[t] + p + 1)
        o, l = R.sparse_attention(q[t : t + 1], k[sl], v[sl], block_ids[:, t : t + 1],
                                  block_size=block_size, scale=scale)
        outs.append(o[0])
        lses.append(l[0])
    return np.stack(outs), np.stack(lses)


def tolerance(dtype: str) -> float:
    """Relative-error bound by dtype (norm-wise; METHOD.md's ranges)."""
    return {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}[dtype]
