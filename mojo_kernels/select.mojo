# MSA.md steps 1-3: index scores, block max-pool, forcing of sinks and local
# blocks, top-k per (query, KV group), ascending ids, -1 padding.
#
# For a query at key position p (own block jq = p // block_size):
#   sinks  [0, nsink)          nsink = min(init_blocks, jq + 1)
#   free   [nsink, local_lo)   scored and ranked (ties to the lower id)
#   locals [local_lo, jq]      local_lo = max(nsink, jq - local_blocks + 1)
# Forced blocks rank first (sinks before locals), so the answer is
#   sinks ++ sorted(top (topk - forced) of free) ++ locals,
# or, when the forced blocks alone fill topk, the first topk of sinks ++ locals.
# Free blocks are scanned in ascending id and enter the running top-k only
# when strictly better than its worst member (the worst of equal scores being
# the highest id): that is the tie rule. NaN scores never win a comparison,
# so they act as -inf; every written id lies in [0, jq].
#
# GPU: one thread block per tile of queries of one sequence, all KV groups
# together (256 (query, group) rows on Hopper, 128 elsewhere), so each
# index-key block is loaded once for all of them; heaviest tiles (latest
# queries) first. Each row keeps its
# running top-k in shared memory, owned by one thread. No [T, blocks] score
# matrix exists anywhere.
#   mma  (bf16/fp16): the 128 x block_size score tile of each key block is
#        computed on tensor cores, K blocks loaded by cp.async; the block
#        max-pool happens in registers (a quad shuffle per row).
#        Hopper (sm_9x): two warpgroups of 2 x 64 rows, each 64-row half one
#        chain of wgmma.mma_async m64 x block_size x 16 reading Q and K
#        straight from shared memory (128B-swizzled 64-column panels where
#        Di allows, else the no-swizzle canonical layout of 8 x 8 core
#        matrices), K in a ring of 4 buffers; half 1 of the previous block
#        is pooled and ranked while half 0's chain runs. With Di a multiple
#        of 64 one thread loads each K block as TMA boxes and full/empty
#        mbarriers pace the ring, so the warpgroups drift apart and one
#        ranks while the other's chains run; otherwise cp.async and one
#        barrier per block.
#        Other GPUs: mma.sync m16n8k16, Q fragments kept in registers, K
#        double-buffered.
#   simt (fp32, and index dims that are not tensor-core shapes): scores
#        chunk by chunk from shared memory.
# Every path applies idx_scale to the unscaled block max (it is > 0, so it
# commutes with max): scores that tie exactly stay tied, and the tie rule
# decides, as in the reference.

from std.math import ceildiv, iota
from std.memory import unsafe_stack_allocation

from max.algorithm import sync_parallelize

from extensibility import InputTensor, OutputTensor, register
from std.sys import size_of

from max.gpu import WARP_SIZE, barrier, block_idx, lane_id, thread_idx
from max.gpu.compute.mma import mma, wgmma_wait_group_sync
from max.gpu.host import DeviceBuffer, DeviceContext, FuncAttribute
from max.gpu.host.info import is_cpu
from max.gpu.host.nvidia.tma import TMADescriptor, TensorMapSwizzle, create_tma_descriptor
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, cp_async_bulk_tensor_shared_cluster_global,
    external_memory, fence_async_view_proxy, fence_mbarrier_init,
)
from max.gpu.primitives import warp
from layout.tma_async import SharedMemBarrier
from std.sys.info import _is_sm_9x
from std.utils.index import Index

from .cpu_tiles import (
    CPU_R, CPU_W, F32Buf, FVec, IntBuf, int_scratch, mm_tile, pack_rows, pack_transposed, padded, release, scratch,
    tile_cols,
)
from .common import (
    I64Ptr, KVAddr, idx_addr, LAYOUT_CORE, LAYOUT_PADDED, LAYOUT_SW128, SMEM_OPTIN_BYTES, F32Ptr, Forced, I32MutPtr, I32Ptr, blocks_of,
    cache_element, f32_neg_inf, frag_a, frag_b2, hopper_target, score_tile_wgmma, seq_of, sw128_cols, tile_offset,
    wgmma_acc_fence,
)

comptime SEL_ROWS = 64  # (query, group) rows per tile
comptime SEL_SUB = 4  # threads per row
comptime SEL_THREADS = SEL_ROWS * SEL_SUB
comptime SEL_KC = 32  # keys per shared-memory chunk


@always_inline
def _topk_insert[
    space: AddressSpace, cap: Int
](
    sc: Pointer[Float32, MutUntrackedOrigin, address_space=space],
    ids: Pointer[Int32, MutUntrackedOrigin, address_space=space],
    mut cnt: Int,
    mut worst: Int,
    kfree: Int,
    s: Float32,
    j: Int,
):
    """Running top-kfree in a list of cap (>= kfree) slots: fill, then
    replace the worst when strictly better."""
    if cnt < kfree:
        sc[unsafe_offset=cnt] = s
        ids[unsafe_offset=cnt] = Int32(j)
        cnt += 1
        if cnt < kfree:
            return
    elif s > sc[unsafe_offset=worst]:
        sc[unsafe_offset=worst] = s
        ids[unsafe_offset=worst] = Int32(j)
    else:
        return
    # recompute the worst: lowest score, ties -> highest id. Every slot is
    # loaded up front (unrolled, independent loads; the slots past kfree are
    # ignored), so the scan waits for one memory latency instead of kfree
    # dependent ones: on a GPU it ran every time a block entered a list.
    var wv = sc[unsafe_offset=0]
    var wi = ids[unsafe_offset=0]
    var wpos = 0
    comptime for i in range(1, cap):
        var a = sc[unsafe_offset=i]
        var ai = ids[unsafe_offset=i]
        if i < kfree and (a < wv or (not (a > wv) and ai > wi)):
            wv = a
            wi = ai
            wpos = i
    worst = wpos


@always_inline
def _write_selection[
    space: AddressSpace, topk: Int
](
    out_row: I32MutPtr,
    f: Forced,
    ids: Pointer[Int32, MutUntrackedOrigin, address_space=space],
    cnt: Int,
):
    """sinks ++ sorted(ids[:cnt]) ++ locals, truncated to topk, -1 padded."""
    # insertion sort of the chosen free ids (at most topk of them)
    for i in range(1, cnt):
        var x = ids[unsafe_offset=i]
        var k = i - 1
        while k >= 0 and ids[unsafe_offset=k] > x:
            ids[unsafe_offset=k + 1] = ids[unsafe_offset=k]
            k -= 1
        ids[unsafe_offset=k + 1] = x
    var n = 0
    for j in range(f.nsink):
        if n < topk:
            out_row[unsafe_offset=n] = Int32(j)
            n += 1
    var nlocal = f.jq + 1 - f.local_lo
    var room = topk - f.nsink - nlocal  # free slots; <= 0 when forcing fills topk
    for i in range(min(cnt, max(room, 0))):
        out_row[unsafe_offset=n] = ids[unsafe_offset=i]
        n += 1
    for j in range(f.local_lo, f.jq + 1):
        if n < topk:
            out_row[unsafe_offset=n] = Int32(j)
            n += 1
    for i in range(n, topk):
        out_row[unsafe_offset=i] = -1


@always_inline
def block_max_cpu[dtype: DType, kdt: DType, idx_dim: Int](
    qrow: Pointer[Scalar[dtype], ImmutAnyOrigin], kblock: Pointer[Scalar[kdt], ImmutAnyOrigin], key_stride: Int,
    nvis: Int,
) -> Float32:
    """Unscaled max of <qrow, key> over a block's first nvis keys (kblock: its
    first key, keys key_stride apart); -inf when none is visible, and NaN
    never wins (idx_scale > 0 is applied after the max). One row, scalar: for
    the few decode queries past the score pass's max_q."""
    var m = f32_neg_inf()
    for key in range(nvis):
        var krow = kblock.unsafe_offset(key * key_stride)
        var s = Float32(0)
        for d in range(idx_dim):
            s += qrow[unsafe_offset=d].cast[DType.float32]() * krow[unsafe_offset=d].cast[DType.float32]()
        if s > m:
            m = s
    return m


@always_inline
def tile_block_max[idx_dim: Int, block_size: Int](
    qs: F32Buf, kt: F32Buf, key0: Int, pos: IntBuf, bm: F32Buf
):
    """CPU: folds the unscaled index scores of CPU_R rows (qs [CPU_R][Di] fp32)
    against one key block (kt [Di][BS_pad], K^T, its first key at position
    key0) into their block maxima bm[r], over the keys at positions <= pos[r]
    only; NaN never wins."""
    comptime BP = padded(block_size)
    comptime NVK = tile_cols(BP)
    comptime KC = NVK * CPU_W
    var p_last = pos[unsafe_offset=0]
    comptime for r in range(1, CPU_R):
        p_last = max(p_last, pos[unsafe_offset=r])
    var lanes = iota[DType.int32, CPU_W]()
    for c in range(0, block_size, KC):
        if key0 + c > p_last:
            break
        var acc = mm_tile[CPU_R, NVK](qs, idx_dim, kt.unsafe_offset(c), BP, idx_dim)
        comptime for r in range(CPU_R):
            var m = FVec(f32_neg_inf())
            var lim = pos[unsafe_offset=r] - key0 - c  # last visible column of this chunk
            comptime for v in range(NVK):
                var x = acc[r * NVK + v]
                var take = x.gt(m)  # false for NaN
                if lim < (v + 1) * CPU_W - 1:
                    take &= (lanes + Int32(v * CPU_W)).le(SIMD[DType.int32, CPU_W](Int32(lim)))
                m = take.select(x, m)
            var mr = m.reduce_max()
            if mr > bm[unsafe_offset=r]:
                bm[unsafe_offset=r] = mr


@always_inline
def topk_push(sc: F32Buf, ids: Pointer[Int32, MutUntrackedOrigin], mut cnt: Int, kfree: Int, s: Float32, j: Int):
    """CPU: a row's running top-kfree free blocks, best first (score
    descending; equal scores in the order they came, so ascending ids): block
    j enters when the list has room or is strictly better than the last, and
    takes its place by one backward shift; nothing is rescanned. Blocks
    offered in ascending id give the tie rule; a NaN score never moves up
    (NaN counts as -inf)."""
    var i: Int
    if cnt < kfree:
        i = cnt
        cnt += 1
    elif kfree > 0 and s > sc[unsafe_offset=cnt - 1]:
        i = cnt - 1
    else:
        return
    while i > 0 and s > sc[unsafe_offset=i - 1]:
        sc[unsafe_offset=i] = sc[unsafe_offset=i - 1]
        ids[unsafe_offset=i] = ids[unsafe_offset=i - 1]
        i -= 1
    sc[unsafe_offset=i] = s
    ids[unsafe_offset=i] = Int32(j)


comptime SEL_CPU_TILES = 4  # register tiles of rows per CPU task: they share each K chunk while it is in L1


def _select_cpu[
    dtype: DType, idx_dim: Int, topk: Int, block_size: Int, init_blocks: Int, local_blocks: Int, paged: Bool
](
    block_ids: I32MutPtr,
    q_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    cu_q: I32Ptr,
    cu_k: I32Ptr,
    scale: Float32,
    num_seqs: Int,
    num_groups: Int,
    T: Int,
    ka: KVAddr,
):
    """The CPU indexer: every sequence's index keys transposed once into
    blocks of K^T (fp32), then tasks of SEL_CPU_TILES * CPU_R consecutive
    (query, group) rows of one sequence, in parallel: each sweeps its free
    blocks on register tiles (tile_block_max) and keeps each row's top-k
    (TopKList); scores tie exactly as the reference's (unscaled fp32 sums,
    scaled after the max)."""
    comptime DI = idx_dim
    comptime BP = padded(block_size)
    comptime ROWS = SEL_CPU_TILES * CPU_R
    var roff = int_scratch(num_seqs + 1)  # first block row of each sequence
    var toff = int_scratch(num_seqs + 1)  # first task of each sequence
    roff[unsafe_offset=0] = 0
    toff[unsafe_offset=0] = 0
    for b in range(num_seqs):
        var tq = Int(cu_q[unsafe_offset=b + 1]) - Int(cu_q[unsafe_offset=b])
        var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
        roff[unsafe_offset=b + 1] = roff[unsafe_offset=b] + blocks_of(tk, block_size)
        toff[unsafe_offset=b + 1] = toff[unsafe_offset=b] + ceildiv(tq * num_groups, ROWS)
    var R = roff[unsafe_offset=num_seqs]
    var kt = scratch(max(1, R) * DI * BP)

    def pack(row: Int) {kt, roff, k_idx, cu_k, num_seqs, ka}:
        var b = 0
        while row >= roff[unsafe_offset=b + 1]:
            b += 1
        var j = row - roff[unsafe_offset=b]
        var nk = min(block_size, Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b]) - j * block_size)
        pack_transposed[dtype](kt.unsafe_offset(row * DI * BP), BP, k_idx.unsafe_offset(ka.block[paged](cu_k, b, j, block_size)),
                               ka.key_stride, nk, DI)

    sync_parallelize(pack, R)

    def task(i: Int) {block_ids, q_idx, cu_q, cu_k, scale, num_seqs, num_groups, T, kt, roff, toff}:
        var b = 0
        while i >= toff[unsafe_offset=b + 1]:
            b += 1
        var q0 = Int(cu_q[unsafe_offset=b])
        var tq = Int(cu_q[unsafe_offset=b + 1]) - q0
        var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
        var row0 = q0 * num_groups + (i - toff[unsafe_offset=b]) * ROWS  # q_idx row (t * Hkv + g) of the task's first row
        var n = min(ROWS, (q0 + tq) * num_groups - row0)
        var buf = scratch(ROWS * (DI + 2 * topk + 1))
        var qs = buf
        var sc = qs.unsafe_offset(ROWS * DI)
        var ids = sc.unsafe_offset(ROWS * topk).unsafe_bitcast[Int32]()
        var bm = sc.unsafe_offset(2 * ROWS * topk)
        var pos = int_scratch(2 * ROWS)
        var cnt = pos.unsafe_offset(ROWS)
        pack_rows[dtype](qs, DI, q_idx.unsafe_offset(row0 * DI), DI, n, DI)
        var p_last = 0
        for r in range(ROWS):
            pos[unsafe_offset=r] = tk - tq + (row0 + r) // num_groups - q0 if r < n else -1
            cnt[unsafe_offset=r] = 0
            p_last = max(p_last, pos[unsafe_offset=r])
        var j_hi = p_last // block_size - local_blocks if local_blocks > 0 else p_last // block_size
        var kt_seq = kt.unsafe_offset(roff[unsafe_offset=b] * DI * BP)
        for j in range(init_blocks, j_hi + 1):
            for r in range(ROWS):
                bm[unsafe_offset=r] = f32_neg_inf()
            for rt in range(ceildiv(n, CPU_R)):
                tile_block_max[DI, block_size](qs.unsafe_offset(rt * CPU_R * DI), kt_seq.unsafe_offset(j * DI * BP),
                                               j * block_size, pos.unsafe_offset(rt * CPU_R), bm.unsafe_offset(rt * CPU_R))
            for r in range(n):
                var f = Forced(pos[unsafe_offset=r], block_size, init_blocks, local_blocks)
                if j >= f.nsink and j < f.local_lo:
                    var c = cnt[unsafe_offset=r]
                    topk_push(sc.unsafe_offset(r * topk), ids.unsafe_offset(r * topk), c, topk - f.num_forced(),
                              bm[unsafe_offset=r] * scale, j)
                    cnt[unsafe_offset=r] = c
        for r in range(n):
            var t = (row0 + r) // num_groups
            var g = (row0 + r) % num_groups
            var f = Forced(pos[unsafe_offset=r], block_size, init_blocks, local_blocks)
            _write_selection[topk=topk](block_ids.unsafe_offset((g * T + t) * topk), f, ids.unsafe_offset(r * topk),
                                        cnt[unsafe_offset=r])
        release(buf)
        release(pos)

    sync_parallelize(task, toff[unsafe_offset=num_seqs])
    release(kt)
    release(roff)
    release(toff)


@always_inline
def _tile_of(
    hdr: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    cu_q: I32Ptr, num_seqs: Int, tile: Int, qpt: Int,
):
    """hdr = (sequence, first query index) of a tile of qpt queries; (-1, 0) past
    the last tile. B is small next to T: one thread walks it."""
    var acc = 0
    hdr[unsafe_offset=0] = -1
    hdr[unsafe_offset=1] = 0
    for b in range(num_seqs):
        var n = ceildiv(Int(cu_q[unsafe_offset=b + 1]) - Int(cu_q[unsafe_offset=b]), qpt)
        if tile < acc + n:
            hdr[unsafe_offset=0] = Int32(b)
            hdr[unsafe_offset=1] = Int32((tile - acc) * qpt)
            return
        acc += n


def select_kernel[
    dtype: DType, idx_dim: Int, num_groups: Int, topk: Int, block_size: Int, init_blocks: Int, local_blocks: Int,
    paged: Bool,
](
    block_ids: I32MutPtr,
    q_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    cu_q: I32Ptr,
    cu_k: I32Ptr,
    scale_p: F32Ptr,
    num_seqs: Int32,
    T: Int32,
    table: I32Ptr,
    geom: I64Ptr,
):
    comptime QPT = max(1, SEL_ROWS // num_groups)  # queries per tile
    comptime ROWS = QPT * num_groups
    comptime DP = idx_dim + 1  # padded rows: conflict-free column walks
    comptime KC = min(SEL_KC, block_size)
    comptime KPT = KC // SEL_SUB  # keys per thread per chunk
    var tid = Int(thread_idx.x)
    var smem = external_memory[Float32, address_space=AddressSpace.SHARED, alignment=16]()
    var q_s = smem
    var k_s = smem.unsafe_offset(ROWS * DP)
    var sc_s = smem.unsafe_offset(ROWS * DP + KC * DP)
    var id_s = sc_s.unsafe_offset(ROWS * topk).unsafe_bitcast[Int32]()
    var hdr = unsafe_stack_allocation[2, Int32, address_space=AddressSpace.SHARED]()
    if tid == 0:
        _tile_of(hdr, cu_q, Int(num_seqs), Int(block_idx.x), QPT)
    barrier()
    var b = Int(hdr[unsafe_offset=0])
    if b < 0:
        return
    var i0 = Int(hdr[unsafe_offset=1])
    var q0 = Int(cu_q[unsafe_offset=b])
    var tq = Int(cu_q[unsafe_offset=b + 1]) - q0
    var k0 = Int(cu_k[unsafe_offset=b])
    var tk = Int(cu_k[unsafe_offset=b + 1]) - k0
    var scale = scale_p[unsafe_offset=0]
    var nq = min(QPT, tq - i0)
    # query tile, unscaled, in shared memory: row r = qi * num_groups + g.
    # idx_scale multiplies the block max, as in every other path: scaling q
    # first rounds each product differently, so blocks whose scores tie
    # exactly could come out unequal and break the tie rule.
    for i in range(tid, ROWS * idx_dim, SEL_THREADS):
        var r = i // idx_dim
        var d = i % idx_dim
        var qi = r // num_groups
        var v = Float32(0)
        if qi < nq:
            v = q_idx[unsafe_offset=(q0 + i0) * num_groups * idx_dim + i].cast[DType.float32]()
        q_s[unsafe_offset=r * DP + d] = v
    var r = tid // SEL_SUB
    var l = tid % SEL_SUB
    var qi = r // num_groups
    var valid = qi < nq
    var p = tk - tq + i0 + min(qi, nq - 1)
    var f = Forced(p, block_size, init_blocks, local_blocks)
    var kfree = topk - f.num_forced()
    var cnt = 0
    var worst = 0
    var my_sc = sc_s.unsafe_offset(r * topk)
    var my_id = id_s.unsafe_offset(r * topk)
    var p_max = tk - tq + i0 + nq - 1
    var jmax = p_max // block_size
    var j_hi = jmax - local_blocks if local_blocks > 0 else jmax  # last block free for some row
    var ka = idx_addr[paged, idx_dim](table, geom)
    for j in range(init_blocks, j_hi + 1):
        var m = f32_neg_inf()
        var kblock = ka.block[paged](cu_k, b, j, block_size)
        for c in range(block_size // KC):
            var kbase = j * block_size + c * KC
            if kbase > p_max:
                break
            barrier()  # the previous chunk is consumed
            for i in range(tid, KC * idx_dim, SEL_THREADS):
                var key = i // idx_dim
                var d = i % idx_dim
                var v = Float32(0)
                if kbase + key < tk:
                    v = k_idx[unsafe_offset=kblock + (c * KC + key) * ka.key_stride + d].cast[DType.float32]()
                k_s[unsafe_offset=key * DP + d] = v
            barrier()
            var acc = SIMD[DType.float32, KPT](0)
            for d in range(idx_dim):
                var qv = q_s[unsafe_offset=r * DP + d]
                comptime for kk in range(KPT):
                    acc[kk] += qv * k_s[unsafe_offset=(l + SEL_SUB * kk) * DP + d]
            comptime for kk in range(KPT):
                if kbase + l + SEL_SUB * kk <= p and acc[kk] > m:
                    m = acc[kk]
        # block max across the SUB threads of the row (consecutive lanes)
        m = max(m, warp.shuffle_xor(m, 1))
        m = max(m, warp.shuffle_xor(m, 2))
        if l == 0 and valid and kfree > 0 and j >= f.nsink and j < f.local_lo:
            _topk_insert[cap=topk](my_sc, my_id, cnt, worst, kfree, m * scale, j)
    if l == 0 and valid:
        var g = r % num_groups
        var t = q0 + i0 + qi
        _write_selection[topk=topk](block_ids.unsafe_offset((g * Int(T) + t) * topk), f, my_id, cnt)


comptime SEL_MMA_ROWS = 128  # (query, group) rows per tile, 16 per warp: each K block serves 128 rows
comptime SEL_MMA_THREADS = 8 * WARP_SIZE


def select_mma_supported[dtype: DType, idx_dim: Int, block_size: Int]() -> Bool:
    return (
        (dtype == DType.bfloat16 or dtype == DType.float16)
        and idx_dim % 16 == 0
        and idx_dim <= 256
        and block_size % 16 == 0
        and block_size <= 128
    )


@always_inline
def _pool_and_rank[BS: Int, topk: Int](
    acc: SIMD[DType.float32, BS // 2],
    j: Int, pos0: Int, pos1: Int, t2: Int, lane: Int, my_valid: Bool, f: Forced, kfree: Int, scale: Float32,
    my_sc: Pointer[Float32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    my_id: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    mut cnt: Int,
    mut worst: Int,
    mut thr: Float32,
):
    """Block j's max over the keys rows r0 (at pos0) and r0 + 8 (at pos1) see,
    from this thread's accumulators (m16n8 layout), then the row owner's
    running top-k. Unscaled max (idx_scale > 0 commutes with it); NaN never
    wins: maxNum drops it, comparisons are false. thr: the list's worst score
    once it is full, kept in a register so a block that does not enter costs
    no shared-memory load."""
    var m0 = f32_neg_inf()
    var m1 = f32_neg_inf()
    if (j + 1) * BS <= min(pos0, pos1) + 1:  # the whole block is visible to both rows
        var a = SIMD[DType.float32, 4](f32_neg_inf())
        comptime for nj in range(BS // 8):
            a = max(a, acc.slice[4, offset=4 * nj]())
        m0 = max(a[0], a[1])
        m1 = max(a[2], a[3])
    else:
        comptime for nj in range(BS // 8):
            var key = j * BS + nj * 8 + t2
            var x = acc.slice[4, offset=4 * nj]()
            if key <= pos0 and x[0] > m0:
                m0 = x[0]
            if key + 1 <= pos0 and x[1] > m0:
                m0 = x[1]
            if key <= pos1 and x[2] > m1:
                m1 = x[2]
            if key + 1 <= pos1 and x[3] > m1:
                m1 = x[3]
    m0 = max(m0, warp.shuffle_xor(m0, 1))
    m0 = max(m0, warp.shuffle_xor(m0, 2))
    m1 = max(m1, warp.shuffle_xor(m1, 1))
    m1 = max(m1, warp.shuffle_xor(m1, 2))
    var sj = (m1 if lane % 4 == 1 else m0) * scale
    if my_valid and kfree > 0 and j >= f.nsink and j < f.local_lo and (cnt < kfree or sj > thr):
        _topk_insert[cap=topk](my_sc, my_id, cnt, worst, kfree, sj, j)
        if cnt == kfree:
            thr = my_sc[unsafe_offset=worst]


struct _RowRank(TrivialRegisterPassable):
    """One thread's share of a 16-row slice of a score tile: rows r0 and
    r0 + 8 of its accumulators (at key positions pos0, pos1), and the
    running top-k of the row it owns (lane % 4 == 0 owns r0, 1 owns r0 + 8;
    the others own none)."""

    var pos0: Int
    var pos1: Int
    var row: Int  # owned row of the tile (clamped into it when not valid)
    var valid: Bool
    var f: Forced
    var kfree: Int
    var cnt: Int
    var worst: Int
    var thr: Float32

    @always_inline
    def __init__(
        out self, r0: Int, lane: Int, nrows: Int, rows: Int, nq: Int, pos_first: Int, num_groups: Int,
        block_size: Int, init_blocks: Int, local_blocks: Int, topk: Int,
    ):
        """r0: the slice row of this lane's first accumulator; pos_first: key
        position of the tile's first query; nrows valid rows of `rows`."""
        self.pos0 = pos_first + min(r0 // num_groups, nq - 1)
        self.pos1 = pos_first + min((r0 + 8) // num_groups, nq - 1)
        var my_r = r0 + 8 * (lane % 4)
        self.valid = lane % 4 < 2 and my_r < nrows
        self.row = min(my_r, rows - 1)
        self.f = Forced(self.pos1 if lane % 4 == 1 else self.pos0, block_size, init_blocks, local_blocks)
        self.kfree = topk - self.f.num_forced()
        self.cnt = 0
        self.worst = 0
        self.thr = f32_neg_inf()

    @always_inline
    def rank[BS: Int, topk: Int](
        mut self, acc: SIMD[DType.float32, BS // 2], j: Int, t2: Int, lane: Int, scale: Float32,
        sc_s: Pointer[Float32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
        id_s: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    ):
        """Block j into the owned row's running top-k (see _pool_and_rank)."""
        _pool_and_rank[BS, topk](acc, j, self.pos0, self.pos1, t2, lane, self.valid, self.f, self.kfree, scale,
                           sc_s.unsafe_offset(self.row * topk), id_s.unsafe_offset(self.row * topk),
                           self.cnt, self.worst, self.thr)

    @always_inline
    def write[topk: Int](
        self, block_ids: I32MutPtr, id_s: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
        num_groups: Int, first_token: Int, T: Int,
    ):
        """The owned row's selection (first_token: the tile's first query token)."""
        if self.valid:
            var t = first_token + self.row // num_groups
            var g = self.row % num_groups
            _write_selection[topk=topk](
                block_ids.unsafe_offset((g * T + t) * topk), self.f, id_s.unsafe_offset(self.row * topk), self.cnt
            )


def select_tma_k[dtype: DType, idx_dim: Int, topk: Int, block_size: Int, wgmma: Bool]() -> Bool:
    """The wgmma sweep loads its K blocks through the TMA: one thread issues
    a block's 64-column panels (128B swizzle, the layout wgmma reads), and
    mbarriers replace the per-block barrier (Di a multiple of 64)."""
    return wgmma and idx_dim % sw128_cols[dtype]() == 0


@__llvm_arg_metadata(k_desc, `nvvm.grid_constant`)
def select_mma_kernel[
    dtype: DType, idx_dim: Int, num_groups: Int, topk: Int, block_size: Int, init_blocks: Int, local_blocks: Int,
    wgmma: Bool, paged: Bool,
](
    block_ids: I32MutPtr,
    q_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    cu_q: I32Ptr,
    cu_k: I32Ptr,
    scale_p: F32Ptr,
    num_seqs: Int32,
    T: Int32,
    num_tiles: Int32,
    k_desc: TMADescriptor,
    table: I32Ptr,
    geom: I64Ptr,
):
    comptime ROWS_CTA = select_rows[dtype, idx_dim, topk, block_size, wgmma]()  # tile rows (multiple of 64 per warpgroup)
    comptime QPT = max(1, ROWS_CTA // num_groups)
    comptime HALVES = ROWS_CTA // SEL_MMA_ROWS  # 64-row halves per warpgroup (wgmma: 2, 256 rows)
    comptime DI = idx_dim
    comptime BS = block_size
    comptime KS = DI + 8  # padded row stride: conflict-free ldmatrix
    comptime EB = size_of[dtype]()  # 2, or 1 for the FP8 indexer (e4m3 q_idx and k_idx)
    comptime CE = 16 // EB  # elements per 16-byte chunk
    comptime CPR = DI // CE  # 16-byte chunks per row
    comptime PC = sw128_cols[dtype]()  # columns per SW128 panel
    comptime WG = wgmma  # wgmma from shared memory (Hopper), else mma.sync
    # wgmma reads the 128B-swizzled layout where DI fills whole 64-column panels
    comptime LAY = (LAYOUT_SW128 if DI % PC == 0 else LAYOUT_CORE) if WG else LAYOUT_PADDED
    comptime assert EB == 2 or (WG and LAY == LAYOUT_SW128), "msa_select: e4m3 index inputs need wgmma and Di % 128 == 0"
    comptime assert not WG or _is_sm_9x(), "msa_select: wgmma needs sm_9x"
    comptime assert not WG or select_k_stages[dtype, idx_dim, topk, block_size, wgmma]() >= 3, "ring of 3+"
    comptime TMA_K = select_tma_k[dtype, idx_dim, topk, block_size, wgmma]() and not paged

    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    comptime K_STAGES = select_k_stages[dtype, idx_dim, topk, block_size, wgmma]()
    comptime K_LA = K_STAGES - 2  # blocks of K look-ahead in the wgmma sweep
    comptime K_ELEMS = BS * (DI if WG else KS)  # one K block in shared memory
    var smem = external_memory[Scalar[dtype], address_space=AddressSpace.SHARED, alignment=1024]()  # SW128 panels
    var q_s = smem
    var k_ring = smem.unsafe_offset(ROWS_CTA * (DI if WG else KS))
    var k_buf0 = k_ring
    var k_buf1 = k_ring.unsafe_offset(K_ELEMS)
    var sc_s = k_ring.unsafe_offset(K_STAGES * K_ELEMS).unsafe_bitcast[Float32]()
    var id_s = sc_s.unsafe_offset(ROWS_CTA * topk).unsafe_bitcast[Int32]()
    var hdr = unsafe_stack_allocation[2, Int32, address_space=AddressSpace.SHARED]()
    if tid == 0:  # heaviest tiles (latest queries) first
        _tile_of(hdr, cu_q, Int(num_seqs), Int(num_tiles) - 1 - Int(block_idx.x), QPT)
    barrier()
    var b = Int(hdr[unsafe_offset=0])
    if b < 0:
        return
    var i0 = Int(hdr[unsafe_offset=1])
    var q0 = Int(cu_q[unsafe_offset=b])
    var tq = Int(cu_q[unsafe_offset=b + 1]) - q0
    var k0 = Int(cu_k[unsafe_offset=b])
    var tk = Int(cu_k[unsafe_offset=b + 1]) - k0
    var scale = scale_p[unsafe_offset=0]
    var nq = min(QPT, tq - i0)
    var nrows = nq * num_groups
    var qg = q_idx.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var kg = k_idx.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    # query tile: row r = qi * num_groups + g is q_idx row (q0 + i0) * num_groups + r
    for i in range(tid, ROWS_CTA * CPR, SEL_MMA_THREADS):
        var r = i // CPR
        var c = (i % CPR) * CE
        if r < nrows:
            async_copy[16](qg.unsafe_offset(((q0 + i0) * num_groups + r) * DI + c), q_s.unsafe_offset(tile_offset[LAY, ROWS_CTA, DI, EB](r, c)))
        else:
            q_s.unsafe_store[alignment=16](tile_offset[LAY, ROWS_CTA, DI, EB](r, c), SIMD[dtype, CE](0))
    async_copy_commit_group()
    var p_max = tk - tq + i0 + nq - 1
    var jmax = p_max // BS
    var j_lo = init_blocks
    var j_hi = jmax - local_blocks if local_blocks > 0 else jmax  # last block free for some row

    var ka = idx_addr[paged, DI](table, geom)

    @always_inline
    def load_k(j: Int, dst: type_of(k_buf0)) {var tid, var kg, var tk, var ka, var cu_k, var b}:
        var base = ka.block[paged](cu_k, b, j, BS)
        for i in range(tid, BS * CPR, SEL_MMA_THREADS):
            var key = i // CPR
            var c = (i % CPR) * CE
            if j * BS + key < tk:
                async_copy[16](kg.unsafe_offset(base + key * ka.key_stride + c), dst.unsafe_offset(tile_offset[LAY, BS, DI, EB](key, c)))
            else:
                dst.unsafe_store[alignment=16](tile_offset[LAY, BS, DI, EB](key, c), SIMD[dtype, CE](0))

    # TMA_K: block j_lo + i lands in stage i % K_STAGES; k_full[s] completes
    # when its bytes have landed, k_empty[s] when all 8 warps have waited
    # for the chains that read it (one arrival each)
    var k_full = unsafe_stack_allocation[K_STAGES, SharedMemBarrier, address_space=AddressSpace.SHARED, alignment=8]()
    var k_empty = unsafe_stack_allocation[K_STAGES, SharedMemBarrier, address_space=AddressSpace.SHARED, alignment=8]()
    var k_desc_p = Pointer(to=k_desc).unsafe_bitcast[NoneType]()

    @always_inline
    def tma_k(i: Int) {var k_ring, var k_full, var k_desc_p, var k0, var j_lo}:
        """Block j_lo + i into stage i % K_STAGES (one thread)."""
        var st = i % K_STAGES
        k_full[unsafe_offset=st].expect_bytes(Int32(BS * DI * size_of[dtype]()))
        comptime for p in range(DI // PC):
            cp_async_bulk_tensor_shared_cluster_global(
                k_ring.unsafe_offset(st * K_ELEMS + p * BS * PC), k_desc_p, k_full.unsafe_offset(st),
                Index(p * PC, k0 + (j_lo + i) * BS),
            )

    comptime if TMA_K:
        if tid == 0:
            comptime for s in range(K_STAGES):
                k_full[unsafe_offset=s].init(1)
                k_empty[unsafe_offset=s].init(Int32(SEL_MMA_THREADS // WARP_SIZE))
            fence_mbarrier_init()
            comptime for i in range(K_LA):
                if j_lo + i <= j_hi:
                    tma_k(i)
        async_copy_wait_group(0)  # Q
        fence_async_view_proxy()  # cp.async and st.shared writes of Q -> visible to wgmma's async proxy
        barrier()  # and the mbarriers initialized
    elif WG:  # the first K_LA blocks, a group each (the loop waits for them)
        comptime for i in range(K_LA):
            if j_lo + i <= j_hi:
                load_k(j_lo + i, k_ring.unsafe_offset(((j_lo + i) % K_STAGES) * K_ELEMS))
            async_copy_commit_group()
    else:
        if j_lo <= j_hi:
            load_k(j_lo, k_buf0)
            async_copy_commit_group()
        async_copy_wait_group(0)
        barrier()
    # mma.sync: Q fragments stay in registers for the whole sweep
    var qa = Array[SIMD[dtype, 8], DI // 16](fill=SIMD[dtype, 8](0))
    comptime if not WG:
        comptime for kk in range(DI // 16):
            qa[kk] = frag_a[dtype, KS](q_s.unsafe_offset(wid * 16 * KS + kk * 16), lane)
    # rows of this thread's accumulators, per 64-row half h of its warpgroup:
    # r0 and r0 + 8 with r0 = 64 * (HALVES * warpgroup + h) + 16 * (warp % 4) + lane / 4
    var t2 = (lane % 4) * 2
    var pos_first = tk - tq + i0
    var r0_h0 = (wid // 4) * 64 * HALVES + (wid % 4) * 16 + lane // 4
    var rr0 = _RowRank(r0_h0, lane, nrows, ROWS_CTA, nq, pos_first, num_groups, BS, init_blocks, local_blocks, topk)
    var rr1 = _RowRank(r0_h0 + 64 if HALVES > 1 else r0_h0, lane, nrows, ROWS_CTA, nq, pos_first, num_groups, BS,
                       init_blocks, local_blocks, topk)
    comptime if WG:
        # Each warpgroup scores 2 x 64 rows against every K block, so a K
        # block read from L2 serves 256 rows (one accumulator set per half).
        # K sits in a ring of K_STAGES buffers, one barrier per block; block
        # j + K_LA is loaded into block j - 2's buffer, free once
        # both warpgroups have waited for its chains (each did, before the
        # barrier).
        comptime assert HALVES == 2, "the wgmma sweep pipelines two halves per warpgroup"
        var q_h0 = q_s.unsafe_offset(tile_offset[LAY, ROWS_CTA, DI, EB]((wid // 4) * 2 * 64, 0))
        var q_h1 = q_s.unsafe_offset(tile_offset[LAY, ROWS_CTA, DI, EB]((wid // 4) * 2 * 64 + 64, 0))
        var acc0 = SIMD[DType.float32, BS // 2](0)
        var acc1 = SIMD[DType.float32, BS // 2](0)

        @always_inline
        def next_block(j: Int) {var k_ring, var j_hi, var j_lo, var load_k, var tma_k, var k_full, var k_empty, var tid}:
            """Waits for block j's K, then starts block j + K_LA's."""
            comptime if TMA_K:
                # thread 0 refills the stage of block j - 2 once every warp is
                # done with it; the warps meet only there and at k_full, so a
                # warpgroup may run up to a block ahead of the other
                var i = j - j_lo
                var i2 = i + K_LA
                if tid == 0 and j + K_LA <= j_hi:
                    if i2 >= K_STAGES:
                        k_empty[unsafe_offset=i2 % K_STAGES].wait(UInt32((i2 // K_STAGES - 1) % 2))
                    tma_k(i2)
                k_full[unsafe_offset=i % K_STAGES].wait(UInt32((i // K_STAGES) % 2))
            else:
                async_copy_wait_group(Int32(K_LA - 1))  # block j (the K_LA - 1 after it may be in flight)
                fence_async_view_proxy()  # cp.async writes -> visible to wgmma's async proxy
                barrier()
                if j + K_LA <= j_hi:
                    load_k(j + K_LA, k_ring.unsafe_offset(((j + K_LA) % K_STAGES) * K_ELEMS))
                async_copy_commit_group()  # one group per iteration, empty or not

        @always_inline
        def kv_done(j: Int) {var k_empty, var j_lo, var lane}:
            """This warp's chains that read block j's K are complete."""
            comptime if TMA_K:
                if lane == 0:
                    _ = k_empty[unsafe_offset=(j - j_lo) % K_STAGES].arrive()

        # Per block: half 0 is issued, half 1 of the previous block (done)
        # is ranked while it runs, half 1 is issued, half 0 is awaited
        # (wait_group 1) and ranked while half 1 runs, then half 1 is
        # awaited. Every wait retires chains committed since the loop's
        # top: a wait_group 1 that retires a chain of the previous trip (the
        # deeper order) makes ptxas serialize every wgmma of the kernel
        # (C7514), as it did for v12 and v13. Block j_lo is peeled off so
        # that nothing in the loop is conditional around a wgmma (a
        # divergent-looking path makes ptxas serialize them too, C7518).
        @always_inline
        def k_stage(j: Int) {var k_ring, var j_lo} -> type_of(k_ring):
            comptime if TMA_K:
                return k_ring.unsafe_offset(((j - j_lo) % K_STAGES) * K_ELEMS)
            return k_ring.unsafe_offset((j % K_STAGES) * K_ELEMS)

        @always_inline
        def both_halves(j: Int, k_j: type_of(k_ring)) {
            mut acc0, mut acc1, mut rr0, var q_h1, var t2, var lane, var scale, var sc_s, var id_s, var kv_done
        }:
            """Block j's two chains, half 0 ranked under half 1."""
            acc1 = score_tile_wgmma[dtype, DI, BS, LAY, ROWS_CTA](q_h1, k_j, acc1)  # half 1 of block j
            wgmma_wait_group_sync[1]()  # half 0
            acc0 = wgmma_acc_fence(acc0)
            rr0.rank[BS, topk](acc0, j, t2, lane, scale, sc_s, id_s)  # while half 1 runs
            wgmma_wait_group_sync[0]()  # half 1
            acc1 = wgmma_acc_fence(acc1)
            kv_done(j)

        if j_lo <= j_hi:
            next_block(j_lo)
            var k_lo = k_stage(j_lo)
            acc0 = score_tile_wgmma[dtype, DI, BS, LAY, ROWS_CTA](q_h0, k_lo, acc0)
            both_halves(j_lo, k_lo)
            for j in range(j_lo + 1, j_hi + 1):
                var k_j = k_stage(j)
                next_block(j)
                acc0 = score_tile_wgmma[dtype, DI, BS, LAY, ROWS_CTA](q_h0, k_j, acc0)  # half 0 of block j
                rr1.rank[BS, topk](acc1, j - 1, t2, lane, scale, sc_s, id_s)  # while it runs
                both_halves(j, k_j)
            rr1.rank[BS, topk](acc1, j_hi, t2, lane, scale, sc_s, id_s)
        async_copy_wait_group(0)  # nothing left in flight (tiles with no free block never waited)
    else:
        for j in range(j_lo, j_hi + 1):
            var k_cur = k_buf0 if (j - j_lo) % 2 == 0 else k_buf1
            if j + 1 <= j_hi:
                load_k(j + 1, k_buf1 if (j - j_lo) % 2 == 0 else k_buf0)
                async_copy_commit_group()
                async_copy_wait_group(1)
            else:
                async_copy_wait_group(0)
            barrier()
            var s_acc = Array[SIMD[DType.float32, 4], BS // 8](fill=SIMD[DType.float32, 4](0))
            comptime for kk in range(DI // 16):
                comptime for nj2 in range(BS // 16):
                    var bv = frag_b2[dtype, KS](k_cur.unsafe_offset(nj2 * 16 * KS + kk * 16), lane)
                    var bh = bv.split()
                    var d0 = SIMD[DType.float32, 4](0)
                    mma(d0, qa[kk], bh[0], s_acc[2 * nj2])
                    s_acc[2 * nj2] = d0
                    var d1 = SIMD[DType.float32, 4](0)
                    mma(d1, qa[kk], bh[1], s_acc[2 * nj2 + 1])
                    s_acc[2 * nj2 + 1] = d1
            var acc = SIMD[DType.float32, BS // 2](0)
            comptime for nj in range(BS // 8):
                acc = acc.insert[offset=4 * nj](s_acc[nj])
            rr0.rank[BS, topk](acc, j, t2, lane, scale, sc_s, id_s)
            barrier()  # every warp is done with k_cur before it is refilled
    rr0.write[topk](block_ids, id_s, num_groups, q0 + i0, Int(T))
    comptime if HALVES > 1:
        rr1.write[topk](block_ids, id_s, num_groups, q0 + i0, Int(T))


def _select_mma_bytes[
    dtype: DType, idx_dim: Int, topk: Int, block_size: Int, wgmma: Bool, rows: Int, stages: Int
]() -> Int:
    comptime stride = idx_dim if wgmma else idx_dim + 8  # canonical layout / padded rows
    return (rows + stages * block_size) * stride * size_of[dtype]() + 8 * rows * topk


def select_wgmma_fits[dtype: DType, idx_dim: Int, topk: Int, block_size: Int]() -> Bool:
    """The wgmma sweep's tile (256 rows) with a ring of 3 K blocks fits in
    shared memory (else mma.sync)."""
    comptime rows = select_rows[dtype, idx_dim, topk, block_size, True]()
    return _select_mma_bytes[dtype, idx_dim, topk, block_size, True, rows, 3]() <= SMEM_OPTIN_BYTES


def select_rows[dtype: DType, idx_dim: Int, topk: Int, block_size: Int, wgmma: Bool]() -> Int:
    """(query, group) rows per tile: 256 for the wgmma sweep (each K block
    read from L2 serves twice the rows of the mma.sync kernel's 8 warps x 16)."""
    return 2 * SEL_MMA_ROWS if wgmma else SEL_MMA_ROWS


def select_k_stages[dtype: DType, idx_dim: Int, topk: Int, block_size: Int, wgmma: Bool]() -> Int:
    """K blocks in shared memory: for the pipelined wgmma sweep a ring of 4
    (two blocks of look-ahead), or 3 where 4 do not fit (its minimum);
    double buffering for mma.sync."""
    comptime if not wgmma:
        return 2
    comptime rows = select_rows[dtype, idx_dim, topk, block_size, True]()
    comptime if _select_mma_bytes[dtype, idx_dim, topk, block_size, True, rows, 4]() <= SMEM_OPTIN_BYTES:
        return 4
    return 3


def select_mma_smem_bytes[dtype: DType, idx_dim: Int, topk: Int, block_size: Int, wgmma: Bool]() -> Int:
    return _select_mma_bytes[
        dtype, idx_dim, topk, block_size, wgmma, select_rows[dtype, idx_dim, topk, block_size, wgmma](),
        select_k_stages[dtype, idx_dim, topk, block_size, wgmma](),
    ]()


def select_smem_bytes[idx_dim: Int, num_groups: Int, topk: Int, block_size: Int]() -> Int:
    comptime QPT = max(1, SEL_ROWS // num_groups)
    comptime ROWS = QPT * num_groups
    return 4 * (ROWS * (idx_dim + 1) + min(SEL_KC, block_size) * (idx_dim + 1) + 2 * ROWS * topk)


def _launch_select[
    dtype: DType, //, target: StaticString, topk: Int, block_size: Int, init_blocks: Int, local_blocks: Int,
    num_groups: Int, idx_dim: Int, paged: Bool,
](
    block_ids: I32MutPtr, q_idx: Pointer[Scalar[dtype], ImmutAnyOrigin], k_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    cu_q: I32Ptr, cu_k: I32Ptr, idx_scale: F32Ptr, table: I32Ptr, geom: I64Ptr, B: Int, T: Int, S: Int,
    ctx: DeviceContext,
) raises:
    """S: rows of the packed k_idx (for its TMA descriptor; unused when paged).
    uint8 q_idx and k_idx carry e4m3 bytes: the FP8 indexer (CPU, or wgmma
    on Hopper with Di a multiple of 128)."""
    comptime edt = cache_element[dtype]()
    var qe = q_idx.unsafe_bitcast[Scalar[edt]]()
    var ke = k_idx.unsafe_bitcast[Scalar[edt]]()
    comptime if is_cpu[target]():
        _select_cpu[edt, idx_dim, topk, block_size, init_blocks, local_blocks, paged](
            block_ids, qe, ke, cu_q, cu_k, idx_scale[unsafe_offset=0], B, num_groups, T,
            idx_addr[paged, idx_dim](table, geom),
        )
    elif edt == DType.float8_e4m3fn or select_mma_supported[dtype, idx_dim, block_size]():
        # wgmma on Hopper where its tile and K ring fit, mma.sync elsewhere
        comptime wgmma = hopper_target() and select_wgmma_fits[edt, idx_dim, topk, block_size]()
        comptime assert edt != DType.float8_e4m3fn or (wgmma and idx_dim % sw128_cols[edt]() == 0), (
            "msa_select: e4m3 index inputs need Hopper (wgmma) and Di a multiple of 128"
        )
        comptime QPT = max(1, select_rows[edt, idx_dim, topk, block_size, wgmma]() // num_groups)
        comptime smem = select_mma_smem_bytes[edt, idx_dim, topk, block_size, wgmma]()
        comptime assert smem <= SMEM_OPTIN_BYTES, "msa_select: idx_dim, block_size and topk need too much shared memory"
        comptime kernel = select_mma_kernel[
            edt, idx_dim, num_groups, topk, block_size, init_blocks, local_blocks, wgmma, paged
        ]
        var num_tiles = T // QPT + B
        var k_desc = TMADescriptor()  # unused unless the sweep takes K through the TMA
        comptime if select_tma_k[edt, idx_dim, topk, block_size, wgmma]() and not paged:
            # k_idx as [S, Di] rows; a box is one block of keys by one 128-byte panel
            var k_buf = DeviceBuffer[edt](ctx, ke.unsafe_mut_cast[True](), S * idx_dim, owning=False)
            k_desc = create_tma_descriptor[edt, 2, TensorMapSwizzle.SWIZZLE_128B](
                k_buf, Index(S, idx_dim), Index(idx_dim, 1), Index(block_size, sw128_cols[edt]())
            )
        ctx.enqueue_function[kernel](
            block_ids, qe, ke, cu_q, cu_k, idx_scale, Int32(B), Int32(T), Int32(num_tiles), k_desc, table, geom,
            grid_dim=num_tiles,
            block_dim=SEL_MMA_THREADS,
            shared_mem_bytes=smem,
            func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
        )
    else:
        comptime QPT = max(1, SEL_ROWS // num_groups)
        comptime smem = select_smem_bytes[idx_dim, num_groups, topk, block_size]()
        comptime kernel = select_kernel[dtype, idx_dim, num_groups, topk, block_size, init_blocks, local_blocks, paged]
        ctx.enqueue_function[kernel](
            block_ids, q_idx, k_idx, cu_q, cu_k, idx_scale, Int32(B), Int32(T), table, geom,
            grid_dim=T // QPT + B,
            block_dim=SEL_THREADS,
            shared_mem_bytes=smem,
            func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
        )


@register("msa_select")
struct MSASelect:
    @staticmethod
    def execute[
        dtype: DType,
        //,
        target: StaticString,
        topk: Int,
        block_size: Int,
        init_blocks: Int,
        local_blocks: Int,
        num_groups: Int,
        idx_dim: Int,
    ](
        block_ids: OutputTensor[dtype=DType.int32, rank=3, ...],
        q_idx: InputTensor[dtype=dtype, rank=3, ...],
        k_idx: InputTensor[dtype=dtype, rank=2, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        idx_scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q_idx.dim_size(0)
        var B = cu_seqlens_q.dim_size(0) - 1
        if q_idx.dim_size(1) != num_groups or q_idx.dim_size(2) != idx_dim or k_idx.dim_size(1) != idx_dim:
            raise Error("msa_select: q_idx must be [T, Hkv, Di] and k_idx [S, Di] with the op's Hkv and Di")
        if T == 0:
            return
        _launch_select[target, topk, block_size, init_blocks, local_blocks, num_groups, idx_dim, False](
            block_ids.unsafe_ptr(), q_idx.unsafe_ptr(), k_idx.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(),
            cu_seqlens_k.unsafe_ptr(), idx_scale.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(),
            idx_scale.unsafe_ptr().unsafe_bitcast[Int64](), B, T, k_idx.dim_size(0), ctx,
        )


@register("msa_select_paged")
struct MSASelectPaged:
    """msa_select over a paged index-key cache: k_idx_cache the flat storage
    of [num_pages, block_size, Di] (strides in geom), page_table [B,
    max_pages], cu_seqlens_k the prefix sums of the sequences' lengths."""

    @staticmethod
    def execute[
        dtype: DType,
        //,
        target: StaticString,
        topk: Int,
        block_size: Int,
        init_blocks: Int,
        local_blocks: Int,
        num_groups: Int,
        idx_dim: Int,
    ](
        block_ids: OutputTensor[dtype=DType.int32, rank=3, ...],
        q_idx: InputTensor[dtype=dtype, rank=3, ...],
        k_idx_cache: InputTensor[dtype=dtype, rank=1, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        page_table: InputTensor[dtype=DType.int32, rank=2, ...],
        geom: InputTensor[dtype=DType.int64, rank=1, ...],
        idx_scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q_idx.dim_size(0)
        var B = cu_seqlens_q.dim_size(0) - 1
        if q_idx.dim_size(1) != num_groups or q_idx.dim_size(2) != idx_dim:
            raise Error("msa_select_paged: q_idx must be [T, Hkv, Di] with the op's Hkv and Di")
        if T == 0:
            return
        _launch_select[target, topk, block_size, init_blocks, local_blocks, num_groups, idx_dim, True](
            block_ids.unsafe_ptr(), q_idx.unsafe_ptr(), k_idx_cache.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(),
            cu_seqlens_k.unsafe_ptr(), idx_scale.unsafe_ptr(), page_table.unsafe_ptr(), geom.unsafe_ptr(), B, T, 0, ctx,
        )
