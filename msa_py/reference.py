"""NumPy reference of every MSA stage (float64 truth).

Shapes and semantics follow ../shared/design/MSA.md; the same names and
argument order run through `msa_py.graph` (MAX graph values) and `msa_py`
(torch tensors):

    q [T, Hq, D], k, v [S, Hkv, D], q_idx [T, Hkv, Di], k_idx [S, Di]
    cu_seqlens_q, cu_seqlens_k [B+1] int32 (None: one sequence whose queries
    are the last T of its S keys)
    block_ids [Hkv, T, topk] int32, ascending, -1 padded

Inputs may be any floating NumPy dtype (bfloat16 through ml_dtypes too);
everything is computed in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _validate as V

NEG_INF = -np.inf


# --------------------------------------------------------------------------- helpers
def _f64(name: str, x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise ValueError(f"{name} must be a floating array, got dtype {a.dtype}")
    return a.astype(np.float64)


def _seqlens(cu_q, cu_k, T: int, S: int):
    """Validated (cu_q, cu_k) int64 arrays; None -> one bottom-right aligned sequence."""
    V.check_cu_seqlens_shapes(
        None if cu_q is None else np.shape(cu_q), None if cu_k is None else np.shape(cu_k)
    )
    if cu_q is None:
        if T > S:
            raise ValueError(f"q has more tokens (T={T}) than k (S={S}) without cu_seqlens")
        return np.array([0, T], np.int64), np.array([0, S], np.int64)
    cu_q, cu_k = np.asarray(cu_q), np.asarray(cu_k)
    V.check_cu_seqlens_values(cu_q, cu_k, T, S)
    return cu_q.astype(np.int64), cu_k.astype(np.int64)


def _positions(cu_q: np.ndarray, cu_k: np.ndarray):
    """Per query token: sequence index b, key position p inside b, its key count."""
    T = int(cu_q[-1])
    tq = np.diff(cu_q)
    tk = np.diff(cu_k)
    seq = np.repeat(np.arange(len(tq)), tq)
    i = np.arange(T) - cu_q[seq]
    p = tk[seq] - tq[seq] + i
    return seq, p, tk[seq]


def _config(topk, block_size, init_blocks=1, local_blocks=2, q_budget=64) -> V.Config:
    return V.Config(topk, block_size, init_blocks, local_blocks, q_budget).check()


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield s, min(n, s + size)


# --------------------------------------------------------------------------- 1-3 select
def select_blocks(
    q_idx,
    k_idx,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    idx_scale: float | None = None,
) -> np.ndarray:
    """MSA.md steps 1-3. Returns block_ids [Hkv, T, topk] int32.

    NaN index scores count as -inf (the block stays selectable and ranks last);
    ids always lie in [0, jq] of the query's own sequence.
    """
    T, S, Hkv, Di = V.index_dims(np.shape(q_idx), np.shape(k_idx))
    cfg = _config(topk, block_size, init_blocks, local_blocks)
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, T, S)
    qi = _f64("q_idx", q_idx)
    ki = _f64("k_idx", k_idx)
    V.check_scale("idx_scale", idx_scale)
    scale = 1.0 / math.sqrt(Di) if idx_scale is None else float(idx_scale)
    bs = cfg.block_size
    out = np.full((Hkv, T, topk), -1, np.int32)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        tq, tk = q1 - q0, k1 - k0
        if tq == 0:
            continue
        nblk = -(-tk // bs)
        kpad = np.zeros((nblk * bs, Di))
        kpad[:tk] = ki[k0:k1]
        blk = np.arange(nblk)
        for c0, c1 in _chunks(tq, max(1, (1 << 22) // max(1, nblk * bs * Hkv))):
            p = tk - tq + np.arange(c0, c1)  # key positions of these queries
            jq = p // bs
            s = scale * np.einsum("tgd,kd->tgk", qi[q0 + c0 : q0 + c1], kpad)
            s = np.where(np.isnan(s), NEG_INF, s)
            visible = np.arange(nblk * bs)[None, :] <= p[:, None]  # [t, key]
            s = np.where(visible[:, None, :], s, NEG_INF)
            block_score = s.reshape(c1 - c0, Hkv, nblk, bs).max(-1)  # [t, g, j]
            selectable = blk[None, :] <= jq[:, None]  # [t, j]
            sink = blk[None, :] < cfg.init_blocks
            local = (blk[None, :] > jq[:, None] - cfg.local_blocks) & selectable
            # rank: forced class first (sinks 2, local 1, others 0), then score, then lower id
            cls = np.where(sink & selectable, 2, np.where(local, 1, 0))
            cls = np.where(selectable, cls, -1)
            cls = np.broadcast_to(cls[:, None, :], block_score.shape)
            ids = np.broadcast_to(blk, block_score.shape)
            rank_score = np.where(cls > 0, np.inf, block_score)  # forced blocks score +inf
            order = np.lexsort((ids, -rank_score, -cls), axis=-1)[..., :topk]
            chosen = np.take_along_axis(ids, order, -1)
            ok = np.take_along_axis(cls, order, -1) >= 0
            chosen = np.where(ok, chosen, np.iinfo(np.int32).max)
            chosen = np.sort(chosen, -1)
            chosen = np.where(chosen == np.iinfo(np.int32).max, -1, chosen)
            w = chosen.shape[-1]
            out[:, q0 + c0 : q0 + c1, :w] = chosen.transpose(1, 0, 2)
    return out


# --------------------------------------------------------------------------- 4 invert
class Inversion(NamedTuple):
    """Block -> queries CSR and work list (MSA.md step 4).

    row_offsets [B+1]: first row of each sequence (rows number the blocks of
        all sequences in order; R = row_offsets[-1]).
    row_ptr [Hkv, R+1]: CSR offsets into entries[g].
    entries [Hkv, T*topk]: t*topk + slot, sorted by t within a row; -1 past
        row_ptr[g, R].
    work [W, 4]: (g, row, begin, count); begin indexes entries[g], count in
        1..q_budget. Each row's entries are cut at the query windows
        (t // q_window, q_window = WINDOW_CHUNKS * q_budget) and into chunks
        of at most q_budget; items go by group, then window, then row
        (ascending in even windows, descending in odd ones, so consecutive
        windows start on the blocks the last one ended on), then begin.
    num_work [1]: W.
    """

    row_offsets: np.ndarray
    row_ptr: np.ndarray
    entries: np.ndarray
    work: np.ndarray
    num_work: np.ndarray


def row_offsets_of(cu_seqlens_k: np.ndarray, block_size: int) -> np.ndarray:
    tk = np.diff(np.asarray(cu_seqlens_k, np.int64))
    return np.concatenate([[0], np.cumsum(-(-tk // block_size))]).astype(np.int32)


def invert(
    block_ids,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    block_size: int = 128,
    q_budget: int = 64,
    init_blocks: int = 0,
    local_blocks: int = 0,
) -> Inversion:
    """Inverts block_ids [Hkv, T, topk] into per-(group, block) query lists.

    init_blocks / local_blocks > 0 leave out each query's forced blocks
    (j < init_blocks or j > jq - local_blocks): the layer's forced pass
    (`forced_combine`) attends to those query-major instead."""
    bid = np.asarray(block_ids)
    if bid.dtype.kind not in "iu":
        raise ValueError(f"block_ids must be an integer array, got dtype {bid.dtype}")
    V.check_rank("block_ids", bid.shape, 3, "[Hkv, T, topk]")
    Hkv, T, topk = bid.shape
    cfg = _config(topk, block_size, init_blocks, local_blocks, q_budget)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("invert needs cu_seqlens_q and cu_seqlens_k (the block of a query depends on its sequence)")
    S = int(np.asarray(cu_seqlens_k)[-1])
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, T, S)
    V.check_int32_range(T, S, topk, 1, Hkv)  # entries are int32
    seq, p, tk = _positions(cu_q, cu_k)
    roff = row_offsets_of(cu_k, cfg.block_size)
    R = int(roff[-1])
    jq = p // cfg.block_size
    V.check_block_ids_values(bid, jq)
    valid = bid >= 0
    valid &= ~is_forced(bid, jq[None, :, None], init_blocks, local_blocks)
    rows = np.where(valid, roff[seq][None, :, None] + bid, -1)
    row_ptr = np.zeros((Hkv, R + 1), np.int32)
    entries = np.full((Hkv, T * topk), -1, np.int32)
    work = []
    ent = np.arange(T * topk, dtype=np.int64).reshape(T, topk)
    n_win = V.work_windows(T, cfg.q_budget)
    for g in range(Hkv):
        r = rows[g].reshape(-1)
        keep = r >= 0
        r_k, e_k = r[keep], ent.reshape(-1)[keep]
        order = np.lexsort((e_k, r_k))  # by row, then by t (entries grow with t)
        counts = np.bincount(r_k, minlength=R)
        row_ptr[g, 1:] = np.cumsum(counts)
        entries[g, : len(order)] = e_k[order]
        # each row's entries in window w: t // q_window == w (sorted by t, so contiguous)
        win_of = entries[g, : len(order)] // topk // cfg.q_window
        for w in range(n_win):
            for row in range(R) if w % 2 == 0 else range(R - 1, -1, -1):
                lo, hi = int(row_ptr[g, row]), int(row_ptr[g, row + 1])
                b0 = lo + int(np.searchsorted(win_of[lo:hi], w, "left"))
                n = lo + int(np.searchsorted(win_of[lo:hi], w, "right")) - b0
                for c in range(0, n, cfg.q_budget):
                    work.append((g, row, b0 + c, min(cfg.q_budget, n - c)))
    work = np.array(work, np.int32).reshape(-1, 4)
    return Inversion(roff, row_ptr, entries, work, np.array([len(work)], np.int32))


def block_ids_from_inversion(inv: Inversion, cu_seqlens_q, cu_seqlens_k, topk: int) -> np.ndarray:
    """Rebuilds block_ids from the work list alone (the inverse of `invert`)."""
    Hkv = inv.row_ptr.shape[0]
    T = int(np.asarray(cu_seqlens_q)[-1])
    out = np.full((Hkv, T, topk), -1, np.int32)
    roff = inv.row_offsets.astype(np.int64)
    for g, row, begin, count in inv.work[: int(inv.num_work[0])]:
        e = inv.entries[g, begin : begin + count].astype(np.int64)
        t, slot = e // topk, e % topk
        b = np.searchsorted(roff, row, side="right") - 1
        out[g, t, slot] = row - roff[b]
    return out


def is_forced(j, jq, init_blocks: int, local_blocks: int):
    """Whether block j is one of the forced blocks of a query whose own block
    is jq (elementwise: NumPy arrays or torch tensors)."""
    return (j < init_blocks) | (j > jq - local_blocks)


def forced_block_ids(cu_seqlens_q, cu_seqlens_k, Hkv: int, *, block_size: int, init_blocks: int,
                     local_blocks: int) -> np.ndarray:
    """[Hkv, T, init_blocks + local_blocks]: each query's forced blocks, ascending, -1 padded."""
    cu_q, cu_k = np.asarray(cu_seqlens_q, np.int64), np.asarray(cu_seqlens_k, np.int64)
    _, p, _ = _positions(cu_q, cu_k)
    nf = init_blocks + local_blocks
    out = np.full((len(p), nf), -1, np.int32)
    for t, pt in enumerate(p):
        f = forced_blocks(int(pt), block_size, init_blocks, local_blocks)
        out[t, : len(f)] = f
    return np.broadcast_to(out, (Hkv, len(p), nf)).copy()


# --------------------------------------------------------------------------- 5 attention
def _block_partials(q, k, v, block_ids, cu_q, cu_k, block_size, scale):
    """Per (t, h, slot) softmax over the selected block's visible keys."""
    T, Hq, D = q.shape
    Hkv, _, topk = block_ids.shape
    G = Hq // Hkv
    seq, p, _ = _positions(cu_q, cu_k)
    kend = cu_k[seq + 1]  # exclusive global end of the query's keys
    o = np.zeros((T, Hq, topk, D))
    lse = np.full((T, Hq, topk), NEG_INF)
    ar = np.arange(block_size)
    chunk = max(1, (1 << 21) // max(1, Hkv * topk * block_size * max(D, 1)))
    for c0, c1 in _chunks(T, chunk):
        bid = block_ids[:, c0:c1].transpose(1, 0, 2).astype(np.int64)  # [t, g, s]
        used = bid >= 0
        local = np.where(used, bid, 0)[..., None] * block_size + ar  # key positions [t,g,s,b]
        gkey = cu_k[seq[c0:c1]][:, None, None, None] + local
        vis = used[..., None] & (local <= p[c0:c1, None, None, None])
        vis &= gkey < kend[c0:c1, None, None, None]
        gkey = np.where(vis, gkey, 0)
        g_idx = np.arange(Hkv)[None, :, None, None]
        kk = k[gkey, g_idx]  # [t, g, s, b, D]
        vv = v[gkey, g_idx]
        qq = q[c0:c1].reshape(c1 - c0, Hkv, G, D)
        n = c1 - c0
        s = scale * np.matmul(qq, kk.reshape(n, Hkv, topk * block_size, D).transpose(0, 1, 3, 2))
        s = s.reshape(n, Hkv, G, topk, block_size)
        s = np.where(vis[:, :, None], s, NEG_INF)
        m = s.max(-1, keepdims=True)
        m = np.where(np.isneginf(m), 0.0, m)  # no visible key; a NaN score keeps m NaN
        e = np.exp(s - m)
        den = e.sum(-1, keepdims=True)
        empty = den == 0  # no visible key: lse -inf, o 0; a NaN den (NaN score) stays NaN
        pr = e / np.where(empty, 1.0, den)
        oc = np.matmul(pr.transpose(0, 1, 3, 2, 4), vv).transpose(0, 1, 3, 2, 4)  # [t,g,q,s,D]
        lc = np.where(empty[..., 0], NEG_INF, m[..., 0] + np.log(np.where(empty, 1.0, den)[..., 0]))
        o[c0:c1] = oc.reshape(c1 - c0, Hq, topk, D)
        lse[c0:c1] = lc.reshape(c1 - c0, Hq, topk)
    return o, lse


def _attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k):
    T, S, Hq, Hkv, D = V.attention_dims(np.shape(q), np.shape(k), np.shape(v))
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, T, S)
    return _f64("q", q), _f64("k", k), _f64("v", v), cu_q, cu_k, T, Hkv, D


def block_attention(
    q,
    k,
    v,
    inversion: Inversion,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    topk: int = 16,
    block_size: int = 128,
    scale: float | None = None,
):
    """MSA.md step 5 over the work list of `invert`.

    Returns o_partial [T, Hq, topk, D] (normalized within the block) and
    lse_partial [T, Hq, topk] (-inf for unused slots; o_partial is 0 there).
    """
    q, k, v, cu_q, cu_k, T, Hkv, D = _attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    _config(topk, block_size)
    V.check_scale("scale", scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bid = block_ids_from_inversion(inversion, cu_q, cu_k, topk)
    V.check_block_ids_shape(bid.shape, Hkv, T, topk)
    return _block_partials(q, k, v, bid, cu_q, cu_k, block_size, scale)


# --------------------------------------------------------------------------- 6 combine
def combine(o_partial, lse_partial):
    """Merges partials by log-sum-exp. Returns out [T, Hq, D], lse [T, Hq].

    A (query, head) with no visible key gets out 0 and lse -inf; one with a
    NaN (or +inf) lse_partial, from a NaN score in that block, gets out and
    lse NaN.
    """
    o = _f64("o_partial", o_partial)
    lp = _f64("lse_partial", lse_partial)
    V.check_rank("o_partial", o.shape, 4, "[T, Hq, topk, D]")
    V.check_rank("lse_partial", lp.shape, 3, "[T, Hq, topk]")
    if o.shape[:3] != lp.shape:
        raise ValueError(f"lse_partial must have shape {o.shape[:3]} (o_partial's first three dims), got {lp.shape}")
    m = lp.max(-1)
    finite = np.isfinite(m)
    ms = np.where(finite, m, 0.0)
    w = np.where(np.isneginf(lp), 0.0, np.exp(lp - ms[..., None]))
    den = w.sum(-1)
    lse = np.where(finite, ms + np.log(np.where(finite, den, 1.0)), NEG_INF)
    safe_o = np.where(np.isneginf(lp)[..., None], 0.0, o)
    out = np.einsum("ths,thsd->thd", w, safe_o) / np.where(finite, den, 1.0)[..., None]
    bad = (np.isnan(lp) | np.isposinf(lp)).any(-1)  # as exp(inf - inf) in the kernels
    out[bad] = np.nan
    lse[bad] = np.nan
    return out, lse


def forced_combine(
    q,
    k,
    v,
    o_partial,
    lse_partial,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: float | None = None,
):
    """Steps 5-6 for the forced blocks, fused with the merge: each query's
    forced blocks (sinks and local, `forced_blocks`) attended to as one
    more split, merged with the partials of the other blocks (as left by
    `block_attention` on an inversion that skipped them). Returns out
    [T, Hq, D], lse [T, Hq]."""
    q, k, v, cu_q, cu_k, T, Hkv, D = _attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    o_partial, lse_partial = _f64("o_partial", o_partial), _f64("lse_partial", lse_partial)
    V.check_rank("o_partial", o_partial.shape, 4, "[T, Hq, topk, D]")
    if o_partial.shape[:2] != q.shape[:2] or o_partial.shape[3] != D:
        raise ValueError(f"o_partial must be [T, Hq, topk, D] with q's T, Hq, D {q.shape}, got {o_partial.shape}")
    if lse_partial.shape != o_partial.shape[:3]:
        raise ValueError(f"lse_partial must have shape {o_partial.shape[:3]}, got {lse_partial.shape}")
    _config(o_partial.shape[2], block_size, init_blocks, local_blocks).check_forced_pass()
    V.check_scale("scale", scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    fb = forced_block_ids(cu_q, cu_k, Hkv, block_size=block_size, init_blocks=init_blocks, local_blocks=local_blocks)
    of, lf = _block_partials(q, k, v, fb, cu_q, cu_k, block_size, scale)
    # the forced blocks as one split: their own merge, then one more slot
    of1, lf1 = combine(of, lf)
    o = np.concatenate([o_partial, of1[:, :, None]], axis=2)
    lp = np.concatenate([lse_partial, lf1[:, :, None]], axis=2)
    return combine(o, lp)


# --------------------------------------------------------------------------- pipelines
def sparse_attention(
    q,
    k,
    v,
    block_ids,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    block_size: int = 128,
    scale: float | None = None,
):
    """Attention of each query over its selected blocks (and causality).

    Returns out [T, Hq, D], lse [T, Hq] (natural log).
    """
    q, k, v, cu_q, cu_k, T, Hkv, D = _attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    bid = np.asarray(block_ids)
    if bid.dtype.kind not in "iu":
        raise ValueError(f"block_ids must be an integer array, got dtype {bid.dtype}")
    V.check_block_ids_shape(bid.shape, Hkv, T)
    _config(bid.shape[2], block_size)
    V.check_scale("scale", scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    _, p, _ = _positions(cu_q, cu_k)
    V.check_block_ids_values(bid, p // block_size)
    o, lse = _block_partials(q, k, v, bid, cu_q, cu_k, block_size, scale)
    return combine(o, lse)


def msa_attention(
    q,
    k,
    v,
    q_idx,
    k_idx,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: float | None = None,
    idx_scale: float | None = None,
    max_workspace_bytes: int | None = None,
):
    """Selection then sparse attention. Returns out [T, Hq, D], lse [T, Hq].

    max_workspace_bytes bounds the kernels' intermediates (the torch and graph
    layers split the call into pieces under it); the answer never depends on
    it, and this reference bounds its own memory by chunking queries."""
    V.check_workspace(max_workspace_bytes)
    T, S, Hq, Hkv, D = V.attention_dims(np.shape(q), np.shape(k), np.shape(v))
    Ti, Si, Hkv_i, _ = V.index_dims(np.shape(q_idx), np.shape(k_idx))
    if (Ti, Si, Hkv_i) != (T, S, Hkv):
        raise ValueError(
            f"q_idx/k_idx must have T={T}, S={S}, Hkv={Hkv} like q/k, got q_idx {np.shape(q_idx)}, k_idx {np.shape(k_idx)}"
        )
    bid = select_blocks(
        q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, topk=topk, block_size=block_size,
        init_blocks=init_blocks, local_blocks=local_blocks, idx_scale=idx_scale,
    )
    return sparse_attention(q, k, v, bid, cu_seqlens_q, cu_seqlens_k, block_size=block_size, scale=scale)


# --------------------------------------------------------------------------- backward
def _selected_keys(block_ids, cu_q, cu_k, block_size, c0, c1):
    """Per query t in [c0, c1), group g, slot s, key b of the selected block:
    the global key index gkey and whether it is visible (selected, causal,
    inside the sequence). Shapes [t, g, s, b]."""
    seq, p, _ = _positions(cu_q, cu_k)
    bid = block_ids[:, c0:c1].transpose(1, 0, 2).astype(np.int64)  # [t, g, s]
    used = bid >= 0
    local = np.where(used, bid, 0)[..., None] * block_size + np.arange(block_size)
    gkey = cu_k[seq[c0:c1]][:, None, None, None] + local
    vis = used[..., None] & (local <= p[c0:c1, None, None, None]) & (gkey < cu_k[seq[c0:c1] + 1][:, None, None, None])
    return np.where(vis, gkey, 0), vis


def sparse_attention_backward(
    q,
    k,
    v,
    block_ids,
    dout,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    dlse=None,
    block_size: int = 128,
    scale: float | None = None,
):
    """Gradients of `sparse_attention` for a fixed selection (block_ids is a
    constant, as in every sparse-attention training recipe): given dout
    [T, Hq, D] (and dlse [T, Hq], the gradient reaching lse, or None),
    returns dq [T, Hq, D], dk, dv [S, Hkv, D] in float64.

    With P the softmax over each query's selected visible keys (a block in
    two slots counts twice), O = P V, lse = log sum exp(S):
      dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O) + dlse),
      dQ = scale dS K,  dK = scale dS^T Q."""
    q, k, v, cu_q, cu_k, T, Hkv, D = _attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    bid = np.asarray(block_ids)
    if bid.dtype.kind not in "iu":
        raise ValueError(f"block_ids must be an integer array, got dtype {bid.dtype}")
    V.check_block_ids_shape(bid.shape, Hkv, T)
    _config(bid.shape[2], block_size)
    V.check_scale("scale", scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    do = _f64("dout", dout)
    if do.shape != q.shape:
        raise ValueError(f"dout must have q's shape {q.shape}, got {do.shape}")
    dl = np.zeros(q.shape[:2]) if dlse is None else _f64("dlse", dlse)
    if dl.shape != q.shape[:2]:
        raise ValueError(f"dlse must have shape {q.shape[:2]}, got {dl.shape}")
    _, p, _ = _positions(cu_q, cu_k)
    V.check_block_ids_values(bid, p // block_size)
    Hq = q.shape[1]
    G = Hq // Hkv
    topk = bid.shape[2]
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    g_idx = np.arange(Hkv)[None, :, None, None]
    chunk = max(1, (1 << 20) // max(1, Hkv * topk * block_size * max(D, 1)))
    for c0, c1 in _chunks(T, chunk):
        n = c1 - c0
        gkey, vis = _selected_keys(bid, cu_q, cu_k, block_size, c0, c1)
        kk = k[gkey, g_idx].reshape(n, Hkv, topk * block_size, D)  # [t, g, L, D]
        vv = v[gkey, g_idx].reshape(n, Hkv, topk * block_size, D)
        vis = vis.reshape(n, Hkv, 1, topk * block_size)
        qq = q[c0:c1].reshape(n, Hkv, G, D)
        s = np.where(vis, scale * np.matmul(qq, kk.transpose(0, 1, 3, 2)), NEG_INF)  # [t, g, G, L]
        m = s.max(-1, keepdims=True)
        m = np.where(np.isneginf(m), 0.0, m)
        e = np.exp(s - m)
        den = e.sum(-1, keepdims=True)
        pr = e / np.where(den == 0, 1.0, den)
        o = np.matmul(pr, vv)  # [t, g, G, D]
        dO = do[c0:c1].reshape(n, Hkv, G, D)
        drow = (dO * o).sum(-1, keepdims=True) - dl[c0:c1].reshape(n, Hkv, G, 1)
        dp = np.matmul(dO, vv.transpose(0, 1, 3, 2))
        ds = pr * (dp - drow)
        dq[c0:c1] = scale * np.matmul(ds, kk).reshape(n, Hq, D)
        dkc = scale * np.matmul(ds.transpose(0, 1, 3, 2), qq)  # [t, g, L, D]
        dvc = np.matmul(pr.transpose(0, 1, 3, 2), dO)
        keys = gkey.reshape(n, Hkv, topk * block_size)
        gg = np.broadcast_to(np.arange(Hkv)[None, :, None], keys.shape)
        w = vis.reshape(n, Hkv, -1)
        np.add.at(dk, (keys[w], gg[w]), dkc[w])
        np.add.at(dv, (keys[w], gg[w]), dvc[w])
    return dq, dk, dv


def block_mass(
    q,
    k,
    block_ids,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    *,
    block_size: int = 128,
    scale: float | None = None,
):
    """The attention mass of each selected block: mass [Hkv, T, topk], the
    share of the softmax of `sparse_attention` that falls on the slot's block,
    averaged over the G query heads of the group (each (t, g) row sums to 1
    over its used slots; 0 for unused slots). The indexer's training target
    (a KL term pulls the index scores of the selected blocks toward it)."""
    T, S, Hq, Hkv, D = V.attention_dims(np.shape(q), np.shape(k), np.shape(k))
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, T, S)
    qf, kf = _f64("q", q), _f64("k", k)
    bid = np.asarray(block_ids)
    V.check_block_ids_shape(bid.shape, Hkv, T)
    _config(bid.shape[2], block_size)
    V.check_scale("scale", scale)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    _, lp = _block_partials(qf, kf, kf, bid, cu_q, cu_k, block_size, scale)  # lse per (t, h, slot)
    _, lse = combine(np.zeros(lp.shape + (1,)), lp)
    mass = np.where(np.isneginf(lp), 0.0, np.exp(lp - np.where(np.isfinite(lse), lse, 0.0)[..., None]))
    G = Hq // Hkv
    return mass.reshape(T, Hkv, G, -1).mean(2).transpose(1, 0, 2)


def index_block_scores(q_idx, k_idx, block_ids, cu_seqlens_q=None, cu_seqlens_k=None, *, block_size: int = 128,
                       idx_scale: float | None = None) -> np.ndarray:
    """The indexer's score of each selected block: [Hkv, T, topk] float64,
    idx_scale times the max of <q_idx[t, g], k_idx[key]> over the block's
    visible keys, -inf in unused slots (the score select_blocks ranked; NaN
    counts as -inf)."""
    T, S, Hkv, Di = V.index_dims(np.shape(q_idx), np.shape(k_idx))
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, T, S)
    qi, ki = _f64("q_idx", q_idx), _f64("k_idx", k_idx)
    bid = np.asarray(block_ids)
    V.check_block_ids_shape(bid.shape, Hkv, T)
    scale = 1.0 / math.sqrt(Di) if idx_scale is None else float(idx_scale)
    topk = bid.shape[2]
    out = np.full((Hkv, T, topk), NEG_INF)
    for c0, c1 in _chunks(T, max(1, (1 << 20) // max(1, Hkv * topk * block_size * Di))):
        gkey, vis = _selected_keys(bid, cu_q, cu_k, block_size, c0, c1)  # [t, g, s, b]
        s = scale * np.einsum("tgd,tgsbd->tgsb", qi[c0:c1], ki[gkey])
        s = np.where(vis & ~np.isnan(s), s, NEG_INF)
        out[:, c0:c1] = s.max(-1).transpose(1, 0, 2)
    return out


# --------------------------------------------------------------------------- paged caches
def gather_pages(cache, page_table, seq_lens, *, block_size: int = 128, scale=None) -> tuple:
    """A paged cache [num_pages, block_size, ...] as the packed rows of its
    sequences: (x [S, ...] float64, dequantized by `scale` when given,
    cu_seqlens_k [B+1]). Sequence b's key i is page page_table[b, i //
    block_size], row i % block_size."""
    c = _f64("cache", cache)
    if scale is not None:
        c = c * float(scale)
    pt = np.asarray(page_table).astype(np.int64)
    sl = np.asarray(seq_lens).astype(np.int64)
    parts = []
    for b in range(len(sl)):
        n = int(sl[b])
        pages = pt[b, : -(-n // block_size)]
        parts.append(c[pages].reshape((-1,) + c.shape[2:])[:n])
    x = np.concatenate(parts) if parts else np.zeros((0,) + c.shape[2:])
    return x, np.concatenate([[0], np.cumsum(sl)]).astype(np.int64)


def _paged(page_table, seq_lens, cu_seqlens_q, k_cache, v_cache, k_idx_cache, block_size: int, T: int):
    """Shape and value checks of the paged entry points."""
    num_pages = V.paged_dims(np.shape(k_cache), np.shape(v_cache if v_cache is not None else k_cache),
                             None if k_idx_cache is None else np.shape(k_idx_cache), np.shape(page_table),
                             np.shape(seq_lens), block_size)[0]
    V.check_paged_values(page_table, seq_lens, cu_seqlens_q, num_pages, block_size, T)


def paged_select_blocks(q_idx, k_idx_cache, page_table, seq_lens, cu_seqlens_q, *, topk: int = 16,
                        block_size: int = 128, init_blocks: int = 1, local_blocks: int = 2,
                        idx_scale: float | None = None, k_idx_scale: float | None = None) -> np.ndarray:
    """select_blocks over a paged index-key cache [num_pages, block_size, Di]
    (dequantized by k_idx_scale: an FP8 cache's scale). Returns logical
    block_ids [Hkv, T, topk]."""
    check = np.shape(k_idx_cache)
    V.check_rank("k_idx_cache", check, 3, "[num_pages, block_size, Di]")
    fake_kv = (check[0], block_size, 1, 1)
    V.paged_dims(fake_kv, fake_kv, check, np.shape(page_table), np.shape(seq_lens), block_size)
    V.check_paged_values(page_table, seq_lens, cu_seqlens_q, check[0], block_size, np.shape(q_idx)[0])
    ki, cu_k = gather_pages(k_idx_cache, page_table, seq_lens, block_size=block_size, scale=k_idx_scale)
    return select_blocks(q_idx, ki, cu_seqlens_q, cu_k, topk=topk, block_size=block_size, init_blocks=init_blocks,
                         local_blocks=local_blocks, idx_scale=idx_scale)


def paged_sparse_attention(q, k_cache, v_cache, block_ids, page_table, seq_lens, cu_seqlens_q, *,
                           block_size: int = 128, scale: float | None = None, k_scale: float | None = None,
                           v_scale: float | None = None):
    """sparse_attention over paged K / V caches [num_pages, block_size, Hkv, D]
    (dequantized by k_scale / v_scale). Returns out [T, Hq, D], lse [T, Hq]."""
    _paged(page_table, seq_lens, cu_seqlens_q, k_cache, v_cache, None, block_size, np.shape(q)[0])
    k, cu_k = gather_pages(k_cache, page_table, seq_lens, block_size=block_size, scale=k_scale)
    v, _ = gather_pages(v_cache, page_table, seq_lens, block_size=block_size, scale=v_scale)
    return sparse_attention(q, k, v, block_ids, cu_seqlens_q, cu_k, block_size=block_size, scale=scale)


def paged_msa_attention(q, k_cache, v_cache, q_idx, k_idx_cache, page_table, seq_lens, cu_seqlens_q, *,
                        topk: int = 16, block_size: int = 128, init_blocks: int = 1, local_blocks: int = 2,
                        scale: float | None = None, idx_scale: float | None = None, k_scale: float | None = None,
                        v_scale: float | None = None, k_idx_scale: float | None = None):
    """msa_attention over paged caches: q [T, Hq, D], q_idx [T, Hkv, Di] the
    new tokens (each sequence's last cu_seqlens_q[b+1] - cu_seqlens_q[b]
    of its seq_lens[b] keys), k_cache, v_cache [num_pages, block_size, Hkv, D],
    k_idx_cache [num_pages, block_size, Di], page_table [B, max_pages],
    seq_lens [B]; FP8 caches dequantized by their scales. Returns out, lse."""
    _paged(page_table, seq_lens, cu_seqlens_q, k_cache, v_cache, k_idx_cache, block_size, np.shape(q)[0])
    k, cu_k = gather_pages(k_cache, page_table, seq_lens, block_size=block_size, scale=k_scale)
    v, _ = gather_pages(v_cache, page_table, seq_lens, block_size=block_size, scale=v_scale)
    ki, _ = gather_pages(k_idx_cache, page_table, seq_lens, block_size=block_size, scale=k_idx_scale)
    return msa_attention(q, k, v, q_idx, ki, cu_seqlens_q, cu_k, topk=topk, block_size=block_size,
                         init_blocks=init_blocks, local_blocks=local_blocks, scale=scale, idx_scale=idx_scale)


def paged_append(k_cache, v_cache, k_idx_cache, k, v, k_idx, page_table, seq_lens, cu_seqlens_new, *,
                 block_size: int = 128):
    """Writes new tokens into their pages (engines' reshape_and_cache): the
    tokens of sequence b (cu_seqlens_new) are its keys seq_lens[b] - n_b ..
    seq_lens[b] - 1 (seq_lens counts them). Returns new copies of the three
    caches (the torch op writes in place)."""
    kc, vc, ic = (np.array(x, copy=True) for x in (k_cache, v_cache, k_idx_cache))
    pt = np.asarray(page_table).astype(np.int64)
    sl = np.asarray(seq_lens).astype(np.int64)
    cu = np.asarray(cu_seqlens_new).astype(np.int64)
    V.check_paged_values(pt, sl, cu, kc.shape[0], block_size, int(cu[-1]))
    for b in range(len(sl)):
        for i in range(int(cu[b]), int(cu[b + 1])):
            key = int(sl[b]) - (int(cu[b + 1]) - i)
            page, row = pt[b, key // block_size], key % block_size
            kc[page, row], vc[page, row], ic[page, row] = k[i], v[i], k_idx[i]
    return kc, vc, ic


def dense_attention(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, *, scale=None):
    """Dense causal attention (bottom-right aligned), for comparisons."""
    q, k, v, cu_q, cu_k, T, Hkv, D = _attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    Hq = q.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = np.zeros((T, Hq, D))
    lse = np.full((T, Hq), NEG_INF)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]))
        if q1 == q0:
            continue
        p = (k1 - k0) - (q1 - q0) + np.arange(q1 - q0)
        mask = np.arange(k1 - k0)[None, :] <= p[:, None]
        kk = np.repeat(k[k0:k1], G, axis=1)
        vv = np.repeat(v[k0:k1], G, axis=1)
        s = scale * np.einsum("thd,khd->thk", q[q0:q1], kk)
        s = np.where(mask[:, None, :], s, NEG_INF)
        m = s.max(-1, keepdims=True)
        e = np.exp(s - m)
        den = e.sum(-1, keepdims=True)
        vnan = np.isnan(vv)
        if not vnan.any():
            out[q0:q1] = np.einsum("thk,khd->thd", e / den, vv)
        else:  # a NaN value reaches the queries that see its key, not the masked ones (0 * NaN)
            out[q0:q1] = np.einsum("thk,khd->thd", e / den, np.where(vnan, 0.0, vv))
            seen = np.einsum("tk,khd->thd", mask.astype(np.float64), vnan.astype(np.float64)) > 0
            out[q0:q1][seen] = np.nan
        lse[q0:q1] = (m + np.log(den))[..., 0]
    return out, lse


def forced_blocks(p: int, block_size: int, init_blocks: int, local_blocks: int) -> list[int]:
    """Blocks forced in for a query at key position p: sinks and local blocks."""
    jq = p // block_size
    return sorted(set(range(min(init_blocks, jq + 1))) | set(range(max(0, jq - local_blocks + 1), jq + 1)))
