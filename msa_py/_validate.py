"""Input checks shared by every layer (NumPy reference, MAX graph, torch).

Each check works on shapes (tuples of ints, or symbolic dims for graph values)
and dtype names, so the three layers give the same error for the same mistake,
before any kernel runs. Errors are `ValueError`s that name the argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")

# The inversion's work list walks the queries in windows of this many
# q_budget chunks (2048 queries at the default q_budget 64): the items of one
# window run together, so the Q rows they gather stay in L2 (MSA.md step 4
# leaves the order of the work list open; invert.mojo says why this one).
WINDOW_CHUNKS = 32


def work_windows(T, q_budget: int):
    """Query windows of the work list's order, ceil(T / (WINDOW_CHUNKS *
    q_budget)); T an int, a torch SymInt or a graph Dim."""
    w = WINDOW_CHUNKS * q_budget
    return (T + (w - 1)) // w


def work_capacity(Hkv, T, topk: int, r_max, q_budget: int):
    """Rows of the inversion's work list (invert.mojo's W_max): at most one
    partly filled item per (KV group, window, row), the rest full chunks."""
    return Hkv * (work_windows(T, q_budget) * r_max + T * topk // q_budget)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer))


@dataclass(frozen=True)
class Config:
    """Static parameters of the MSA pipeline (compile-time in the kernels)."""

    topk: int = 16
    block_size: int = 128
    init_blocks: int = 1
    local_blocks: int = 2
    q_budget: int = 64

    def check(self) -> "Config":
        for name in ("topk", "block_size", "init_blocks", "local_blocks", "q_budget"):
            v = getattr(self, name)
            if not _is_int(v) or isinstance(v, bool):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {bs}")
        if bs > 1024:
            raise ValueError(f"block_size must be <= 1024, got {bs}")
        if self.init_blocks < 0:
            raise ValueError(f"init_blocks must be >= 0, got {self.init_blocks}")
        if self.local_blocks < 0:
            raise ValueError(f"local_blocks must be >= 0, got {self.local_blocks}")
        if self.q_budget < 1:
            raise ValueError(f"q_budget must be >= 1, got {self.q_budget}")
        return self

    @property
    def q_window(self) -> int:
        """Queries per window of the work list's order."""
        return WINDOW_CHUNKS * self.q_budget

    def forced_pass_applies(self) -> bool:
        """Whether the selection holds every query's forced blocks (sinks and
        local), so the layer's forced pass can take them out of the inversion."""
        return 0 < self.init_blocks + self.local_blocks <= self.topk

    def check_forced_pass(self) -> "Config":
        if not self.forced_pass_applies():
            raise ValueError(f"forced_combine needs 0 < init_blocks + local_blocks <= topk (the selection holds every "
                             f"forced block), got {self.init_blocks} + {self.local_blocks}, topk {self.topk}")
        return self


def check_rank(name: str, shape, rank: int, what: str) -> None:
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank} ({what}), got shape {tuple(shape)}")


def check_float_dtype(name: str, dtype_name: str, allowed=FLOAT_DTYPES) -> None:
    if dtype_name not in allowed:
        raise ValueError(f"{name} must have a floating dtype in {allowed}, got {dtype_name}")


def check_same_dtype(pairs) -> None:
    """pairs: [(name, dtype_name), ...]; all must equal the first."""
    n0, d0 = pairs[0]
    for n, d in pairs[1:]:
        if d != d0:
            raise ValueError(f"{n} must have the same dtype as {n0} ({d0}), got {d}")


def _eq(a, b) -> bool:
    """Dims may be symbolic (graph layer): only compare when both are ints."""
    if _is_int(a) and _is_int(b):
        return int(a) == int(b)
    return True


def attention_dims(q_shape, k_shape, v_shape):
    """q [T, Hq, D], k/v [S, Hkv, D] -> (T, S, Hq, Hkv, D)."""
    check_rank("q", q_shape, 3, "[T, Hq, D]")
    check_rank("k", k_shape, 3, "[S, Hkv, D]")
    check_rank("v", v_shape, 3, "[S, Hkv, D]")
    T, Hq, D = q_shape
    S, Hkv, Dk = k_shape
    if not _eq(Dk, D):
        raise ValueError(f"k must have head dim D={D} like q, got shape {tuple(k_shape)}")
    if tuple(v_shape) != tuple(k_shape) and not all(_eq(a, b) for a, b in zip(v_shape, k_shape)):
        raise ValueError(f"v must have the shape of k {tuple(k_shape)}, got {tuple(v_shape)}")
    check_heads(Hq, Hkv, "q")
    if _is_int(D) and D < 1:
        raise ValueError(f"q head dim D must be >= 1, got {D}")
    return T, S, Hq, Hkv, D


def check_heads(Hq, Hkv, qname: str) -> None:
    if _is_int(Hkv) and Hkv < 1:
        raise ValueError(f"k must have at least one KV head, got Hkv={Hkv}")
    if _is_int(Hq) and _is_int(Hkv) and (Hq < 1 or Hq % Hkv):
        raise ValueError(f"{qname} heads Hq={Hq} must be a positive multiple of KV heads Hkv={Hkv}")


def index_dims(q_idx_shape, k_idx_shape):
    """q_idx [T, Hkv, Di], k_idx [S, Di] -> (T, S, Hkv, Di)."""
    check_rank("q_idx", q_idx_shape, 3, "[T, Hkv, Di]")
    check_rank("k_idx", k_idx_shape, 2, "[S, Di]")
    T, Hkv, Di = q_idx_shape
    S, Dk = k_idx_shape
    if not _eq(Dk, Di):
        raise ValueError(f"k_idx must have index dim Di={Di} like q_idx, got shape {tuple(k_idx_shape)}")
    if _is_int(Hkv) and Hkv < 1:
        raise ValueError(f"q_idx must have at least one KV group, got Hkv={Hkv}")
    if _is_int(Di) and Di < 1:
        raise ValueError(f"q_idx index dim Di must be >= 1, got {Di}")
    return T, S, Hkv, Di


def check_block_ids_shape(shape, Hkv, T, topk=None):
    check_rank("block_ids", shape, 3, "[Hkv, T, topk]")
    if not (_eq(shape[0], Hkv) and _eq(shape[1], T)):
        raise ValueError(f"block_ids must have shape [Hkv={Hkv}, T={T}, topk], got {tuple(shape)}")
    if topk is not None and not _eq(shape[2], topk):
        raise ValueError(f"block_ids must have topk={topk} slots, got shape {tuple(shape)}")
    if _is_int(shape[2]) and shape[2] < 1:
        raise ValueError(f"block_ids must have at least one slot, got shape {tuple(shape)}")


def check_cu_seqlens_shapes(cu_q_shape, cu_k_shape):
    """Both given or both None; rank 1 with the same length B+1 >= 2."""
    if (cu_q_shape is None) != (cu_k_shape is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (or both None)")
    if cu_q_shape is None:
        return
    check_rank("cu_seqlens_q", cu_q_shape, 1, "[B+1]")
    check_rank("cu_seqlens_k", cu_k_shape, 1, "[B+1]")
    if not _eq(cu_q_shape[0], cu_k_shape[0]):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length B+1, got {cu_q_shape[0]} and {cu_k_shape[0]}"
        )
    if _is_int(cu_q_shape[0]) and cu_q_shape[0] < 2:
        raise ValueError(f"cu_seqlens_q must hold at least 2 entries (B >= 1), got {cu_q_shape[0]}")


def check_cu_seqlens_values(cu_q: np.ndarray, cu_k: np.ndarray, T: int, S: int) -> None:
    """Prefix sums starting at 0, non-decreasing, ending at T / S, Tq_b <= Tk_b."""
    for name, cu, total, what in (("cu_seqlens_q", cu_q, T, "T"), ("cu_seqlens_k", cu_k, S, "S")):
        cu = np.asarray(cu)
        if cu.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer array, got dtype {cu.dtype}")
        if cu.ndim != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be rank 1 with B+1 >= 2 entries, got shape {cu.shape}")
        if int(cu[0]) != 0:
            raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
        if np.any(np.diff(cu.astype(np.int64)) < 0):
            raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()[:16]}")
        if int(cu[-1]) != total:
            raise ValueError(f"{name} must end at {what}={total}, got {int(cu[-1])}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_q.shape[0]} and {cu_k.shape[0]}")
    tq = np.diff(cu_q.astype(np.int64))
    tk = np.diff(cu_k.astype(np.int64))
    bad = np.nonzero(tq > tk)[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"cu_seqlens_q/cu_seqlens_k: sequence {b} has more queries ({int(tq[b])}) than keys ({int(tk[b])})"
        )


def check_block_ids_values(bid, own_block) -> None:
    """block_ids [Hkv, T, topk]: every id in [-1, the query's own block
    own_block[t]] (-1 pads). The kernels ignore ids outside that range (no
    read past a sequence's keys) but cannot refuse them; this check does, on
    the host. (A block in two slots is two splits of the softmax, counted
    twice, in the kernels and the reference alike.)"""
    bid = np.asarray(bid)
    jq = np.asarray(own_block)
    low = bid < -1
    if low.any():
        g, t, s = (int(x[0]) for x in np.nonzero(low))
        raise ValueError(f"block_ids must be >= -1 (-1 pads a slot), got block_ids[{g}, {t}, {s}] = {int(bid[g, t, s])}")
    over = bid > jq[None, :, None]
    if over.any():
        g, t, s = (int(x[0]) for x in np.nonzero(over))
        raise ValueError(
            f"block_ids[{g}, {t}, {s}] = {int(bid[g, t, s])} is after query {t}'s own block {int(jq[t])} (not causal)"
        )


def check_int32_range(T: int, S: int, topk: int, Hq: int = 1, Hkv: int = 1) -> None:
    """The kernels keep int32 indices: entries t * topk + slot, flat (group,
    query, slot) indices Hkv * T * topk, partial offsets (t * Hq + h) * topk +
    slot, key indices < S. Refuse before any of them could overflow."""
    limit = 2**31 - 1
    for what, n in (("T * topk", T * topk), ("Hkv * T * topk", Hkv * T * topk), ("T * Hq * topk", T * Hq * topk),
                    ("S", S)):
        if n > limit:
            raise ValueError(f"{what} = {n} overflows the kernels' int32 indices (T={T}, S={S}, topk={topk}, "
                             f"Hq={Hq}, Hkv={Hkv}): split the batch")


def check_scale(name: str, value) -> None:
    """Softmax and index scales must be finite and > 0 (the kernels rely on
    max(scale * s) == scale * max(s))."""
    import math

    if value is None:
        return
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


# --------------------------------------------------------------------------- workspace (one call of any length)
def workspace_bytes_per_query(Hq: int, Hkv: int, D: int, topk: int, elem_bytes: int, num_keys: int,
                              block_size: int, q_budget: int) -> int:
    """Bytes msa_attention's intermediates take per query of one call: the
    partials (o_partial in the inputs' dtype, lse_partial fp32), the
    selection and the inversion's entries (three int32 per (group, slot)),
    the work list (16 bytes an item), and the work order's per-(window, row)
    counters spread over the window's queries (num_keys: the keys the call's
    queries see)."""
    partials = Hq * topk * (D * elem_bytes + 4)
    selection = 3 * Hkv * topk * 4
    work = Hkv * 16 * (topk // q_budget + 1)
    windows = Hkv * 24 * (num_keys // block_size + 1) // (WINDOW_CHUNKS * q_budget) + 1
    return partials + selection + work + windows


def check_workspace(max_workspace_bytes) -> None:
    if max_workspace_bytes is None:
        return
    if not _is_int(max_workspace_bytes) or isinstance(max_workspace_bytes, bool) or max_workspace_bytes < 1:
        raise ValueError(f"max_workspace_bytes must be a positive int (or None), got {max_workspace_bytes!r}")


def split_queries(tq, tk, max_queries: int) -> list:
    """Pieces of a batch (per-sequence query counts tq, key counts tk) of at
    most max_queries queries each, in token order: (b0, b1, None) a run of
    whole sequences b0 .. b1 - 1, or (b, b + 1, (i0, i1)) queries i0 .. i1 - 1
    of a sequence too long for one piece, over its keys 0 .. tk - tq + i1 - 1
    (queries are a sequence's last tokens, so the piece sees exactly the keys
    the whole call would). Every piece's answer is the whole call's."""
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    pieces, run0, run_q = [], 0, 0
    for b, n in enumerate(int(x) for x in tq):
        if n > max_queries:
            if b > run0:
                pieces.append((run0, b, None))
            k = -(-n // max_queries)
            cuts = [n * i // k for i in range(k + 1)]
            pieces += [(b, b + 1, (cuts[i], cuts[i + 1])) for i in range(k)]
            run0, run_q = b + 1, 0
        elif run_q + n > max_queries:
            pieces.append((run0, b, None))
            run0, run_q = b, n
        else:
            run_q += n
    if len(tq) > run0:
        pieces.append((run0, len(tq), None))
    return pieces


# --------------------------------------------------------------------------- paged caches
def paged_dims(k_cache_shape, v_cache_shape, k_idx_cache_shape, page_table_shape, seq_lens_shape, block_size: int):
    """k_cache, v_cache [num_pages, block_size, Hkv, D], k_idx_cache [num_pages,
    block_size, Di] (None when not given), page_table [B, max_pages],
    seq_lens [B] -> (num_pages, Hkv, D, Di or None, B, max_pages)."""
    check_rank("k_cache", k_cache_shape, 4, "[num_pages, block_size, Hkv, D]")
    if tuple(v_cache_shape) != tuple(k_cache_shape) and not all(_eq(a, b) for a, b in zip(v_cache_shape, k_cache_shape)):
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache_shape)}, got {tuple(v_cache_shape)}")
    num_pages, bs, Hkv, D = k_cache_shape
    if _is_int(bs) and bs != block_size:
        raise ValueError(f"k_cache's page size (dim 1) must equal block_size={block_size}, got {bs}")
    Di = None
    if k_idx_cache_shape is not None:
        check_rank("k_idx_cache", k_idx_cache_shape, 3, "[num_pages, block_size, Di]")
        if not (_eq(k_idx_cache_shape[0], num_pages) and _eq(k_idx_cache_shape[1], block_size)):
            raise ValueError(f"k_idx_cache must be [num_pages={num_pages}, block_size={block_size}, Di], got "
                             f"{tuple(k_idx_cache_shape)}")
        Di = k_idx_cache_shape[2]
    check_rank("page_table", page_table_shape, 2, "[B, max_pages]")
    check_rank("seq_lens", seq_lens_shape, 1, "[B]")
    if not _eq(page_table_shape[0], seq_lens_shape[0]):
        raise ValueError(f"page_table must have one row per sequence (B={seq_lens_shape[0]}), got "
                         f"{tuple(page_table_shape)}")
    return num_pages, Hkv, D, Di, seq_lens_shape[0], page_table_shape[1]


def check_paged_values(page_table, seq_lens, cu_q, num_pages: int, block_size: int, T: int) -> None:
    """Host values: seq_lens >= each sequence's new tokens, enough pages in the
    table for every sequence, every page id a sequence uses in [0, num_pages)."""
    pt = np.asarray(page_table)
    sl = np.asarray(seq_lens).astype(np.int64)
    cq = np.asarray(cu_q).astype(np.int64)
    if cq.ndim != 1 or cq.shape[0] != sl.shape[0] + 1 or int(cq[0]) != 0 or np.any(np.diff(cq) < 0) or int(cq[-1]) != T:
        raise ValueError(f"cu_seqlens_q must be [B+1] prefix sums from 0 to T={T}, got {cq.tolist()[:16]}")
    tq = np.diff(cq)
    bad = np.nonzero(sl < tq)[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"seq_lens[{b}] = {int(sl[b])} is less than sequence {b}'s {int(tq[b])} new tokens")
    need = -(-sl // block_size)
    if np.any(need > pt.shape[1]):
        b = int(np.nonzero(need > pt.shape[1])[0][0])
        raise ValueError(f"sequence {b} needs {int(need[b])} pages of {block_size} keys for seq_lens[{b}] = "
                         f"{int(sl[b])}, page_table has {pt.shape[1]}")
    for b in range(sl.shape[0]):
        used = pt[b, : int(need[b])]
        wrong = np.nonzero((used < 0) | (used >= num_pages))[0]
        if wrong.size:
            j = int(wrong[0])
            raise ValueError(f"page_table[{b}, {j}] = {int(used[j])} is not a page of the cache (0 .. {num_pages - 1})")


def cache_geometry(k_strides, idx_strides, max_pages: int) -> list:
    """The geometry vector the paged kernels read (int64): [max_pages, kv page,
    kv key, kv group, index page, index key] strides in elements."""
    if k_strides[-1] != 1:
        raise ValueError(f"k_cache / v_cache need a contiguous last dimension, got strides {tuple(k_strides)}")
    if idx_strides is not None and idx_strides[-1] != 1:
        raise ValueError(f"k_idx_cache needs a contiguous last dimension, got strides {tuple(idx_strides)}")
    ip, ik = (idx_strides[0], idx_strides[1]) if idx_strides is not None else (0, 0)
    return [max_pages, k_strides[0], k_strides[1], k_strides[2], ip, ik]
