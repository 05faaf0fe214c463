# The layer's forced pass: MSA.md steps 5-6 for each query's forced blocks,
# fused with the merge.
#
# Every query attends to its sinks (j < init_blocks) and its local blocks
# (jq - local_blocks < j <= jq); the selection always keeps them when
# topk >= init_blocks + local_blocks. Block-major they would cost one stored
# partial each (three of the sixteen per query at the defaults, written and
# read back, plus a Q gather each), yet the 128 queries of a query block all
# share them. So the layer's inversion leaves them out (invert.mojo,
# init_blocks / local_blocks), the block attention writes partials for the
# other slots only, and this pass, run after it, replaces the combine: one
# thread block per 64 consecutive (query, head) rows of a KV group loads each
# forced block of its queries once, runs an online softmax over them on
# tensor cores (the block attention's tile steps: on Hopper warpgroup MMA
# chains over 128B-swizzled Q, K and V, elsewhere mma.sync on padded rows),
# and merges that split
# with the partials of the other slots into out and lse: the rows'
# lse_partial is fetched into shared memory at the start, and in the merge
# each thread reads its 16-byte columns of every slot of its row at once.
# Unused and forced slots carry lse_partial -inf and are not read.
#
# A tile's rows nearly always belong to one query block (one set of forced
# blocks); where they straddle a query block or a sequence, the thread block
# walks the union of its queries' forced blocks and each row masks the ones
# that are not its own.

from std.math import ceildiv, exp2, log
from std.memory import unsafe_stack_allocation

from max.algorithm import sync_parallelize

from extensibility import InputTensor, OutputTensor, register
from max.gpu import WARP_SIZE, barrier, block_idx, lane_id, syncwarp, thread_idx
from max.gpu.host import DeviceContext, FuncAttribute
from max.gpu.host.info import is_cpu
from max.gpu.compute.mma import wgmma_wait_group_sync
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory, fence_async_view_proxy,
)
from max.gpu.primitives import warp

from .attention import (
    LN2, LOG2E, MMA_BM, exp2_rows16, load_kv_tile, mask_rows16, mma_smem_bytes, mma_supported, pv_rows16, qk_rows16,
    wgmma_supported,
)
from .combine import combine_row, combine_row_cpu, combine_vec_width, finish_row_cols, load_row_slots
from .cpu_tiles import CPU_R, AttendBlock, RowState, attend_tile, pack_block, pack_rows, padded, int_scratch, release, scratch
from .common import (
    LAYOUT_PADDED, LAYOUT_SW128, F32MutPtr, F32Ptr, Forced, I32Ptr, I64Ptr, KVAddr, kv_addr, f32_neg_inf, hopper_target, position_of, pv_tile_wgmma,
    score_tile_wgmma, seq_of, tile_offset, wgmma_acc_fence,
)

comptime FC_WARPS = 4
comptime FC_BM = 16 * FC_WARPS  # (query, head) rows of a tile


@always_inline
def _forced_visible[init_blocks: Int, local_blocks: Int, block_size: Int](
    row_seq: Int, row_pos: Int, b: Int, j: Int, nk: Int
) -> Int:
    """Keys of block j of sequence b (nk keys) that a row sees when the block is
    one of its forced blocks; 0 otherwise (or for a padding row, row_seq -1)."""
    var f = Forced(row_pos, block_size, init_blocks, local_blocks)
    if row_seq != b or j > f.jq or not f.holds(j):
        return 0
    return min(nk, row_pos - j * block_size + 1)


@always_inline
def _row_scales[n: Int](a0: Float32, a1: Float32) -> SIMD[DType.float32, n]:
    """(a0, a0, a1, a1) repeated: per-row factors for m16n8 accumulators
    (rows r0 and r0 + 8 of this thread)."""
    var x = SIMD[DType.float32, n](a0)
    comptime for i in range(n // 4):
        x[4 * i + 2] = a1
        x[4 * i + 3] = a1
    return x


# ----------------------------------------------------------------------------- CPU
def _forced_combine_cpu[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, topk: Int,
    init_blocks: Int, local_blocks: Int, paged: Bool,
](
    output: Pointer[Scalar[dtype], MutAnyOrigin],
    lse: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    o_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin],
    lse_p: F32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale: Float32, num_seqs: Int, num_groups: Int, kva: KVAddr,
):
    """Tasks of (sequence, query block, KV group) in parallel: the queries of
    one query block share their forced blocks, so each task packs them once
    (cpu_tiles) and streams its (query, head) rows through them, CPU_R at a
    time, then merges each row's forced split with its partials."""
    comptime D = head_dim
    comptime DP = padded(D)
    comptime BP = padded(block_size)
    comptime NF = init_blocks + local_blocks
    var Hq = num_groups * group
    var toff = int_scratch(num_seqs + 1)  # first query block task of each sequence
    toff[unsafe_offset=0] = 0
    for b in range(num_seqs):
        var tq = Int(cu_q[unsafe_offset=b + 1]) - Int(cu_q[unsafe_offset=b])
        var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
        var n = (tk - 1) // block_size - (tk - tq) // block_size + 1 if tq > 0 else 0
        toff[unsafe_offset=b + 1] = toff[unsafe_offset=b] + n

    def task(i: Int) {output, lse, q, k, v, o_p, lse_p, cu_q, cu_k, scale, num_seqs, num_groups, Hq, toff, kva}:
        var g = i % num_groups
        var qb = i // num_groups
        var b = 0
        while qb >= toff[unsafe_offset=b + 1]:
            b += 1
        var q0 = Int(cu_q[unsafe_offset=b])
        var tq = Int(cu_q[unsafe_offset=b + 1]) - q0
        var k0 = Int(cu_k[unsafe_offset=b])
        var tk = Int(cu_k[unsafe_offset=b + 1]) - k0
        var jq = (tk - tq) // block_size + qb - toff[unsafe_offset=b]
        var p0 = max(tk - tq, jq * block_size)  # the block's first and last query positions
        var p1 = min(tk, (jq + 1) * block_size) - 1
        var f = Forced(p0, block_size, init_blocks, local_blocks)
        var nf = f.num_forced()
        var buf = scratch(2 * NF * DP * BP + CPU_R * (2 * DP + BP + 2))
        var pos = int_scratch(CPU_R)
        var blks = List[AttendBlock]()
        for fi in range(nf):
            var j = f.block(fi)
            var kv_off = kva.block[paged](cu_k, b, j, block_size) + g * kva.group_stride
            blks.append(pack_block[dtype, D, block_size](
                buf.unsafe_offset(2 * fi * DP * BP), buf.unsafe_offset((2 * fi + 1) * DP * BP), k.unsafe_offset(kv_off),
                v.unsafe_offset(kv_off), kva.key_stride, j * block_size, min(block_size, tk - j * block_size),
            ))
        var qs = buf.unsafe_offset(2 * NF * DP * BP)
        var pr = qs.unsafe_offset(CPU_R * DP)
        var st = RowState(pr.unsafe_offset(CPU_R * BP), pr.unsafe_offset(CPU_R * BP + CPU_R),
                          pr.unsafe_offset(CPU_R * BP + 2 * CPU_R), pos)
        var t0 = q0 + p0 - (tk - tq)  # the block's first query token
        var rows = (p1 - p0 + 1) * group  # row = query * group + head within the group
        for r0 in range(0, rows, CPU_R):
            st.reset[D]()
            for r in range(CPU_R):
                if r0 + r < rows:
                    var t = t0 + (r0 + r) // group
                    pack_rows[dtype](qs.unsafe_offset(r * DP), DP, q.unsafe_offset((t * Hq + g * group + (r0 + r) % group) * D), D, 1, D)
                    pos[unsafe_offset=r] = p0 + (r0 + r) // group
                else:
                    pos[unsafe_offset=r] = -1
            for fi in range(nf):
                attend_tile[D, block_size](qs, blks[fi], scale, pr, st)
            for r in range(min(CPU_R, rows - r0)):
                var row_o = st.o.unsafe_offset(r * DP)
                var inv = st.inv_l(r)
                for d in range(DP):
                    row_o[unsafe_offset=d] *= inv
                var t = t0 + (r0 + r) // group
                combine_row_cpu[dtype, part_dtype, topk, D](output, lse, o_p, lse_p, t * Hq + g * group + (r0 + r) % group,
                                                            st.lse(r), row_o)
        release(buf)
        release(pos)

    sync_parallelize(task, toff[unsafe_offset=num_seqs] * num_groups)
    release(toff)


# ----------------------------------------------------------------------------- GPU, tensor cores
def forced_combine_kernel[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, num_groups: Int, topk: Int,
    init_blocks: Int, local_blocks: Int, wgmma: Bool, paged: Bool,
](
    output: Pointer[Scalar[dtype], MutAnyOrigin],
    lse: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    o_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin],
    lse_p: F32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale_p: F32Ptr, num_seqs: Int32, T: Int32, table: I32Ptr, geom: I64Ptr,
):
    comptime assert part_dtype == dtype, "the forced split goes through shared memory in q's dtype"
    comptime D = head_dim
    comptime BS = block_size
    comptime KS = D + 8  # padded row stride (elements): conflict-free ldmatrix
    # Hopper: the tile steps on wgmma, Q, K and V 128B-swizzled; else mma.sync on padded rows
    comptime LAY = LAYOUT_SW128 if wgmma else LAYOUT_PADDED
    comptime Hq = num_groups * group
    comptime NT = FC_WARPS * WARP_SIZE
    comptime CPR = D // 8  # 16-byte chunks per row
    comptime NF = init_blocks + local_blocks
    comptime QMAX = ceildiv(FC_BM, group) + 1  # queries a tile's rows can touch
    comptime VEC = combine_vec_width[dtype, D]()
    comptime LPS = D // VEC  # lanes per row slot in the merge
    var g = Int(block_idx.y)
    var rows = Int(T) * group  # row = t * group + head within the group
    var r_begin = Int(block_idx.x) * FC_BM
    if r_begin >= rows:
        return
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    var t_first = r_begin // group
    var nq = (min(rows, r_begin + FC_BM) - 1) // group - t_first + 1
    var smem = external_memory[Scalar[dtype], address_space=AddressSpace.SHARED, alignment=1024]()  # SW128 panels
    comptime ROW_ELEMS = D if wgmma else KS
    var k_s = smem
    var v_s = smem.unsafe_offset(BS * ROW_ELEMS)
    var q_s = v_s.unsafe_offset(BS * ROW_ELEMS)
    var q_seq = unsafe_stack_allocation[QMAX, Int32, address_space=AddressSpace.SHARED]()
    var q_pos = unsafe_stack_allocation[QMAX, Int32, address_space=AddressSpace.SHARED]()
    var blocks = unsafe_stack_allocation[2 * QMAX * NF + 1, Int32, address_space=AddressSpace.SHARED]()
    var lse_f = unsafe_stack_allocation[FC_BM, Float32, address_space=AddressSpace.SHARED]()
    var qg = q.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    # Q rows of the tile (consecutive heads of a query are contiguous)
    for i in range(tid, FC_BM * CPR, NT):
        var r = i // CPR
        var c = (i % CPR) * 8
        var gr = r_begin + r
        if gr < rows:
            var src = (gr // group) * Hq + g * group + gr % group
            async_copy[16](qg.unsafe_offset(src * D + c), q_s.unsafe_offset(tile_offset[LAY, FC_BM, D](r, c)))
        else:
            q_s.unsafe_store[alignment=16](tile_offset[LAY, FC_BM, D](r, c), SIMD[dtype, 8](0))
    # the rows' lse_partial, for the merge at the end (lands during the attention)
    var lse_s = unsafe_stack_allocation[FC_BM * topk, Float32, address_space=AddressSpace.SHARED]()
    var lpg = lse_p.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    for i in range(tid, FC_BM * topk, NT):
        var gr = r_begin + i // topk
        if gr < rows:
            var src = (gr // group) * Hq + g * group + gr % group
            async_copy[4](lpg.unsafe_offset(src * topk + i % topk), lse_s.unsafe_offset(i))
        else:
            lse_s[unsafe_offset=i] = f32_neg_inf()
    async_copy_commit_group()
    # each query of the tile: its sequence and key position
    if tid < nq:
        var t = t_first + tid
        var b = seq_of(cu_q, Int(num_seqs), t)
        q_seq[unsafe_offset=tid] = Int32(b)
        q_pos[unsafe_offset=tid] = Int32(position_of(cu_q, cu_k, b, t))
    barrier()
    # the union of the tile's forced blocks as (sequence, block) pairs, count last
    if tid == 0:
        var n = 0
        for i in range(nq):
            var b = Int(q_seq[unsafe_offset=i])
            var f = Forced(Int(q_pos[unsafe_offset=i]), BS, init_blocks, local_blocks)
            if i > 0 and b == Int(q_seq[unsafe_offset=i - 1]) and f.jq == Int(q_pos[unsafe_offset=i - 1]) // BS:
                continue  # the same forced blocks as the previous query
            for fi in range(f.num_forced()):
                var j = f.block(fi)
                var seen = False
                for u in range(n):
                    seen = seen or (Int(blocks[unsafe_offset=2 * u]) == b and Int(blocks[unsafe_offset=2 * u + 1]) == j)
                if not seen:
                    blocks[unsafe_offset=2 * n] = Int32(b)
                    blocks[unsafe_offset=2 * n + 1] = Int32(j)
                    n += 1
        blocks[unsafe_offset=2 * QMAX * NF] = Int32(n)
    # this thread's rows r0 and r0 + 8: their query's sequence (-1: padding row) and position
    var g_lane = lane // 4
    var t2 = (lane % 4) * 2
    var r0 = wid * 16 + g_lane
    var seq0 = -1
    var pos0 = 0
    var seq1 = -1
    var pos1 = 0
    if r_begin + r0 < rows:
        var i = (r_begin + r0) // group - t_first
        seq0 = Int(q_seq[unsafe_offset=i])
        pos0 = Int(q_pos[unsafe_offset=i])
    if r_begin + r0 + 8 < rows:
        var i = (r_begin + r0 + 8) // group - t_first
        seq1 = Int(q_seq[unsafe_offset=i])
        pos1 = Int(q_pos[unsafe_offset=i])
    barrier()
    var nblk = Int(blocks[unsafe_offset=2 * QMAX * NF])
    var scale_log2 = scale_p[unsafe_offset=0] * LOG2E
    var q_w = q_s.unsafe_offset(wid * 16 * KS)  # mma.sync: this warp's rows
    # online softmax state of rows r0, r0 + 8 (log2 domain)
    var m0 = f32_neg_inf()
    var m1 = f32_neg_inf()
    var l0 = Float32(0)
    var l1 = Float32(0)
    var o_acc = Array[SIMD[DType.float32, 4], D // 8](fill=SIMD[DType.float32, 4](0))
    var s_wg = SIMD[DType.float32, BS // 2](0)  # wgmma: S and O in the m16n8 layout, 4 floats per n8 tile
    var o_wg = SIMD[DType.float32, D // 2](0)
    var kva = kv_addr[paged, num_groups, D](table, geom)
    for u in range(nblk):
        var b = Int(blocks[unsafe_offset=2 * u])
        var j = Int(blocks[unsafe_offset=2 * u + 1])
        var nk = min(BS, Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b]) - j * BS)
        if u > 0:
            barrier()  # every warp is done with the previous block
        load_kv_tile[dtype, LAY, BS, D, NT](k, v, k_s, v_s, kva.block[paged](cu_k, b, j, BS) + g * kva.group_stride,
                                            kva.key_stride, nk, tid)
        async_copy_commit_group()
        async_copy_wait_group(0)
        comptime if wgmma:
            fence_async_view_proxy()  # cp.async and st.shared writes -> visible to wgmma's async proxy
        barrier()
        var nv0 = _forced_visible[init_blocks, local_blocks, BS](seq0, pos0, b, j, nk)
        var nv1 = _forced_visible[init_blocks, local_blocks, BS](seq1, pos1, b, j, nk)
        var s_acc = Array[SIMD[DType.float32, 4], BS // 8](fill=SIMD[DType.float32, 4](0))
        comptime if wgmma:
            # a warpgroup-wide chain: every warp takes part, its rows seeing the block or not
            s_wg = score_tile_wgmma[dtype, D, BS, LAYOUT_SW128, FC_BM](q_s, k_s, s_wg)
            wgmma_wait_group_sync[0]()
            s_wg = wgmma_acc_fence(s_wg)
            comptime for nj in range(BS // 8):
                s_acc[nj] = s_wg.slice[4, offset=4 * nj]()
        else:
            if warp.vote[DType.uint32](nv0 > 0 or nv1 > 0) == 0:
                continue  # none of this warp's rows has the block
            qk_rows16[dtype, D, BS, KS](q_w, k_s, lane, s_acc)
        var mx = mask_rows16[BS](s_acc, nv0, nv1, scale_log2, t2)
        var mn0 = max(m0, mx[0])
        var mn1 = max(m1, mx[1])
        var base0 = mn0 if mn0 > f32_neg_inf() else Float32(0)  # nothing visible yet: nothing to rescale
        var base1 = mn1 if mn1 > f32_neg_inf() else Float32(0)
        var a0 = exp2(m0 - base0)
        var a1 = exp2(m1 - base1)
        m0 = mn0
        m1 = mn1
        var ls = exp2_rows16[BS](s_acc, base0, base1)
        l0 = l0 * a0 + ls[0]
        l1 = l1 * a1 + ls[1]
        comptime if wgmma:
            o_wg = o_wg * _row_scales[D // 2](a0, a1)  # no chain in flight here
            o_wg = pv_tile_wgmma[dtype, D, BS, accumulate=True](s_acc, v_s, o_wg)
            wgmma_wait_group_sync[0]()
            o_wg = wgmma_acc_fence(o_wg)
        else:
            comptime for dn in range(D // 8):
                o_acc[dn] = o_acc[dn] * SIMD[DType.float32, 4](a0, a0, a1, a1)
            pv_rows16[dtype, D, BS, KS](s_acc, v_s, lane, o_acc)
    async_copy_wait_group(0)  # (a tile always has a block; this keeps Q's copy settled regardless)
    # the forced split, normalized, through this warp's own Q rows; its lse
    var inv0 = Float32(1) / l0 if l0 > 0 else Float32(0)
    var inv1 = Float32(1) / l1 if l1 > 0 else Float32(0)
    comptime if wgmma:
        barrier()  # the warpgroup's chains read every warp's Q rows
        comptime for dn in range(D // 8):
            o_acc[dn] = o_wg.slice[4, offset=4 * dn]()
    else:
        syncwarp()  # other lanes' ldmatrix reads of these rows come first
    comptime for dn in range(D // 8):
        var d = dn * 8 + t2
        var o = o_acc[dn]
        q_s.unsafe_store[alignment=4](
            tile_offset[LAY, FC_BM, D](r0, d), SIMD[DType.float32, 2](o[0], o[1]).__mul__(inv0).cast[dtype]()
        )
        q_s.unsafe_store[alignment=4](
            tile_offset[LAY, FC_BM, D](r0 + 8, d), SIMD[DType.float32, 2](o[2], o[3]).__mul__(inv1).cast[dtype]()
        )
    if lane % 4 == 0:
        lse_f[unsafe_offset=r0] = f32_neg_inf() if l0 == 0 else m0 * LN2 + log(l0)
        lse_f[unsafe_offset=r0 + 8] = f32_neg_inf() if l1 == 0 else m1 * LN2 + log(l1)
    syncwarp()
    # merged with the partials of the other slots: LPS lanes per row, each
    # lane its VEC columns of every slot (topk 16-byte loads in flight)
    comptime RPP = WARP_SIZE // LPS  # rows per pass
    # two passes' loads issued before either is merged (2 * topk 16-byte loads
    # in flight a lane): the merge waits out half as many DRAM round trips
    comptime PASSES = 2 if 2 * RPP <= 16 else 1
    var col = (lane % LPS) * VEC
    comptime for i0 in range(0, 16, PASSES * RPP):
        var row_at = Array[Int, PASSES](fill=-1)  # -1: past the rows
        var lse_at = Array[Float32, PASSES * topk](fill=f32_neg_inf())
        var vals_at = Array[SIMD[part_dtype, VEC], PASSES * topk](fill=SIMD[part_dtype, VEC](0))
        comptime for p in range(PASSES):
            var r = wid * 16 + i0 + p * RPP + lane // LPS
            var gr = r_begin + r
            if gr < rows:
                row_at[p] = (gr // group) * Hq + g * group + gr % group
                comptime for s in range(topk):
                    lse_at[p * topk + s] = lse_s[unsafe_offset=r * topk + s]
                load_row_slots[part_dtype, topk, D, VEC, PASSES * topk, p * topk](
                    o_p, row_at[p], col, lse_at, vals_at
                )
        comptime for p in range(PASSES):
            if row_at[p] >= 0:
                var r = wid * 16 + i0 + p * RPP + lane // LPS
                var extra = q_s.unsafe_load[width=VEC, alignment=16](tile_offset[LAY, FC_BM, D](r, col)).cast[
                    DType.float32
                ]()
                finish_row_cols[dtype, part_dtype, topk, D, VEC, PASSES * topk, p * topk](
                    output, lse, row_at[p], col, lse_at, vals_at, lse_f[unsafe_offset=r], extra, lane % LPS == 0,
                )


def forced_supported[dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int]() -> Bool:
    """The GPU kernel: the block attention's tensor-core tile steps, partials
    in the inputs' dtype, 16-byte merge loads."""
    return (
        mma_supported[dtype, head_dim, block_size]()
        and part_dtype == dtype
        and combine_vec_width[dtype, head_dim]() > 0
    )


def _launch_forced[
    dtype: DType, part_dtype: DType, //, target: StaticString, topk: Int, block_size: Int, group: Int,
    num_groups: Int, head_dim: Int, init_blocks: Int, local_blocks: Int, paged: Bool,
](
    output: Pointer[Scalar[dtype], MutAnyOrigin], lse: F32MutPtr, q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin], v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    o_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin], lse_p: F32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, scale: F32Ptr,
    table: I32Ptr, geom: I64Ptr, B: Int, T: Int, ctx: DeviceContext,
) raises:
    comptime assert init_blocks + local_blocks > 0, "msa_forced_combine: no forced blocks"
    comptime if is_cpu[target]():
        _forced_combine_cpu[dtype, part_dtype, head_dim, block_size, group, topk, init_blocks, local_blocks, paged](
            output, lse, q, k, v, o_p, lse_p, cu_q, cu_k, scale[unsafe_offset=0], B, num_groups,
            kv_addr[paged, num_groups, head_dim](table, geom),
        )
    else:
        comptime if forced_supported[dtype, part_dtype, head_dim, block_size]():
            # Hopper: the tile steps on wgmma where the block attention uses it
            comptime wgmma = hopper_target() and wgmma_supported[dtype, head_dim, block_size]()
            comptime assert FC_BM == MMA_BM, "the forced pass's Q tile is the attention's"
            comptime smem = mma_smem_bytes[dtype, head_dim, block_size, wgmma, q_tiles=1]()
            comptime kernel = forced_combine_kernel[
                dtype, part_dtype, head_dim, block_size, group, num_groups, topk, init_blocks, local_blocks, wgmma,
                paged,
            ]
            ctx.enqueue_function[kernel](
                output, lse, q, k, v, o_p, lse_p, cu_q, cu_k, scale, Int32(B), Int32(T), table, geom,
                grid_dim=(ceildiv(T * group, FC_BM), num_groups), block_dim=FC_WARPS * WARP_SIZE,
                shared_mem_bytes=smem, func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
            )
        else:
            raise Error(
                "msa_forced_combine: the GPU path needs 16-bit q, k, v with partials in the same dtype, D and"
                " block_size multiples of 16 up to 128"
            )


@register("msa_forced_combine")
struct MSAForcedCombine:
    """Out [T, Hq, D] and lse [T, Hq]: each query's forced blocks (sinks and
    local) attended to and merged with o_partial / lse_partial, the block
    attention's partials for its other slots (forced slots -inf)."""

    @staticmethod
    def execute[
        dtype: DType,
        part_dtype: DType,
        //,
        target: StaticString,
        topk: Int,
        block_size: Int,
        group: Int,
        num_groups: Int,
        head_dim: Int,
        init_blocks: Int,
        local_blocks: Int,
    ](
        output: OutputTensor[dtype=dtype, rank=3, ...],
        lse: OutputTensor[dtype=DType.float32, rank=2, ...],
        q: InputTensor[dtype=dtype, rank=3, ...],
        k: InputTensor[dtype=dtype, rank=3, ...],
        v: InputTensor[dtype=dtype, rank=3, ...],
        o_partial: InputTensor[dtype=part_dtype, rank=4, ...],
        lse_partial: InputTensor[dtype=DType.float32, rank=3, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q.dim_size(0)
        if q.dim_size(1) != group * num_groups or q.dim_size(2) != head_dim:
            raise Error("msa_forced_combine: q must be [T, Hq, D] with the op's Hq and D")
        if k.dim_size(1) != num_groups or k.dim_size(2) != head_dim:
            raise Error("msa_forced_combine: k must be [S, Hkv, D] with the op's Hkv and D")
        if (o_partial.dim_size(0) != T or o_partial.dim_size(1) != group * num_groups
                or o_partial.dim_size(2) != topk or o_partial.dim_size(3) != head_dim):
            raise Error("msa_forced_combine: o_partial must be [T, Hq, topk, D]")
        if T == 0:
            return
        _launch_forced[target, topk, block_size, group, num_groups, head_dim, init_blocks, local_blocks, False](
            output.unsafe_ptr(), lse.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
            o_partial.unsafe_ptr(), lse_partial.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(),
            scale.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), scale.unsafe_ptr().unsafe_bitcast[Int64](),
            cu_seqlens_q.dim_size(0) - 1, T, ctx,
        )


@register("msa_forced_combine_paged")
struct MSAForcedCombinePaged:
    """msa_forced_combine over paged caches (k_cache / v_cache flat, strides
    in geom, page_table [B, max_pages], cu_seqlens_k the prefix sums of the
    sequences' lengths)."""

    @staticmethod
    def execute[
        dtype: DType,
        part_dtype: DType,
        //,
        target: StaticString,
        topk: Int,
        block_size: Int,
        group: Int,
        num_groups: Int,
        head_dim: Int,
        init_blocks: Int,
        local_blocks: Int,
    ](
        output: OutputTensor[dtype=dtype, rank=3, ...],
        lse: OutputTensor[dtype=DType.float32, rank=2, ...],
        q: InputTensor[dtype=dtype, rank=3, ...],
        k_cache: InputTensor[dtype=dtype, rank=1, ...],
        v_cache: InputTensor[dtype=dtype, rank=1, ...],
        o_partial: InputTensor[dtype=part_dtype, rank=4, ...],
        lse_partial: InputTensor[dtype=DType.float32, rank=3, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        page_table: InputTensor[dtype=DType.int32, rank=2, ...],
        geom: InputTensor[dtype=DType.int64, rank=1, ...],
        scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q.dim_size(0)
        if q.dim_size(1) != group * num_groups or q.dim_size(2) != head_dim:
            raise Error("msa_forced_combine_paged: q must be [T, Hq, D] with the op's Hq and D")
        if T == 0:
            return
        _launch_forced[target, topk, block_size, group, num_groups, head_dim, init_blocks, local_blocks, True](
            output.unsafe_ptr(), lse.unsafe_ptr(), q.unsafe_ptr(), k_cache.unsafe_ptr(), v_cache.unsafe_ptr(),
            o_partial.unsafe_ptr(), lse_partial.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(),
            scale.unsafe_ptr(), page_table.unsafe_ptr(), geom.unsafe_ptr(), cu_seqlens_q.dim_size(0) - 1, T, ctx,
        )
