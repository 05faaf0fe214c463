"""Brute-force oracle: dense float64 softmax with an explicit [T, S] mask.

Deliberately naive (python loops over sequences and heads) and independent of
msa_py.reference, which is checked against it.
"""
import math

import numpy as np


def mask_from_block_ids(block_ids, cu_q, cu_k, block_size):
    """Explicit boolean mask [Hkv, T, S]: key in a selected block and causal."""
    Hkv, T, topk = block_ids.shape
    S = int(cu_k[-1])
    mask = np.zeros((Hkv, T, S), bool)
    for b in range(len(cu_q) - 1):
        tq, tk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(tq):
            t = cu_q[b] + i
            p = tk - tq + i
            for g in range(Hkv):
                for j in block_ids[g, t]:
                    if j < 0:
                        continue
                    lo, hi = j * block_size, min((j + 1) * block_size, p + 1)
                    mask[g, t, cu_k[b] + lo : cu_k[b] + hi] = True
    return mask


def masked_attention(q, k, v, mask, scale=None):
    """out [T, Hq, D], lse [T, Hq] of softmax restricted to mask [Hkv, T, S]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = np.zeros((T, Hq, D))
    lse = np.full((T, Hq), -np.inf)
    for h in range(Hq):
        g = h // G
        s = scale * q[:, h] @ k[:, g].T
        s = np.where(mask[g], s, -np.inf)
        for t in range(T):
            row = s[t]
            if not np.isfinite(row).any():
                continue
            m = row.max()
            e = np.exp(row - m)
            out[t, h] = e @ v[:, g] / e.sum()
            lse[t, h] = m + math.log(e.sum())
    return out, lse


def select_oracle(q_idx, k_idx, cu_q, cu_k, topk, block_size, init_blocks, local_blocks, idx_scale=None):
    """Per query: score every visible block by brute force, sort by (forced, score, -id)."""
    q_idx, k_idx = np.asarray(q_idx, np.float64), np.asarray(k_idx, np.float64)
    T, Hkv, Di = q_idx.shape
    scale = 1 / math.sqrt(Di) if idx_scale is None else idx_scale
    out = np.full((Hkv, T, topk), -1, np.int32)
    for b in range(len(cu_q) - 1):
        tq, tk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(tq):
            t = cu_q[b] + i
            p = tk - tq + i
            jq = p // block_size
            for g in range(Hkv):
                cands = []
                for j in range(jq + 1):
                    keys = range(j * block_size, min((j + 1) * block_size, p + 1))
                    sc = max(scale * float(q_idx[t, g] @ k_idx[cu_k[b] + key]) for key in keys)
                    forced = 2 if j < init_blocks else (1 if j > jq - local_blocks else 0)
                    cands.append((-forced, -math.inf if forced else -sc, j))  # forced: score +inf
                cands.sort()
                ids = sorted(c[2] for c in cands[:topk])
                out[g, t, : len(ids)] = ids
    return out
