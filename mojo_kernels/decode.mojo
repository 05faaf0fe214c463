# MSA.md steps 1-3 for decode: a few new queries per sequence (1 for plain
# decode, up to max_q for speculative drafts) against long caches of index keys.
#
# The prefill indexer tiles QUERIES (128 rows per thread block, each sweeping
# its sequence's keys); with one query per sequence its tiles sit nearly empty
# and one thread block would sweep a whole 128K cache alone. Here the work is
# split along the KEYS, so the pass is bound by reading k_idx once:
#   1. row offsets: the inversion's numbering of the blocks of all sequences;
#   2. scores: one thread block per DEC_BLOCKS consecutive block rows. Each
#      free block is scored for the first max_q queries x Hkv groups of its
#      sequence at once on tensor cores (keys in M from double-buffered
#      shared memory, (query, group) rows in N held in registers;
#      the same fp32 products as the prefill indexer), max-pooled per block,
#      and written to block_scores [Hkv, max_q, R_max]: one float per
#      (row, block), a few MB, never T x blocks for prefill-sized T.
#      With e4m3 queries and keys (the FP8 indexer) the pass is
#      decode_scores_fp8_kernel instead: a warp per block, mma.sync
#      m16n8k32 e4m3 on fragments loaded straight from global memory (the
#      contraction order permuted so each lane's bytes are contiguous), no
#      shared memory, no barrier;
#   3. top-k: one thread block per (query, group). Each thread keeps the
#      running top-k of a strided share of the free blocks (same insertion
#      rule as prefill, several score loads in flight), then kfree rounds of a
#      warp arg-max merge the lanes' sorted lists, and once more the warps'.
#      Queries past max_q in their sequence (allowed, only slower) score their
#      blocks in this kernel directly, a warp per block.
# The ids equal the reference's (forcing, tie rule, NaN as -inf).

from std.math import ceildiv
from std.memory import bitcast, unsafe_stack_allocation

from max.algorithm import sync_parallelize

from extensibility import InputTensor, OutputTensor, register
from std.sys import size_of

from max.gpu import WARP_SIZE, barrier, block_idx, lane_id, syncwarp, thread_idx
from max.gpu.compute.mma import mma
from max.gpu.host import DeviceContext, FuncAttribute
from max.gpu.host.info import is_cpu
from max.gpu.memory import AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory
from max.gpu.primitives import warp

from .common import (
    F32MutPtr, F32Ptr, Forced, I32MutPtr, I32Ptr, I64Ptr, blocks_of, f32_neg_inf, frag_a, frag_b2, idx_addr, seq_of,
    cache_element, stage_stride, widen_rows,
)
from .invert import _row_offsets_kernel
from .cpu_tiles import CPU_R, pack_rows, pack_transposed, padded, int_scratch, release, scratch
from .select import _topk_insert, _write_selection, block_max_cpu, select_mma_supported, tile_block_max, topk_push

comptime DEC_WARPS = 4
comptime DEC_THREADS = DEC_WARPS * WARP_SIZE
comptime DEC_BLOCKS = 16  # block rows per thread block of the score pass
comptime TOPK_WARPS = 4  # warps per (query, group) row in the top-k pass
comptime NO_ID = Int32(2147483647)
comptime TOPK_MAX = 40  # the top-k pass's per-thread lists live in static shared memory (48 KB); graph.DECODE_MAX_TOPK


@always_inline
def _score_offset(g: Int, i: Int, row: Int, max_q: Int, r_max: Int) -> Int:
    return (g * max_q + i) * r_max + row


@always_inline
def _free_range(tq: Int, tk: Int, block_size: Int, init_blocks: Int, local_blocks: Int) -> Tuple[Int, Int]:
    """[lo, hi] of the blocks some query of the sequence ranks by score."""
    var jmax = (tk - 1) // block_size  # the last query's own block
    return (init_blocks, jmax - local_blocks if local_blocks > 0 else jmax)


# ----------------------------------------------------------------------------- CPU
def _decode_select_cpu[
    dtype: DType, kdt: DType, idx_dim: Int, topk: Int, block_size: Int, init_blocks: Int, local_blocks: Int,
    max_q: Int, paged: Bool,
](
    block_ids: I32MutPtr,
    scores: F32MutPtr,
    roff: I32MutPtr,
    q_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k_idx: Pointer[Scalar[kdt], ImmutAnyOrigin],
    cu_q: I32Ptr, cu_k: I32Ptr, scale: Float32, num_seqs: Int, num_groups: Int, T: Int, r_max: Int,
    table: I32Ptr, geom: I64Ptr,
):
    """The GPU's two passes on the CPU's cores: block scores of the first
    max_q queries per sequence into `scores` (tasks of DEC_BLOCKS block rows,
    each block's keys transposed once and scored on register tiles against
    the sequence's (query, group) rows), then the top-k of each (query, group)
    row (tasks of rows; queries past max_q score their blocks there)."""
    comptime DI = idx_dim
    comptime BP = padded(block_size)
    roff[unsafe_offset=0] = 0
    for b in range(num_seqs):
        var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
        roff[unsafe_offset=b + 1] = roff[unsafe_offset=b] + Int32(blocks_of(tk, block_size))
    var R = Int(roff[unsafe_offset=num_seqs])
    var ROWS = ceildiv(max_q * num_groups, CPU_R) * CPU_R  # (query, group) rows scored per sequence

    var ka = idx_addr[paged, idx_dim](table, geom)

    def score_task(c: Int) {scores, roff, q_idx, k_idx, cu_q, cu_k, num_seqs, num_groups, r_max, R, ROWS, ka}:
        var buf = scratch(DI * BP + ROWS * (DI + 1))
        var kt = buf
        var qs = kt.unsafe_offset(DI * BP)
        var bm = qs.unsafe_offset(ROWS * DI)
        var pos = int_scratch(ROWS)
        var cur_b = -1
        var nr = 0
        for row in range(c * DEC_BLOCKS, min(R, (c + 1) * DEC_BLOCKS)):
            var b = seq_of(roff, num_seqs, row)
            while row >= Int(roff[unsafe_offset=b + 1]):  # past empty sequences
                b += 1
            var j = row - Int(roff[unsafe_offset=b])
            var q0 = Int(cu_q[unsafe_offset=b])
            var tq = Int(cu_q[unsafe_offset=b + 1]) - q0
            var k0 = Int(cu_k[unsafe_offset=b])
            var tk = Int(cu_k[unsafe_offset=b + 1]) - k0
            var fr = _free_range(tq, tk, block_size, init_blocks, local_blocks)
            if tq == 0 or j < fr[0] or j > fr[1]:
                continue
            if b != cur_b:  # the sequence's first max_q queries x groups, as rows
                cur_b = b
                nr = min(tq, max_q) * num_groups
                for i in range(ROWS * DI):
                    qs[unsafe_offset=i] = 0
                pack_rows[dtype](qs, DI, q_idx.unsafe_offset(q0 * num_groups * DI), DI, nr, DI)
                for r in range(ROWS):
                    pos[unsafe_offset=r] = tk - tq + r // num_groups if r < nr else -1
            pack_transposed[kdt](kt, BP, k_idx.unsafe_offset(ka.block[paged](cu_k, b, j, block_size)), ka.key_stride,
                                   min(block_size, tk - j * block_size), DI)
            for r in range(nr):
                bm[unsafe_offset=r] = f32_neg_inf()
            for rt in range(ceildiv(nr, CPU_R)):
                tile_block_max[DI, block_size](qs.unsafe_offset(rt * CPU_R * DI), kt, j * block_size,
                                               pos.unsafe_offset(rt * CPU_R), bm.unsafe_offset(rt * CPU_R))
            for r in range(nr):
                scores[unsafe_offset=_score_offset(r % num_groups, r // num_groups, row, max_q, r_max)] = bm[unsafe_offset=r]
        release(buf)
        release(pos)

    sync_parallelize(score_task, ceildiv(R, DEC_BLOCKS))
    comptime TOPK_CHUNK = 16  # (query, group) rows per top-k task

    def topk_task(c: Int) {block_ids, scores, roff, q_idx, k_idx, cu_q, cu_k, scale, num_seqs, num_groups, T, r_max,
                           ka}:
        var sc = unsafe_stack_allocation[topk, Float32]().unsafe_origin_cast[MutUntrackedOrigin]()
        var ids = unsafe_stack_allocation[topk, Int32]().unsafe_origin_cast[MutUntrackedOrigin]()
        for rr in range(c * TOPK_CHUNK, min(T * num_groups, (c + 1) * TOPK_CHUNK)):
            var t = rr // num_groups
            var g = rr % num_groups
            var b = seq_of(cu_q, num_seqs, t)
            var q0 = Int(cu_q[unsafe_offset=b])
            var tq = Int(cu_q[unsafe_offset=b + 1]) - q0
            var k0 = Int(cu_k[unsafe_offset=b])
            var tk = Int(cu_k[unsafe_offset=b + 1]) - k0
            var i = t - q0
            var p = tk - tq + i
            var f = Forced(p, block_size, init_blocks, local_blocks)
            var kfree = topk - f.num_forced()
            var cnt = 0
            if kfree > 0:
                for j in range(f.nsink, f.local_lo):
                    var m: Float32
                    if i < max_q:
                        m = scores[unsafe_offset=_score_offset(g, i, Int(roff[unsafe_offset=b]) + j, max_q, r_max)]
                    else:
                        m = block_max_cpu[dtype, kdt, idx_dim](
                            q_idx.unsafe_offset((t * num_groups + g) * idx_dim),
                            k_idx.unsafe_offset(ka.block[paged](cu_k, b, j, block_size)), ka.key_stride,
                            min(block_size, p - j * block_size + 1),
                        )
                    topk_push(sc, ids, cnt, kfree, m * scale, j)
            _write_selection[topk=topk](block_ids.unsafe_offset((g * T + t) * topk), f, ids, cnt)

    sync_parallelize(topk_task, ceildiv(T * num_groups, TOPK_CHUNK))


# ----------------------------------------------------------------------------- GPU, pass 2: scores
def decode_scores_kernel[
    dtype: DType, kdt: DType, idx_dim: Int, num_groups: Int, block_size: Int, init_blocks: Int, local_blocks: Int,
    max_q: Int, paged: Bool,
](
    scores: F32MutPtr,
    q_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k_idx: Pointer[Scalar[kdt], ImmutAnyOrigin],
    roff: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, num_seqs: Int32, r_max: Int32, table: I32Ptr, geom: I64Ptr,
):
    comptime DI = idx_dim
    comptime BS = block_size
    comptime KS = DI + 8  # padded row stride: conflict-free ldmatrix
    comptime WIDE = kdt == dtype  # else e4m3 keys, widened to dtype in shared memory (exact)
    comptime KE = 16 // size_of[kdt]()  # cache elements per 16-byte copy
    comptime KLS = stage_stride[kdt, dtype, DI]()  # row stride of the staged keys
    comptime CPR = DI // KE  # 16-byte chunks per row
    comptime NRP = ceildiv(max_q * num_groups, 8) * 8  # (query, group) rows, padded to the MMA N tile
    comptime NT = NRP // 8
    comptime MT = BS // 16  # 16-key m tiles per block
    comptime MTW = ceildiv(MT, DEC_WARPS)
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    var smem = external_memory[Scalar[dtype], address_space=AddressSpace.SHARED, alignment=128]()
    # FP8: [k_wide: BS x KS dtype, what the MMA reads][two e4m3 stages]; else the two stages are read directly
    var k_wide = smem
    var k_buf0 = smem.unsafe_offset(0 if WIDE else BS * KS).unsafe_bitcast[Scalar[kdt]]()
    var k_buf1 = k_buf0.unsafe_offset(BS * KLS)
    var red = k_buf1.unsafe_offset(BS * KLS).unsafe_bitcast[Float32]()  # [DEC_WARPS, NRP] warp maxima
    # this thread block's free blocks: (row, sequence, block) of up to DEC_BLOCKS rows
    var todo = unsafe_stack_allocation[DEC_BLOCKS * 3 + 1, Int32, address_space=AddressSpace.SHARED]()
    var cand = unsafe_stack_allocation[DEC_BLOCKS * 2, Int32, address_space=AddressSpace.SHARED]()
    var B = Int(num_seqs)
    var r0 = Int(block_idx.x) * DEC_BLOCKS
    if tid < DEC_BLOCKS:  # one thread per row: its sequence and block, -1 when not scored
        var r = r0 + tid
        var bb = -1
        var j = 0
        if r < Int(roff[unsafe_offset=B]):
            var b = seq_of(roff, B, r)
            while r >= Int(roff[unsafe_offset=b + 1]):  # past empty sequences
                b += 1
            j = r - Int(roff[unsafe_offset=b])
            var tq = Int(cu_q[unsafe_offset=b + 1]) - Int(cu_q[unsafe_offset=b])
            var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
            var fr = _free_range(tq, tk, BS, init_blocks, local_blocks)
            if tq > 0 and j >= fr[0] and j <= fr[1]:
                bb = b
        cand[unsafe_offset=2 * tid] = Int32(bb)
        cand[unsafe_offset=2 * tid + 1] = Int32(j)
    barrier()
    if tid == 0:  # compact (shared memory only)
        var n = 0
        for i in range(DEC_BLOCKS):
            if cand[unsafe_offset=2 * i] >= 0:
                todo[unsafe_offset=3 * n] = Int32(r0 + i)
                todo[unsafe_offset=3 * n + 1] = cand[unsafe_offset=2 * i]
                todo[unsafe_offset=3 * n + 2] = cand[unsafe_offset=2 * i + 1]
                n += 1
        todo[unsafe_offset=DEC_BLOCKS * 3] = Int32(n)
    barrier()
    var n = Int(todo[unsafe_offset=DEC_BLOCKS * 3])
    if n == 0:
        return
    var qg = q_idx.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var kg = k_idx.unsafe_address_space_cast[AddressSpace.GLOBAL]()

    var ka = idx_addr[paged, DI](table, geom)

    @always_inline
    def load_k(e: Int, dst: type_of(k_buf0)) {var tid, var kg, var todo, var cu_k, var ka}:
        var b = Int(todo[unsafe_offset=3 * e + 1])
        var j = Int(todo[unsafe_offset=3 * e + 2])
        var base = ka.block[paged](cu_k, b, j, BS)
        var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
        for i in range(tid, BS * CPR, DEC_THREADS):
            var key = i // CPR
            var c = (i % CPR) * KE
            if j * BS + key < tk:
                async_copy[16](kg.unsafe_offset(base + key * ka.key_stride + c), dst.unsafe_offset(key * KLS + c))
            else:
                dst.unsafe_store[alignment=16](key * KLS + c, SIMD[kdt, KE](0))

    load_k(0, k_buf0)
    async_copy_commit_group()
    # Q stays in registers (B operands, 16 k x 8 rows per fragment): shared
    # memory holds only the two K buffers, so three thread blocks fit per SM
    var qf = Array[SIMD[dtype, 4], NT * (DI // 16)](fill=SIMD[dtype, 4](0))
    var cur_b = -1
    var q0 = 0
    var tq = 0
    var tk = 0
    var nrows = 0
    var t2 = (lane % 4) * 2
    for e in range(n):
        var r = Int(todo[unsafe_offset=3 * e])
        var b = Int(todo[unsafe_offset=3 * e + 1])
        var j = Int(todo[unsafe_offset=3 * e + 2])
        if b != cur_b:  # uniform: a new sequence's (query, group) rows as MMA B fragments
            cur_b = b
            q0 = Int(cu_q[unsafe_offset=b])
            tq = Int(cu_q[unsafe_offset=b + 1]) - q0
            tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
            nrows = min(tq, max_q) * num_groups
            comptime for nt in range(NT):
                var rr = nt * 8 + lane // 4
                comptime for kk in range(DI // 16):
                    var f = SIMD[dtype, 4](0)
                    if rr < nrows:
                        var base = (q0 * num_groups + rr) * DI + kk * 16 + t2
                        var lo = qg.unsafe_load[width=2, alignment=4](base)
                        var hi = qg.unsafe_load[width=2, alignment=4](base + 8)
                        f = lo.join(hi)
                    qf[nt * (DI // 16) + kk] = f
        var k_stage = k_buf0 if e % 2 == 0 else k_buf1
        if e + 1 < n:
            load_k(e + 1, k_buf1 if e % 2 == 0 else k_buf0)
            async_copy_commit_group()
            async_copy_wait_group(1)
        else:
            async_copy_wait_group(0)
        barrier()
        var k_cur = k_wide
        comptime if WIDE:
            k_cur = k_stage.unsafe_bitcast[Scalar[dtype]]()
        else:  # e4m3 -> dtype, exact; the cache's scale is folded into idx_scale
            widen_rows[BS, DI, KLS, KS, DEC_THREADS](k_stage, k_wide, tid)
            barrier()
        # S^T = K_blk Q^T: this warp's 16-key tiles against every (query, group) row
        var acc = Array[SIMD[DType.float32, 4], MTW * NT](fill=SIMD[DType.float32, 4](0))
        comptime for kk in range(DI // 16):
            comptime for u in range(MTW):
                var mt = wid + DEC_WARPS * u
                if mt < MT:
                    var a = frag_a[dtype, KS](k_cur.unsafe_offset(mt * 16 * KS + kk * 16), lane)
                    comptime for nt in range(NT):
                        var d0 = SIMD[DType.float32, 4](0)
                        mma(d0, a, qf[nt * (DI // 16) + kk], acc[u * NT + nt])
                        acc[u * NT + nt] = d0
        # block max per row (column of the accumulators), unscaled; NaN never wins
        var full = (j + 1) * BS <= tk - tq + 1  # every key visible to every query
        comptime for nt in range(NT):
            var m_a = f32_neg_inf()
            var m_b = f32_neg_inf()
            var pos_a = tk - tq + (nt * 8 + t2) // num_groups
            var pos_b = tk - tq + (nt * 8 + t2 + 1) // num_groups
            comptime for u in range(MTW):
                var mt = wid + DEC_WARPS * u
                if mt < MT:
                    var x = acc[u * NT + nt]
                    var key = j * BS + mt * 16 + lane // 4
                    if full or key <= pos_a:
                        if x[0] > m_a:
                            m_a = x[0]
                    if full or key + 8 <= pos_a:
                        if x[2] > m_a:
                            m_a = x[2]
                    if full or key <= pos_b:
                        if x[1] > m_b:
                            m_b = x[1]
                    if full or key + 8 <= pos_b:
                        if x[3] > m_b:
                            m_b = x[3]
            m_a = max(m_a, warp.shuffle_xor(m_a, 4))
            m_a = max(m_a, warp.shuffle_xor(m_a, 8))
            m_a = max(m_a, warp.shuffle_xor(m_a, 16))
            m_b = max(m_b, warp.shuffle_xor(m_b, 4))
            m_b = max(m_b, warp.shuffle_xor(m_b, 8))
            m_b = max(m_b, warp.shuffle_xor(m_b, 16))
            if lane < 4:
                red[unsafe_offset=wid * NRP + nt * 8 + t2] = m_a
                red[unsafe_offset=wid * NRP + nt * 8 + t2 + 1] = m_b
        barrier()
        if tid < nrows:
            var m = red[unsafe_offset=tid]
            comptime for w in range(1, DEC_WARPS):
                m = max(m, red[unsafe_offset=w * NRP + tid])
            var i = tid // num_groups
            var g = tid % num_groups
            scores[unsafe_offset=_score_offset(g, i, r, max_q, Int(r_max))] = m
        barrier()  # k_cur and red are rewritten next


# ----------------------------------------------------------------------------- GPU, pass 2 on e4m3: scores from registers
comptime DEC_F8_ROWS = 4  # block rows a warp of the e4m3 score pass takes, one after another


@always_inline
def _fp8_block_max[
    DI: Int, BS: Int, W: Int, NT: Int, NTU: Int, num_groups: Int, max_q: Int
](
    scores: F32MutPtr,
    kg: Pointer[Scalar[DType.float8_e4m3fn], ImmutAnyOrigin, address_space=AddressSpace.GLOBAL],
    qf: Array[SIMD[DType.uint32, W], NT],
    base: Int, key_stride: Int, r: Int, r_max: Int, j: Int, tq: Int, tk: Int, nrows: Int, lane: Int,
):
    """One block's max score for the first NTU x 8 (query, group) rows (of
    the NT tiles in qf), written to scores. Lane (g, c) holds bytes
    [c * DI/4, (c + 1) * DI/4) of key rows g and g + 8 of each m tile."""
    comptime CH = DI // 4
    comptime assert W == CH // 4, "_fp8_block_max: W words of Di / 4 bytes a lane"
    comptime LD = CH // 16
    comptime KSTEPS = DI // 32
    comptime MT = BS // 16
    # m tiles whose loads are in flight at once: the whole block (16 KB at Di 128, 128 keys) in a
    # one-tile kernel, 64 keys on its one-tile path otherwise, 32 for more tiles (registers)
    comptime HALF = (MT if NT == 1 and MT <= 8 else (4 if MT % 4 == 0 else 1)) if NTU == 1 else (2 if MT % 2 == 0 else 1)
    comptime E8 = DType.float8_e4m3fn
    var g8 = lane // 4
    var t2 = (lane % 4) * 2
    var nvalid = tk - j * BS  # keys of the block in the sequence (rows past it are not read)
    var full = (j + 1) * BS <= tk - tq + 1  # every key visible to every query
    var m_a = Array[Float32, NTU](fill=f32_neg_inf())
    var m_b = Array[Float32, NTU](fill=f32_neg_inf())
    for h in range(MT // HALF):  # a loop, not unrolled: one group's loads live at a time
        var kr = Array[SIMD[DType.uint32, W], 2 * HALF](fill=SIMD[DType.uint32, W](0))
        comptime for u in range(2 * HALF):  # rows g8 and g8 + 8 of m tile h * HALF + u // 2
            var key = (h * HALF + u // 2) * 16 + g8 + (u % 2) * 8
            if key < nvalid:
                comptime for l in range(LD):
                    var v = kg.unsafe_load[width=16, alignment=16](base + key * key_stride + (lane % 4) * CH + l * 16)
                    kr[u] = kr[u].insert[offset=4 * l](bitcast[DType.uint32, 4](v))
        comptime for u in range(HALF):
            var acc = Array[SIMD[DType.float32, 4], NTU](fill=SIMD[DType.float32, 4](0))
            comptime for s in range(KSTEPS):
                var a = bitcast[E8, 16](SIMD[DType.uint32, 4](
                    kr[2 * u][2 * s], kr[2 * u + 1][2 * s], kr[2 * u][2 * s + 1], kr[2 * u + 1][2 * s + 1]))
                comptime for nt in range(NTU):
                    var bq = bitcast[E8, 8](SIMD[DType.uint32, 2](qf[nt][2 * s], qf[nt][2 * s + 1]))
                    var d0 = SIMD[DType.float32, 4](0)
                    mma(d0, a, bq, acc[nt])
                    acc[nt] = d0
            var key = j * BS + (h * HALF + u) * 16 + g8
            comptime for nt in range(NTU):  # block max per row (column), unscaled; NaN never wins
                var x = acc[nt]
                var pos_a = tk - tq + (nt * 8 + t2) // num_groups
                var pos_b = tk - tq + (nt * 8 + t2 + 1) // num_groups
                if (full or key <= pos_a) and x[0] > m_a[nt]:
                    m_a[nt] = x[0]
                if (full or key + 8 <= pos_a) and x[2] > m_a[nt]:
                    m_a[nt] = x[2]
                if (full or key <= pos_b) and x[1] > m_b[nt]:
                    m_b[nt] = x[1]
                if (full or key + 8 <= pos_b) and x[3] > m_b[nt]:
                    m_b[nt] = x[3]
    comptime for nt in range(NTU):
        var ma = m_a[nt]
        var mb = m_b[nt]
        comptime for sh in range(3):  # over the lanes of one column (lane % 4 fixed)
            ma = max(ma, warp.shuffle_xor(ma, UInt32(4 << sh)))
            mb = max(mb, warp.shuffle_xor(mb, UInt32(4 << sh)))
        if lane < 4:
            var n_a = nt * 8 + t2
            if n_a < nrows:
                scores[unsafe_offset=_score_offset(n_a % num_groups, n_a // num_groups, r, max_q, r_max)] = ma
            if n_a + 1 < nrows:
                scores[unsafe_offset=_score_offset((n_a + 1) % num_groups, (n_a + 1) // num_groups, r, max_q,
                                                   r_max)] = mb


def decode_scores_fp8_kernel[
    idx_dim: Int, num_groups: Int, block_size: Int, init_blocks: Int, local_blocks: Int, max_q: Int, paged: Bool,
](
    scores: F32MutPtr,
    q_idx: Pointer[Scalar[DType.float8_e4m3fn], ImmutAnyOrigin],
    k_idx: Pointer[Scalar[DType.float8_e4m3fn], ImmutAnyOrigin],
    roff: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, num_seqs: Int32, r_max: Int32, table: I32Ptr, geom: I64Ptr,
):
    """The score pass on e4m3 queries and keys: each warp scores whole blocks
    on its own (no shared memory, no barrier). mma.sync m16n8k32 e4m3 takes
    its A (keys) and B (query rows) fragments straight from 16-byte global
    loads: the contraction order is free, so lane (g, c) of an m tile loads
    bytes [c * Di/4, (c + 1) * Di/4) of key rows g and g + 8 (a row's four
    lanes read it whole), and k step s uses their bytes [8s, 8s + 8); the
    query rows are loaded in the same order. A kernel whose query tile is
    one n tile (max_q * Hkv <= 8) keeps a whole block of loads in flight per
    warp (16 KB at Di 128), others 64 or 32 keys; the SM's resident warps
    keep the bytes in flight that the DRAM needs. A sequence with at most 8
    (query, group) rows (plain decode at Hkv <= 8) runs one n tile."""
    comptime DI = idx_dim
    comptime BS = block_size
    comptime CH = DI // 4  # bytes of a row a lane holds
    comptime W = CH // 4  # as 32-bit words
    comptime NT = ceildiv(max_q * num_groups, 8)
    comptime assert DI % 64 == 0 and BS % 16 == 0, "decode_scores_fp8_kernel: Di % 64 == 0, block_size % 16 == 0"
    var lane = Int(lane_id())
    var wid = Int(thread_idx.x) // WARP_SIZE
    var c = lane % 4
    var B = Int(num_seqs)
    var nr_all = Int(roff[unsafe_offset=B])
    var qg = q_idx.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var kg = k_idx.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var ka = idx_addr[paged, DI](table, geom)
    var qf = Array[SIMD[DType.uint32, W], NT](fill=SIMD[DType.uint32, W](0))
    var cur_b = -1
    var tq = 0
    var tk = 0
    var nrows = 0
    var r0 = (Int(block_idx.x) * DEC_WARPS + wid) * DEC_F8_ROWS
    # the rows' sequences, resolved by lanes 0 .. DEC_F8_ROWS - 1 at once (one chain of dependent loads)
    var my_b = 0
    if lane < DEC_F8_ROWS and r0 + lane < nr_all:
        my_b = seq_of(roff, B, r0 + lane)
        while r0 + lane >= Int(roff[unsafe_offset=my_b + 1]):  # past empty sequences
            my_b += 1
    for r in range(r0, min(r0 + DEC_F8_ROWS, nr_all)):
        var b = Int(warp.shuffle_idx(Int32(my_b), UInt32(r - r0)))
        var j = r - Int(roff[unsafe_offset=b])
        if b != cur_b:  # warp-uniform: the sequence's (query, group) rows as B fragments
            cur_b = b
            var q0 = Int(cu_q[unsafe_offset=b])
            tq = Int(cu_q[unsafe_offset=b + 1]) - q0
            tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
            nrows = min(tq, max_q) * num_groups
            comptime for nt in range(NT):
                var rr = nt * 8 + lane // 4
                var f = SIMD[DType.uint32, W](0)
                if rr < nrows:
                    comptime for l in range(CH // 16):
                        var v = qg.unsafe_load[width=16, alignment=16]((q0 * num_groups + rr) * DI + c * CH + l * 16)
                        f = f.insert[offset=4 * l](bitcast[DType.uint32, 4](v))
                qf[nt] = f
        var fr = _free_range(tq, tk, BS, init_blocks, local_blocks)
        if tq == 0 or j < fr[0] or j > fr[1]:
            continue
        var base = ka.block[paged](cu_k, b, j, BS)
        if NT == 1 or nrows <= 8:  # warp-uniform: one n tile of (query, group) rows
            _fp8_block_max[DI, BS, W, NT, 1, num_groups, max_q](scores, kg, qf, base, ka.key_stride, r, Int(r_max), j,
                                                             tq, tk, nrows, lane)
        else:
            _fp8_block_max[DI, BS, W, NT, NT, num_groups, max_q](scores, kg, qf, base, ka.key_stride, r, Int(r_max),
                                                              j, tq, tk, nrows, lane)


def decode_scores_smem_bytes[
    dtype: DType, kdt: DType, idx_dim: Int, num_groups: Int, block_size: Int, max_q: Int
]() -> Int:
    comptime NRP = ceildiv(max_q * num_groups, 8) * 8
    comptime stages = 2 * block_size * stage_stride[kdt, dtype, idx_dim]() * size_of[kdt]()
    comptime wide = 0 if kdt == dtype else block_size * (idx_dim + 8) * size_of[dtype]()
    return wide + stages + 4 * DEC_WARPS * NRP


# ----------------------------------------------------------------------------- GPU, pass 3: top-k
@always_inline
def _better(s_a: Float32, id_a: Int32, s_b: Float32, id_b: Int32) -> Bool:
    """Rank order: higher score, then lower block id."""
    return s_a > s_b or (s_a == s_b and id_a < id_b)


@always_inline
def _merge_lists(
    my_sc: Pointer[Float32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    my_id: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    cnt: Int,
    kfree: Int,
    out_sc: Pointer[Float32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    out_id: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    lane: Int,
) -> Int:
    """The warp's best kfree of its lanes' sorted lists (best first), by kfree
    rounds of a warp arg-max over the lists' heads; lane 0 writes them."""
    var head = 0
    var nsel = 0
    for _ in range(kfree):
        var cs = f32_neg_inf()
        var ci = NO_ID
        if head < cnt:
            cs = my_sc[unsafe_offset=head]
            ci = my_id[unsafe_offset=head]
        var bs = cs
        var bi = ci
        comptime for sh in range(5):
            comptime off = 1 << (4 - sh)
            var os = warp.shuffle_xor(bs, UInt32(off))
            var oi = warp.shuffle_xor(bi, UInt32(off))
            if _better(os, oi, bs, bi):
                bs = os
                bi = oi
        if bi == NO_ID:
            break
        if head < cnt and ci == bi:
            head += 1
        if lane == 0:
            out_sc[unsafe_offset=nsel] = bs
            out_id[unsafe_offset=nsel] = bi
        nsel += 1
    return nsel


def decode_topk_kernel[
    dtype: DType, kdt: DType, idx_dim: Int, num_groups: Int, topk: Int, block_size: Int, init_blocks: Int,
    local_blocks: Int, max_q: Int, paged: Bool,
](
    block_ids: I32MutPtr,
    scores: F32Ptr,
    q_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k_idx: Pointer[Scalar[kdt], ImmutAnyOrigin],
    roff: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, scale_p: F32Ptr, num_seqs: Int32, T: Int32, r_max: Int32,
    table: I32Ptr, geom: I64Ptr,
):
    """One thread block per (query, group) row: each thread keeps the running
    top-k of a strided share of the free blocks, each warp merges its lanes'
    lists, then warp 0 merges the warps' lists."""
    comptime BS = block_size
    comptime NTH = TOPK_WARPS * WARP_SIZE
    comptime UNROLL = 4  # score loads in flight per thread
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    var sc_s = unsafe_stack_allocation[NTH * topk, Float32, address_space=AddressSpace.SHARED]()
    var id_s = unsafe_stack_allocation[NTH * topk, Int32, address_space=AddressSpace.SHARED]()
    var wsc_s = unsafe_stack_allocation[TOPK_WARPS * topk, Float32, address_space=AddressSpace.SHARED]()
    var wid_s = unsafe_stack_allocation[TOPK_WARPS * topk, Int32, address_space=AddressSpace.SHARED]()
    var wn_s = unsafe_stack_allocation[TOPK_WARPS, Int32, address_space=AddressSpace.SHARED]()
    var sel_sc = unsafe_stack_allocation[topk, Float32, address_space=AddressSpace.SHARED]()
    var sel = unsafe_stack_allocation[topk, Int32, address_space=AddressSpace.SHARED]()
    var q_s = unsafe_stack_allocation[idx_dim, Float32, address_space=AddressSpace.SHARED]()
    var row = Int(block_idx.x)  # = t * num_groups + g
    var t = row // num_groups
    var g = row % num_groups
    var b = seq_of(cu_q, Int(num_seqs), t)
    var q0 = Int(cu_q[unsafe_offset=b])
    var tq = Int(cu_q[unsafe_offset=b + 1]) - q0
    var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
    var ka = idx_addr[paged, idx_dim](table, geom)
    var i = t - q0
    var p = tk - tq + i
    var f = Forced(p, BS, init_blocks, local_blocks)
    var kfree = topk - f.num_forced()  # uniform over the thread block
    var scale = scale_p[unsafe_offset=0]
    var my_sc = sc_s.unsafe_offset(tid * topk)
    var my_id = id_s.unsafe_offset(tid * topk)
    var cnt = 0
    var worst = 0
    var nsel = 0
    if kfree > 0:
        if i < max_q:  # scored by the score pass: UNROLL loads in flight, each thread's ids ascending
            var base = _score_offset(g, i, Int(roff[unsafe_offset=b]), max_q, Int(r_max))
            for j0 in range(f.nsink, f.local_lo, NTH * UNROLL):
                var sv = SIMD[DType.float32, UNROLL](f32_neg_inf())
                comptime for u in range(UNROLL):
                    var j = j0 + u * NTH + tid
                    if j < f.local_lo:
                        sv[u] = scores[unsafe_offset=base + j]
                comptime for u in range(UNROLL):
                    var j = j0 + u * NTH + tid
                    if j < f.local_lo:
                        var s = sv[u] * scale
                        if not (s == s):
                            s = f32_neg_inf()
                        _topk_insert[cap=topk](my_sc, my_id, cnt, worst, kfree, s, j)
        else:  # past the score pass's tile: a warp scores 32 blocks at a time here
            for d in range(tid, idx_dim, NTH):
                q_s[unsafe_offset=d] = q_idx[unsafe_offset=(t * num_groups + g) * idx_dim + d].cast[DType.float32]()
            barrier()
            for j0 in range(f.nsink + wid * WARP_SIZE, f.local_lo, NTH):
                var s = f32_neg_inf()
                for u in range(min(WARP_SIZE, f.local_lo - j0)):
                    var m = f32_neg_inf()
                    var kb = k_idx.unsafe_offset(ka.block[paged](cu_k, b, j0 + u, BS))
                    for key in range(lane, min(BS, p + 1 - (j0 + u) * BS), WARP_SIZE):
                        var dot = Float32(0)
                        for d in range(idx_dim):
                            dot += q_s[unsafe_offset=d] * kb[unsafe_offset=key * ka.key_stride + d].cast[DType.float32]()
                        if dot > m:
                            m = dot
                    m = warp.max(m)
                    if lane == u:
                        s = m
                var j = j0 + lane
                if j < f.local_lo:
                    s *= scale
                    if not (s == s):
                        s = f32_neg_inf()
                    _topk_insert[cap=topk](my_sc, my_id, cnt, worst, kfree, s, j)
        # this thread's list, best first
        for a in range(1, cnt):
            var xs = my_sc[unsafe_offset=a]
            var xi = my_id[unsafe_offset=a]
            var k = a - 1
            while k >= 0 and _better(xs, xi, my_sc[unsafe_offset=k], my_id[unsafe_offset=k]):
                my_sc[unsafe_offset=k + 1] = my_sc[unsafe_offset=k]
                my_id[unsafe_offset=k + 1] = my_id[unsafe_offset=k]
                k -= 1
            my_sc[unsafe_offset=k + 1] = xs
            my_id[unsafe_offset=k + 1] = xi
        var wn = _merge_lists(my_sc, my_id, cnt, kfree, wsc_s.unsafe_offset(wid * topk),
                              wid_s.unsafe_offset(wid * topk), lane)
        if lane == 0:
            wn_s[unsafe_offset=wid] = Int32(wn)
        barrier()
        if wid == 0:  # lane l < TOPK_WARPS holds warp l's list
            var n_l = Int(wn_s[unsafe_offset=lane]) if lane < TOPK_WARPS else 0
            var l_off = min(lane, TOPK_WARPS - 1) * topk
            nsel = _merge_lists(wsc_s.unsafe_offset(l_off), wid_s.unsafe_offset(l_off), n_l, kfree, sel_sc, sel, lane)
    if tid == 0:
        _write_selection[topk=topk](block_ids.unsafe_offset((g * Int(T) + t) * topk), f, sel, nsel)


# ----------------------------------------------------------------------------- op
def _launch_select_decode[
    dtype: DType, kdt: DType, //, target: StaticString, topk: Int, block_size: Int, init_blocks: Int,
    local_blocks: Int, num_groups: Int, idx_dim: Int, max_q: Int, paged: Bool,
](
    block_ids: I32MutPtr, block_scores: F32MutPtr, row_offsets: I32MutPtr, q_idx: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k_idx: Pointer[Scalar[kdt], ImmutAnyOrigin], cu_q: I32Ptr, cu_k: I32Ptr, idx_scale: F32Ptr, table: I32Ptr,
    geom: I64Ptr, B: Int, T: Int, r_max: Int, ctx: DeviceContext,
) raises:
    comptime if is_cpu[target]():
        _decode_select_cpu[dtype, kdt, idx_dim, topk, block_size, init_blocks, local_blocks, max_q, paged](
            block_ids, block_scores, row_offsets, q_idx, k_idx, cu_q, cu_k, idx_scale[unsafe_offset=0], B,
            num_groups, T, r_max, table, geom,
        )
    else:
        comptime FP8 = dtype == DType.float8_e4m3fn  # e4m3 queries and keys: FP8 tensor cores, no widening
        comptime assert FP8 or select_mma_supported[dtype, idx_dim, block_size](), "msa_select_decode: GPU needs bf16/fp16, Di % 16 == 0, block_size % 16 == 0, <= 128"
        comptime assert not FP8 or (kdt == dtype and idx_dim % 64 == 0 and block_size % 16 == 0), "msa_select_decode: e4m3 q_idx needs e4m3 index keys, Di a multiple of 64"
        comptime assert topk <= TOPK_MAX, "msa_select_decode: GPU needs topk <= 40 (use the general indexer)"
        comptime assert kdt == dtype or kdt == DType.float8_e4m3fn, "msa_select_decode: index keys in q_idx's dtype or e4m3"
        ctx.enqueue_function[_row_offsets_kernel](
            row_offsets, cu_k, Int32(B), Int32(block_size), grid_dim=1, block_dim=32,
        )
        if r_max > 0:
            comptime if FP8:
                comptime scores_f8 = decode_scores_fp8_kernel[
                    idx_dim, num_groups, block_size, init_blocks, local_blocks, max_q, paged
                ]
                ctx.enqueue_function[scores_f8](
                    block_scores, q_idx.unsafe_bitcast[Scalar[DType.float8_e4m3fn]](),
                    k_idx.unsafe_bitcast[Scalar[DType.float8_e4m3fn]](), row_offsets, cu_q, cu_k, Int32(B),
                    Int32(r_max), table, geom,
                    grid_dim=ceildiv(r_max, DEC_WARPS * DEC_F8_ROWS), block_dim=DEC_THREADS,
                )
            else:
                comptime smem = decode_scores_smem_bytes[dtype, kdt, idx_dim, num_groups, block_size, max_q]()
                comptime scores_k = decode_scores_kernel[
                    dtype, kdt, idx_dim, num_groups, block_size, init_blocks, local_blocks, max_q, paged
                ]
                ctx.enqueue_function[scores_k](
                    block_scores, q_idx, k_idx, row_offsets, cu_q, cu_k, Int32(B), Int32(r_max), table, geom,
                    grid_dim=ceildiv(r_max, DEC_BLOCKS), block_dim=DEC_THREADS, shared_mem_bytes=smem,
                    func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
                )
        comptime topk_k = decode_topk_kernel[
            dtype, kdt, idx_dim, num_groups, topk, block_size, init_blocks, local_blocks, max_q, paged
        ]
        ctx.enqueue_function[topk_k](
            block_ids, block_scores, q_idx, k_idx, row_offsets, cu_q, cu_k, idx_scale, Int32(B), Int32(T),
            Int32(r_max), table, geom,
            grid_dim=T * num_groups, block_dim=TOPK_WARPS * WARP_SIZE,
        )


@register("msa_select_decode")
struct MSASelectDecode:
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
        max_q: Int,
    ](
        block_ids: OutputTensor[dtype=DType.int32, rank=3, ...],
        block_scores: OutputTensor[dtype=DType.float32, rank=1, ...],  # scratch [Hkv * max_q * R_max]
        row_offsets: OutputTensor[dtype=DType.int32, rank=1, ...],  # scratch [B + 1]
        q_idx: InputTensor[dtype=dtype, rank=3, ...],
        k_idx: InputTensor[dtype=dtype, rank=2, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        idx_scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q_idx.dim_size(0)
        var S = k_idx.dim_size(0)
        var B = cu_seqlens_q.dim_size(0) - 1
        var r_max = S // block_size + B
        if q_idx.dim_size(1) != num_groups or q_idx.dim_size(2) != idx_dim or k_idx.dim_size(1) != idx_dim:
            raise Error("msa_select_decode: q_idx must be [T, Hkv, Di] and k_idx [S, Di] with the op's Hkv and Di")
        if block_scores.dim_size(0) < num_groups * max_q * r_max or row_offsets.dim_size(0) != B + 1:
            raise Error("msa_select_decode: scratch too small")
        if T == 0:
            return
        comptime edt = cache_element[dtype]()  # uint8 q_idx and k_idx carry e4m3 bytes
        _launch_select_decode[target, topk, block_size, init_blocks, local_blocks, num_groups, idx_dim, max_q, False](
            block_ids.unsafe_ptr(), block_scores.unsafe_ptr(), row_offsets.unsafe_ptr(),
            q_idx.unsafe_ptr().unsafe_bitcast[Scalar[edt]](), k_idx.unsafe_ptr().unsafe_bitcast[Scalar[edt]](),
            cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), idx_scale.unsafe_ptr(),
            cu_seqlens_k.unsafe_ptr(), idx_scale.unsafe_ptr().unsafe_bitcast[Int64](), B, T, r_max, ctx,
        )


@register("msa_select_decode_paged")
struct MSASelectDecodePaged:
    """msa_select_decode over a paged index-key cache: k_idx_cache the flat
    storage of [num_pages, block_size, Di] (strides in geom), page_table
    [B, max_pages], cu_seqlens_k the prefix sums of the sequences' lengths;
    rows bounded by B * max_pages. The cache may be e4m3, as float8_e4m3fn or
    its bytes as uint8 (its scale folded into idx_scale)."""

    @staticmethod
    def execute[
        dtype: DType,
        cache_dtype: DType,
        //,
        target: StaticString,
        topk: Int,
        block_size: Int,
        init_blocks: Int,
        local_blocks: Int,
        num_groups: Int,
        idx_dim: Int,
        max_q: Int,
    ](
        block_ids: OutputTensor[dtype=DType.int32, rank=3, ...],
        block_scores: OutputTensor[dtype=DType.float32, rank=1, ...],  # scratch [Hkv * max_q * B * max_pages]
        row_offsets: OutputTensor[dtype=DType.int32, rank=1, ...],  # scratch [B + 1]
        q_idx: InputTensor[dtype=dtype, rank=3, ...],
        k_idx_cache: InputTensor[dtype=cache_dtype, rank=1, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        page_table: InputTensor[dtype=DType.int32, rank=2, ...],
        geom: InputTensor[dtype=DType.int64, rank=1, ...],
        idx_scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q_idx.dim_size(0)
        var B = cu_seqlens_q.dim_size(0) - 1
        var r_max = B * page_table.dim_size(1)
        if q_idx.dim_size(1) != num_groups or q_idx.dim_size(2) != idx_dim:
            raise Error("msa_select_decode_paged: q_idx must be [T, Hkv, Di] with the op's Hkv and Di")
        if block_scores.dim_size(0) < num_groups * max_q * r_max or row_offsets.dim_size(0) != B + 1:
            raise Error("msa_select_decode_paged: scratch too small")
        if T == 0:
            return
        _launch_select_decode[target, topk, block_size, init_blocks, local_blocks, num_groups, idx_dim, max_q, True](
            block_ids.unsafe_ptr(), block_scores.unsafe_ptr(), row_offsets.unsafe_ptr(),
            q_idx.unsafe_ptr().unsafe_bitcast[Scalar[cache_element[dtype]()]](),
            k_idx_cache.unsafe_ptr().unsafe_bitcast[Scalar[cache_element[cache_dtype]()]](), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), idx_scale.unsafe_ptr(),
            page_table.unsafe_ptr(), geom.unsafe_ptr(), B, T, r_max, ctx,
        )
