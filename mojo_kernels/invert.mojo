# MSA.md step 4: invert block_ids [Hkv, T, topk] into, per KV group, a CSR of
# block rows -> (query, slot) entries sorted by query, plus a work list of
# (g, row, begin, count) items of at most q_budget entries. With init_blocks /
# local_blocks > 0 each query's forced blocks are left out (the layer's forced
# pass, forced.mojo, attends to them query-major).
#
# Rows number the blocks of all sequences in order: row = row_offsets[b] + j.
# Output sizes are upper bounds known before launch (no host round trip):
#   R_max = S // block_size + B rows,
#   W_max = Hkv * (NW * R_max + T*topk // q_budget) work items, NW = ceil(T / win);
# num_work[0] holds the real count, entries past a group's nnz are -1 and
# rows past R are empty.
#
# Work order: each row's entries are also cut at query windows of
# win = WINDOW_CHUNKS * q_budget queries (t // win), and the items go by
# group, window, row (ascending in even windows, descending in odd ones),
# begin. The attention runs its thread blocks in this order, so the blocks
# in flight gather Q rows of one window (8 MB per group at the model shape,
# L2-resident) instead of the whole sequence: block by block, every block's
# queries span the sequence and Q came from DRAM ~11 times at 32K (ncu).
# 2048 queries (WINDOW_CHUNKS 32 at q_budget 64): against 4096 the
# attention is 4-7% faster at 16K-64K and the same at 128K, where each
# window re-reads more K/V than L2 holds (NOTES, "Inversion and work order").
# The serpentine row order lets a window start on the K/V blocks the last
# one ended on.
#
# GPU pipeline (all on the stream, capturable): row offsets, count (atomics,
# one thread per query, warp-aggregated), scan (one block per group, its
# items counted from 0), window starts (one thread per row; thread 0 sums
# the groups' items into num_work), scatter (the same atomics, unordered),
# then one block per row puts its entries in query order with a bitmap over
# the sequence's queries: each entry goes to its query's rank (a popcount
# prefix), deterministic, O(nnz + rows * Tq/32); the same block writes the
# row's work items, after the earlier groups' items.
#
# scratch layout (int32): window counts, then window starts [Hkv*NW*R_max]
#                         | cursors [Hkv*R_max]
#                         | work offsets in each group [Hkv*NW*R_max]
#                         | unsorted entries [Hkv*T*topk]
#                         | work items per group [Hkv]

from std.atomic import Atomic, Ordering
from std.bit import pop_count
from std.math import ceildiv
from std.memory import unsafe_stack_allocation

from extensibility import InputTensor, OutputTensor, register
from max.gpu import barrier, block_dim, block_idx, global_idx, lane_id, thread_idx
from max.gpu.primitives import warp
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.memory import AddressSpace

from .common import Forced, I32MutPtr, I32Ptr, blocks_of, position_of, seq_of

comptime SCAN_THREADS = 512  # 76 registers a thread (the unrolled loads): 1024 would not launch
comptime SORT_THREADS = 256
comptime BITMAP_WORDS = 4096  # 131072 queries per window
comptime SORT_UNROLL = 4  # entries loaded before any is used: the sink row holds every query
comptime WINDOW_CHUNKS = 32  # queries per work-order window / q_budget (msa_py/_validate.py)


def _row_offsets_kernel(roff: I32MutPtr, cu_k: I32Ptr, num_seqs: Int32, block_size: Int32):
    # B is small next to T: one thread walks it.
    if thread_idx.x != 0:
        return
    var acc = 0
    roff[unsafe_offset=0] = 0
    for b in range(Int(num_seqs)):
        var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
        acc += blocks_of(tk, Int(block_size))
        roff[unsafe_offset=b + 1] = Int32(acc)


@always_inline
def _warp_fetch_add(ctr: I32MutPtr, key: Int, lane: Int) -> Int:
    """Atomic fetch-add of 1 on ctr[key] for every lane with key >= 0; returns
    the lane's slot (old value), -1 for key < 0. The lanes holding lane 0's key
    share one atomic: a warp walks 32 consecutive queries, which all chose the
    sink block and mostly the same local blocks, so those rows would otherwise
    take one serialised atomic per query. Every lane of the warp must call it."""
    var lead = Int(warp.shuffle_idx(Int32(key), UInt32(0)))
    var same = key >= 0 and key == lead
    var mask = warp.vote[DType.uint32](same)
    var base = Int32(0)
    # relaxed: the counters only need atomicity (the kernel's end orders them for
    # the next kernel); the default (sequential) put a fence.sc.sys before every
    # atomic, and ncu showed the count and scatter kernels stalled on it
    if lane == 0 and same:
        base = Atomic.fetch_add[ordering=Ordering.RELAXED](ctr.unsafe_offset(key), Int32(pop_count(mask)))
    base = warp.shuffle_idx(base, UInt32(0))
    if same:
        return Int(base) + Int(pop_count(mask & ((UInt32(1) << UInt32(lane)) - 1)))
    if key >= 0:
        return Int(Atomic.fetch_add[ordering=Ordering.RELAXED](ctr.unsafe_offset(key), Int32(1)))
    return -1


@always_inline
def _query_row_base(
    roff: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, num_seqs: Int, T: Int, q: Int, nq: Int, mut key_pos: Int
) -> Int:
    """Row of block 0 of query q's sequence (q = g * T + t), -1 past the end;
    key_pos: the query's key position (its own block bounds the ids, and the
    forced blocks need it)."""
    if q >= nq:
        return -1
    var t = q % T
    var b = seq_of(cu_q, num_seqs, t)
    key_pos = position_of(cu_q, cu_k, b, t)
    return Int(roff[unsafe_offset=b])


@always_inline
def _skipped[init_blocks: Int, local_blocks: Int](j: Int, f: Forced) -> Bool:
    """Unused slot (-1), an id outside [0, the query's own block f.jq] (no
    row of it to count: the callers' value checks refuse such ids, and the
    graph ops ignore them rather than index past the sequence's rows), or one
    of the query's forced blocks f, which the layer's forced pass attends to
    instead (init_blocks and local_blocks both 0: none)."""
    if j < 0 or j > f.jq:
        return True
    comptime if init_blocks + local_blocks > 0:
        return f.holds(j)
    return False


@always_inline
def _slot_key[init_blocks: Int, local_blocks: Int](
    block_ids: I32Ptr, q: Int, s: Int, topk: Int, rbase: Int, f: Forced, T: Int, r_max: Int
) -> Int:
    """Counter index g * r_max + row of query q's slot s, -1 when skipped."""
    if rbase < 0:
        return -1
    var j = Int(block_ids[unsafe_offset=q * topk + s])
    if _skipped[init_blocks, local_blocks](j, f):
        return -1
    return (q // T) * r_max + rbase + j


def _count_kernel[init_blocks: Int, local_blocks: Int](
    wcounts: I32MutPtr, block_ids: I32Ptr, roff: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr,
    num_seqs: Int32, T: Int32, topk: Int32, r_max: Int32, nq: Int32, block_size: Int32,
    window: Int32, num_windows: Int32,
):
    """One thread per (g, t) query, its slots in turn (warp-aggregated
    atomics): entries per (g, window of t, row), wcounts[(g * NW + w) * R + row]."""
    var q = Int(global_idx.x)
    var lane = Int(lane_id())
    var R = Int(r_max)
    var g = q // Int(T)
    # (g, w) base of this query's counters; the row key g * R + row adds to it
    var wbase = (g * (Int(num_windows) - 1) + (q % Int(T)) // Int(window)) * R
    var key_pos = 0
    var rbase = _query_row_base(roff, cu_q, cu_k, Int(num_seqs), Int(T), q, Int(nq), key_pos)
    var f = Forced(key_pos, Int(block_size), init_blocks, local_blocks)
    for s in range(Int(topk)):
        var key = _slot_key[init_blocks, local_blocks](block_ids, q, s, Int(topk), rbase, f, Int(T), R)
        _ = _warp_fetch_add(wcounts, key + wbase if key >= 0 else -1, lane)


def _scatter_kernel[init_blocks: Int, local_blocks: Int](
    unsorted: I32MutPtr, cursor: I32MutPtr, row_ptr: I32Ptr, block_ids: I32Ptr, roff: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, num_seqs: Int32, T: Int32, topk: Int32, r_max: Int32, nq: Int32, block_size: Int32,
):
    """Each entry t * topk + slot to a free place of its row (unordered)."""
    var q = Int(global_idx.x)
    var lane = Int(lane_id())
    var K = Int(topk)
    var R = Int(r_max)
    var nent = Int(T) * K
    var g = q // Int(T)
    var key_pos = 0
    var rbase = _query_row_base(roff, cu_q, cu_k, Int(num_seqs), Int(T), q, Int(nq), key_pos)
    var f = Forced(key_pos, Int(block_size), init_blocks, local_blocks)
    for s in range(K):
        var key = _slot_key[init_blocks, local_blocks](block_ids, q, s, K, rbase, f, Int(T), R)
        var pos = _warp_fetch_add(cursor, key, lane)
        if key >= 0:
            var row = key - g * R
            var base = Int(row_ptr[unsafe_offset=g * (R + 1) + row])
            unsorted[unsafe_offset=g * nent + base + pos] = Int32((q - g * Int(T)) * K + s)


@always_inline
def _block_exclusive_scan(
    sums: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED], tid: Int, mine: Int
) -> Tuple[Int, Int]:
    """Hillis-Steele over SCAN_THREADS values: (this thread's exclusive prefix,
    the total). Every thread of the block calls it."""
    sums[unsafe_offset=tid] = Int32(mine)
    barrier()
    var off = 1
    while off < SCAN_THREADS:
        var a = sums[unsafe_offset=tid]
        if tid >= off:
            a += sums[unsafe_offset=tid - off]
        barrier()
        sums[unsafe_offset=tid] = a
        barrier()
        off *= 2
    var incl = Int(sums[unsafe_offset=tid])
    var total = Int(sums[unsafe_offset=SCAN_THREADS - 1])
    barrier()  # sums is reused by the next scan
    return (incl - mine, total)


@always_inline
def _order_row(i: Int, R: Int) -> Tuple[Int, Int]:
    """(window, row) of place i in a group's work order: windows in turn,
    rows ascending in even windows and descending in odd ones."""
    var w = i // R
    var rr = i % R
    return (w, rr if w % 2 == 0 else R - 1 - rr)


@always_inline
def _window_counts8(wc: I32MutPtr, w: Int, r: Int, R: Int, NW: Int) -> SIMD[DType.int32, 8]:
    """Row r's counts of windows w .. w + 7 (wc[w * R + r], 0 past NW), the
    eight loads in flight together: issued one by one, each would wait out
    a full memory round trip."""
    var c = SIMD[DType.int32, 8](0)
    comptime for u in range(8):
        if w + u < NW:
            c[u] = wc[unsafe_offset=(w + u) * R + r]
    return c


@always_inline
def _row_window_sum(wc: I32MutPtr, r: Int, R: Int, NW: Int) -> Int:
    """Sum over the NW windows of row r's counts."""
    var s = 0
    for w in range(0, NW, 8):
        s += Int(_window_counts8(wc, w, r, R, NW).reduce_add())
    return s


@always_inline
def _work_places8(wc: I32MutPtr, i0: Int, hi: Int, R: Int, qb: Int) -> Tuple[SIMD[DType.int32, 8], SIMD[DType.int32, 8]]:
    """Places i0 .. i0 + 7 (< hi) of a group's work order: each one's index
    w * R + row into the (window, row) arrays and its item count,
    ceil(entries / q_budget) (0 past hi), the eight loads in flight together."""
    var at = SIMD[DType.int32, 8](0)
    var items = SIMD[DType.int32, 8](0)
    comptime for u in range(8):
        if i0 + u < hi:
            var wr = _order_row(i0 + u, R)
            at[u] = Int32(wr[0] * R + wr[1])
            items[u] = Int32(ceildiv(Int(wc[unsafe_offset=Int(at[u])]), qb))
    return (at, items)


def _scan_kernel(
    row_ptr: I32MutPtr, work_off: I32MutPtr, group_items: I32MutPtr, wcounts: I32MutPtr,
    num_groups: Int32, r_max: Int32, q_budget: Int32, num_windows: Int32,
):
    """One block per group g: row counts (sums over windows) scanned into
    row_ptr; items per (window, row), ceil(count / q_budget), scanned in work
    order into work_off[(g * NW + w) * R + row], from 0 in each group (the
    work list places group g after the earlier groups' group_items, which
    the sort adds: a group's block does not wait for the others)."""
    var sums = unsafe_stack_allocation[SCAN_THREADS, Int32, address_space=AddressSpace.SHARED]()
    var tid = Int(thread_idx.x)
    var g = Int(block_idx.x)
    if g >= Int(num_groups):  # no groups at all (the grid has at least one block)
        return
    var R = Int(r_max)
    var NW = Int(num_windows)
    var qb = Int(q_budget)
    var per = ceildiv(R, SCAN_THREADS)
    var per_w = ceildiv(NW * R, SCAN_THREADS)
    var wc = wcounts.unsafe_offset(g * NW * R)
    var wo = work_off.unsafe_offset(g * NW * R)
    var rp = row_ptr.unsafe_offset(g * (R + 1))
    # rows: counts summed over windows, scanned
    var lo = min(R, tid * per)
    var hi = min(R, lo + per)
    var s_cnt = 0
    for r in range(lo, hi):
        s_cnt += _row_window_sum(wc, r, R, NW)
    var row_scan = _block_exclusive_scan(sums, tid, s_cnt)
    var run_c = row_scan[0]
    for r in range(lo, hi):
        rp[unsafe_offset=r] = Int32(run_c)
        run_c += _row_window_sum(wc, r, R, NW)
    if tid == 0:
        rp[unsafe_offset=R] = Int32(row_scan[1])
    # (window, row) places in work order: items scanned, eight counts in flight
    var lo_w = min(NW * R, tid * per_w)
    var hi_w = min(NW * R, lo_w + per_w)
    var s_wrk = 0
    for i0 in range(lo_w, hi_w, 8):
        s_wrk += Int(_work_places8(wc, i0, hi_w, R, qb)[1].reduce_add())
    var work_scan = _block_exclusive_scan(sums, tid, s_wrk)
    var run_w = work_scan[0]
    for i0 in range(lo_w, hi_w, 8):
        var p = _work_places8(wc, i0, hi_w, R, qb)
        comptime for u in range(8):
            if i0 + u < hi_w:
                wo[unsafe_offset=Int(p[0][u])] = Int32(run_w)
                run_w += Int(p[1][u])
    if tid == 0:
        group_items[unsafe_offset=g] = Int32(work_scan[1])


@always_inline
def _items_before(group_items: I32Ptr, g: Int) -> Int:
    """Work items of the groups before g: where group g's items start in the
    work list (g = the group count: num_work)."""
    var n = 0
    for g2 in range(g):
        n += Int(group_items[unsafe_offset=g2])
    return n


def _window_starts_kernel(
    wcounts: I32MutPtr, num_work: I32MutPtr, row_ptr: I32Ptr, group_items: I32Ptr,
    num_groups: Int32, r_max: Int32, num_windows: Int32,
):
    """One thread per (g, row): the row's window counts become the windows'
    starts in entries[g], eight loads in flight at a time. Thread 0 also
    writes num_work, the groups' items summed (after _scan_kernel)."""
    var i = Int(global_idx.x)
    var R = Int(r_max)
    var NW = Int(num_windows)
    if i == 0:
        num_work[unsafe_offset=0] = Int32(_items_before(group_items, Int(num_groups)))
    if i >= Int(num_groups) * R:
        return
    var g = i // R
    var r = i % R
    var wc = wcounts.unsafe_offset(g * NW * R)
    var run = Int(row_ptr[unsafe_offset=g * (R + 1) + r])
    for w in range(0, NW, 8):
        var c = _window_counts8(wc, w, r, R, NW)
        comptime for u in range(8):
            if w + u < NW:
                wc[unsafe_offset=(w + u) * R + r] = Int32(run)
                run += Int(c[u])


@always_inline
def _load_entries(src: I32Ptr, i0: Int, n: Int) -> SIMD[DType.int32, SORT_UNROLL]:
    """Entries i0, i0 + SORT_THREADS, ... (-1 past n), all loads in flight together."""
    var ev = SIMD[DType.int32, SORT_UNROLL](-1)
    comptime for u in range(SORT_UNROLL):
        var i = i0 + u * SORT_THREADS
        if i < n:
            ev[u] = src[unsafe_offset=i]
    return ev


def _sort_rows_kernel(
    entries: I32MutPtr, work: I32MutPtr, unsorted: I32Ptr, row_ptr: I32Ptr, work_off: I32Ptr,
    group_items: I32Ptr, wstart: I32Ptr, roff: I32Ptr, cu_q: I32Ptr,
    num_seqs: Int32, T: Int32, topk: Int32, r_max: Int32, q_budget: Int32, num_windows: Int32,
):
    """One block per (g, row): entries in query order, and the row's work items."""
    var R = Int(r_max)
    var g = Int(block_idx.x) // R
    var row = Int(block_idx.x) % R
    var tid = Int(thread_idx.x)
    var rp = row_ptr.unsafe_offset(g * (R + 1))
    var begin = Int(rp[unsafe_offset=row])
    var n = Int(rp[unsafe_offset=row + 1]) - begin
    if n == 0:
        return
    var K = Int(topk)
    var nent = Int(T) * K
    var qb = Int(q_budget)
    # work items of this row: its entries of each window, in q_budget chunks
    var NW = Int(num_windows)
    var ws = wstart.unsafe_offset(g * NW * R + row)
    var wo = work_off.unsafe_offset(g * NW * R + row)
    var work_base = _items_before(group_items, g)
    for w in range(tid, NW, SORT_THREADS):
        var b0 = Int(ws[unsafe_offset=w * R])
        var b1 = Int(ws[unsafe_offset=(w + 1) * R]) if w + 1 < NW else begin + n
        var i0 = work_base + Int(wo[unsafe_offset=w * R])
        for c in range(ceildiv(b1 - b0, qb)):
            var it = work.unsafe_offset((i0 + c) * 4)
            it[unsafe_offset=0] = Int32(g)
            it[unsafe_offset=1] = Int32(row)
            it[unsafe_offset=2] = Int32(b0 + c * qb)
            it[unsafe_offset=3] = Int32(min(qb, b1 - b0 - c * qb))
    # the sequence of this row (its queries bound the bitmap windows)
    var b = 0
    var nseq = Int(num_seqs)
    var lo = 0
    var hi = nseq - 1
    while lo < hi:  # last b with roff[b] <= row
        var mid = (lo + hi + 1) // 2
        if Int(roff[unsafe_offset=mid]) <= row:
            lo = mid
        else:
            hi = mid - 1
    b = lo
    var t_lo = Int(cu_q[unsafe_offset=b])
    var t_hi = Int(cu_q[unsafe_offset=b + 1])
    var src = unsorted.unsafe_offset(g * nent + begin)
    var dst = entries.unsafe_offset(g * nent + begin)
    var bits = unsafe_stack_allocation[BITMAP_WORDS, Int32, address_space=AddressSpace.SHARED]()
    var part = unsafe_stack_allocation[SORT_THREADS, Int32, address_space=AddressSpace.SHARED]()
    var word_pre = unsafe_stack_allocation[BITMAP_WORDS, Int32, address_space=AddressSpace.SHARED]()
    comptime WIN = BITMAP_WORDS * 32
    comptime PER = BITMAP_WORDS // SORT_THREADS
    var written = 0
    var w_lo = t_lo
    while w_lo < t_hi and written < n:
        for i in range(tid, BITMAP_WORDS, SORT_THREADS):
            bits[unsafe_offset=i] = 0
        barrier()
        for i0 in range(tid, n, SORT_THREADS * SORT_UNROLL):
            var ev = _load_entries(src, i0, n)
            comptime for u in range(SORT_UNROLL):
                var t = Int(ev[u]) // K - w_lo
                if ev[u] >= 0 and t >= 0 and t < WIN:
                    # each query appears once per row: adding the bit is an OR
                    _ = Atomic.fetch_add[ordering=Ordering.RELAXED](bits.unsafe_offset(t // 32), Int32(1) << Int32(t % 32))
        barrier()
        var mine = 0
        comptime for k in range(PER):
            mine += Int(pop_count(bits[unsafe_offset=tid * PER + k]))
        part[unsafe_offset=tid] = Int32(mine)
        barrier()
        var off = 1
        while off < SORT_THREADS:
            var a = part[unsafe_offset=tid]
            if tid >= off:
                a += part[unsafe_offset=tid - off]
            barrier()
            part[unsafe_offset=tid] = a
            barrier()
            off *= 2
        # each word's exclusive prefix; an entry's place is its query's rank in
        # the window: the words before it plus the bits below it in its word
        var run = Int(part[unsafe_offset=tid]) - mine
        comptime for k in range(PER):
            word_pre[unsafe_offset=tid * PER + k] = Int32(run)
            run += Int(pop_count(bits[unsafe_offset=tid * PER + k]))
        var win_total = Int(part[unsafe_offset=SORT_THREADS - 1])
        barrier()
        for i0 in range(tid, n, SORT_THREADS * SORT_UNROLL):
            var ev = _load_entries(src, i0, n)
            comptime for u in range(SORT_UNROLL):
                var e = ev[u]
                var t = Int(e) // K - w_lo
                if e >= 0 and t >= 0 and t < WIN:
                    var below = bits[unsafe_offset=t // 32] & ((Int32(1) << Int32(t % 32)) - 1)
                    dst[unsafe_offset=written + Int(word_pre[unsafe_offset=t // 32]) + Int(pop_count(below))] = e
        written += win_total
        w_lo += WIN
        barrier()


def _invert_cpu[init_blocks: Int, local_blocks: Int](
    row_offsets: I32MutPtr, row_ptr: I32MutPtr, entries: I32MutPtr, work: I32MutPtr,
    num_work: I32MutPtr, counts: I32MutPtr, block_ids: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr,
    num_seqs: Int, num_groups: Int, T: Int, topk: Int, block_size: Int, r_max: Int, q_budget: Int,
):
    """Stable counting sort by row, walking queries in order; then the work
    list in its order (windows, serpentine rows), a cursor per row."""
    var acc = 0
    row_offsets[unsafe_offset=0] = 0
    for b in range(num_seqs):
        acc += blocks_of(Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b]), block_size)
        row_offsets[unsafe_offset=b + 1] = Int32(acc)
    var nent = T * topk
    var nw = 0
    for g in range(num_groups):
        var cnt = counts.unsafe_offset(g * r_max)
        for r in range(r_max):
            cnt[unsafe_offset=r] = 0
        for b in range(num_seqs):
            for t in range(Int(cu_q[unsafe_offset=b]), Int(cu_q[unsafe_offset=b + 1])):
                var f = Forced(position_of(cu_q, cu_k, b, t), block_size, init_blocks, local_blocks)
                for s in range(topk):
                    var j = Int(block_ids[unsafe_offset=(g * T + t) * topk + s])
                    if not _skipped[init_blocks, local_blocks](j, f):
                        cnt[unsafe_offset=Int(row_offsets[unsafe_offset=b]) + j] += 1
        var rp = row_ptr.unsafe_offset(g * (r_max + 1))
        var run = 0
        for r in range(r_max):
            rp[unsafe_offset=r] = Int32(run)
            run += Int(cnt[unsafe_offset=r])
            cnt[unsafe_offset=r] = 0  # reused as the fill cursor below
        rp[unsafe_offset=r_max] = Int32(run)
        var ent = entries.unsafe_offset(g * nent)
        for i in range(run, nent):
            ent[unsafe_offset=i] = -1
        for b in range(num_seqs):
            for t in range(Int(cu_q[unsafe_offset=b]), Int(cu_q[unsafe_offset=b + 1])):
                var f = Forced(position_of(cu_q, cu_k, b, t), block_size, init_blocks, local_blocks)
                for s in range(topk):
                    var j = Int(block_ids[unsafe_offset=(g * T + t) * topk + s])
                    if not _skipped[init_blocks, local_blocks](j, f):
                        var r = Int(row_offsets[unsafe_offset=b]) + j
                        var pos = Int(rp[unsafe_offset=r]) + Int(cnt[unsafe_offset=r])
                        cnt[unsafe_offset=r] += 1
                        ent[unsafe_offset=pos] = Int32(t * topk + s)
        # work items: each row's entries cut at the query windows, in work order
        var win = WINDOW_CHUNKS * q_budget
        for r in range(r_max):
            cnt[unsafe_offset=r] = rp[unsafe_offset=r]  # the row's next entry
        for i in range(ceildiv(T, win) * r_max):
            var wr = _order_row(i, r_max)
            var r = wr[1]
            var b0 = Int(cnt[unsafe_offset=r])
            var b1 = b0
            while b1 < Int(rp[unsafe_offset=r + 1]) and Int(ent[unsafe_offset=b1]) // topk < (wr[0] + 1) * win:
                b1 += 1
            cnt[unsafe_offset=r] = Int32(b1)
            var c0 = b0
            while c0 < b1:
                var w = work.unsafe_offset(nw * 4)
                w[unsafe_offset=0] = Int32(g)
                w[unsafe_offset=1] = Int32(r)
                w[unsafe_offset=2] = Int32(c0)
                w[unsafe_offset=3] = Int32(min(q_budget, b1 - c0))
                nw += 1
                c0 += q_budget
    num_work[unsafe_offset=0] = Int32(nw)


@register("msa_invert")
struct MSAInvert:
    @staticmethod
    def execute[
        target: StaticString,
        topk: Int,
        block_size: Int,
        q_budget: Int,
        init_blocks: Int = 0,
        local_blocks: Int = 0,
    ](
        row_offsets: OutputTensor[dtype=DType.int32, rank=1, ...],
        row_ptr: OutputTensor[dtype=DType.int32, rank=2, ...],
        entries: OutputTensor[dtype=DType.int32, rank=2, ...],
        work: OutputTensor[dtype=DType.int32, rank=2, ...],
        num_work: OutputTensor[dtype=DType.int32, rank=1, ...],
        scratch: OutputTensor[dtype=DType.int32, rank=1, ...],
        block_ids: InputTensor[dtype=DType.int32, rank=3, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var G = block_ids.dim_size(0)
        var T = block_ids.dim_size(1)
        var B = cu_seqlens_q.dim_size(0) - 1
        var R = row_ptr.dim_size(1) - 1
        var nent = T * topk
        if block_ids.dim_size(2) != topk:
            raise Error("msa_invert: block_ids must have topk slots")
        if entries.dim_size(1) != nent or row_ptr.dim_size(0) != G or work.dim_size(1) != 4:
            raise Error("msa_invert: output shapes do not match block_ids")
        var NW = ceildiv(T, WINDOW_CHUNKS * q_budget)
        if work.dim_size(0) < G * (NW * R + nent // q_budget):
            raise Error("msa_invert: work has fewer rows than Hkv * (NW * R_max + T * topk // q_budget)")
        if scratch.dim_size(0) < G * ((2 * NW + 1) * R + nent + 1):
            raise Error("msa_invert: scratch too small")
        var wcounts = scratch.unsafe_ptr()  # then the windows' starts
        var cursor = wcounts.unsafe_offset(G * NW * R)
        var work_off = cursor.unsafe_offset(G * R)
        var unsorted = work_off.unsafe_offset(G * NW * R)
        var group_items = unsorted.unsafe_offset(G * nent)
        comptime if is_cpu[target]():
            _invert_cpu[init_blocks, local_blocks](
                row_offsets.unsafe_ptr(), row_ptr.unsafe_ptr(), entries.unsafe_ptr(), work.unsafe_ptr(),
                num_work.unsafe_ptr(), cursor, block_ids.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(),
                cu_seqlens_k.unsafe_ptr(), B, G, T, topk, block_size, R, q_budget,
            )
        else:
            var total = G * nent
            var nq = G * T  # one thread per (g, t) query in count and scatter
            ctx.enqueue_function[_row_offsets_kernel](
                row_offsets.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), Int32(B), Int32(block_size),
                grid_dim=1, block_dim=32,
            )
            ctx.enqueue_memset(scratch.to_device_buffer(ctx), Int32(0))
            ctx.enqueue_memset(entries.to_device_buffer(ctx), Int32(-1))
            if total > 0:
                ctx.enqueue_function[_count_kernel[init_blocks, local_blocks]](
                    wcounts, block_ids.unsafe_ptr(), row_offsets.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(),
                    cu_seqlens_k.unsafe_ptr(), Int32(B), Int32(T), Int32(topk), Int32(R), Int32(nq), Int32(block_size),
                    Int32(WINDOW_CHUNKS * q_budget), Int32(NW),
                    grid_dim=ceildiv(nq, 256), block_dim=256,
                )
            ctx.enqueue_function[_scan_kernel](
                row_ptr.unsafe_ptr(), work_off, group_items, wcounts,
                Int32(G), Int32(R), Int32(q_budget), Int32(NW),
                grid_dim=max(G, 1), block_dim=SCAN_THREADS,
            )
            ctx.enqueue_function[_window_starts_kernel](
                wcounts, num_work.unsafe_ptr(), row_ptr.unsafe_ptr(), group_items, Int32(G), Int32(R), Int32(NW),
                grid_dim=max(ceildiv(G * R, 256), 1), block_dim=256,
            )
            if total > 0 and R > 0:
                ctx.enqueue_function[_scatter_kernel[init_blocks, local_blocks]](
                    unsorted, cursor, row_ptr.unsafe_ptr(), block_ids.unsafe_ptr(), row_offsets.unsafe_ptr(),
                    cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), Int32(B), Int32(T), Int32(topk), Int32(R),
                    Int32(nq), Int32(block_size),
                    grid_dim=ceildiv(nq, 256), block_dim=256,
                )
                ctx.enqueue_function[_sort_rows_kernel](
                    entries.unsafe_ptr(), work.unsafe_ptr(), unsorted, row_ptr.unsafe_ptr(), work_off, group_items,
                    wcounts, row_offsets.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(),
                    Int32(B), Int32(T), Int32(topk), Int32(R), Int32(q_budget), Int32(NW),
                    grid_dim=G * R, block_dim=SORT_THREADS,
                )


def _seq_offsets_kernel(cu: I32MutPtr, seq_lens: I32Ptr, num_seqs: Int32):
    """cu[b] = seq_lens[0] + ... + seq_lens[b - 1], one thread (B is small)."""
    if thread_idx.x == 0 and block_idx.x == 0:
        var acc = Int32(0)
        cu[unsafe_offset=0] = 0
        for b in range(Int(num_seqs)):
            acc += seq_lens[unsafe_offset=b]
            cu[unsafe_offset=b + 1] = acc


@register("msa_seq_offsets")
struct MSASeqOffsets:
    """Prefix sums [B+1] of the paged sequences' lengths seq_lens [B]: the
    cu_seqlens_k every kernel takes for lengths and block rows (a paged
    cache addresses its keys through the page table, not these offsets)."""

    @staticmethod
    def execute[target: StaticString](
        cu: OutputTensor[dtype=DType.int32, rank=1, ...],
        seq_lens: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var B = seq_lens.dim_size(0)
        if cu.dim_size(0) != B + 1:
            raise Error("msa_seq_offsets: cu must have B + 1 entries")
        comptime if is_cpu[target]():
            _seq_offsets_kernel_cpu(cu.unsafe_ptr(), seq_lens.unsafe_ptr(), B)
        else:
            ctx.enqueue_function[_seq_offsets_kernel](cu.unsafe_ptr(), seq_lens.unsafe_ptr(), Int32(B), grid_dim=1,
                                                      block_dim=32)


def _seq_offsets_kernel_cpu(cu: I32MutPtr, seq_lens: I32Ptr, num_seqs: Int):
    var acc = Int32(0)
    cu[unsafe_offset=0] = 0
    for b in range(num_seqs):
        acc += seq_lens[unsafe_offset=b]
        cu[unsafe_offset=b + 1] = acc
