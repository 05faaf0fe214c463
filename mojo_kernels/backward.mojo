# Backward of the sparse attention (MSA.md "Backward for training"): dq, dk,
# dv for a fixed selection (block_ids are constants), block-major like the
# forward.
#
# For a (query, head) row whose softmax P runs over its selected visible
# keys, recomputed from the forward's lse (P = exp(scale q.k - lse)), with
# O = P V and the gradients dO of out and dlse of lse:
#   Dr = rowsum(dO * O) - dlse                       once per row
#   dP = dO V^T,  dS = P * (dP - Dr)
#   dV += P^T dO,  dK += scale dS^T Q,  dQ = scale dS K
# (a block in two slots is two splits, so it counts twice, as in the forward).
#
# Layouts: q, dout, out, dq [T, Hq, D]; k, v, dk, dv [S, Hkv, D]; lse, dlse
# [T, Hq] fp32; the inversion's CSR (row_ptr, entries) and work list of the
# plain pipeline (no forced-block skip); dq_partial [T, Hq, topk, D] (q's
# dtype if 16-bit, else fp32): one dQ per (row, slot), summed over the
# row's slots at the end (as the forward's combine sums its partials).
#
# Paths:
#   CPU: one task per (KV group, block row) of the CSR, in parallel: the
#        task owns its block's dK and dV (no reduction across tasks) and
#        streams every (entry, head) row that chose the block through the
#        five products on register tiles (cpu_tiles).
#   wgmma (Hopper, bf16, D 64 or 128, block_size 128): one thread block of
#        two warpgroups per work item, each owning 64 keys of the block
#        (keys in M) for the whole item; 64-row Q and dO tiles (rows in N),
#        all operands in the 128B-swizzled layout, metadata staged and tiles
#        double-buffered as below. Per tile: S^T = K_wg Q^T and dP^T =
#        V_wg dO^T are wgmma chains from shared memory; P^T and scale dS^T
#        (computed in the accumulators) become register A fragments for
#        dV_wg += P^T dO and dK_wg += dS^T Q (dO and Q read as MN-major B,
#        the forward's P V); dS is written to shared memory as [row][key],
#        and dQ = dS K is one chain per 64-column panel of D (warpgroup w
#        takes panel w). dK and dV of its 64 keys stay in each thread's
#        accumulators (2 x 64 floats) until the item ends.
#   mma.sync (bf16 / fp16, D and block_size multiples of 16 up to 128): one thread
#        block per work item, one warp per 16 keys of the block (mma.sync
#        m16n8k16, fp32 accumulate). The rows' metadata (dq partial row,
#        visible keys, lse, Dr) is staged in shared memory 1024 rows at a
#        time, so Q and dO tiles of 32 rows are gathered by cp.async with no
#        dependent global load, double-buffered: tile i + 1 is in flight
#        while tile i is computed (two barriers a tile). Each warp computes
#        S^T and dP^T for its keys
#        (keys in M, rows in N), keeps dK and dV of its keys in registers for
#        the whole item (P^T and dS^T go straight from accumulators to A
#        fragments), and writes scale dS^T to shared memory, from which the
#        warps compute the tile's dQ rows against K in units of 16 rows x 32
#        columns (one dS fragment feeds four products). At the end of the item
#        its dK / dV are added into fp32 accumulators (both GPU kernels) by
#        vector reductions, red.global.add.v4.f32: lane pairs swap halves of
#        each 8-column accumulator tile, so a lane adds 4 contiguous floats
#        (a quarter of the L2 transactions of scalar atomics); the last
#        kernel casts them to the inputs' dtype. A work item is at most
#        q_budget entries, so hot blocks spread over many thread blocks.
#   Preprocessing (GPU): Dr per row, D / 8 lanes a row with 16-byte loads.

from std.math import ceildiv, exp, exp2, iota
from std.memory import unsafe_stack_allocation
from std.sys import inlined_assembly, size_of
from std.utils.numerics import isnan, nan

from extensibility import InputTensor, OutputTensor, register
from max.algorithm import sync_parallelize
from max.gpu import WARP_SIZE, barrier, block_idx, lane_id, thread_idx
from max.gpu.compute.mma import mma, wgmma_async, wgmma_commit_group_sync, wgmma_fence_aligned, wgmma_wait_group_sync
from max.gpu.host import DeviceContext, FuncAttribute
from max.gpu.host.info import is_cpu
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory, fence_async_view_proxy,
)
from max.gpu.primitives import warp

from .attention import LOG2E, _Item, load_kv_tile, mma_supported
from .common import (
    LAYOUT_PADDED, LAYOUT_SW128, SW128_COLS, F32MutPtr, F32Ptr, I32Ptr, f32_neg_inf, frag_a, frag_b2, frag_b2_trans, hopper_target,
    kmajor_desc, kv_addr, position_of, pv_tile_wgmma, red_add_acc_frag, score_tile_wgmma, seq_of, sw128_mnmajor_desc, tile_offset,
    wgmma_acc_fence,
)
from .cpu_tiles import (
    CPU_R, CPU_W, F32Buf, FVec, int_scratch, mm_tile, mm_tile_into, pack_rows, pack_transposed, padded, release,
    scratch, tile_cols,
)

comptime BWD_ROWS = 32  # (entry, head) rows of a GPU tile
comptime BWD_WG_ROWS = 64  # rows of a wgmma tile (N of S^T, M of dQ)
comptime FINISH_COLS = 8  # dq / dk / dv values a thread of the finish kernel writes (16 bytes of bf16)
comptime BWD_CHUNK = 1024  # rows whose metadata is staged in shared memory at once (32 tiles)


@always_inline
def _part(t: Int, h: Int, slot: Int, num_heads: Int, topk: Int) -> Int:
    return (t * num_heads + h) * topk + slot


@always_inline
def _row_dot[dtype: DType, D: Int](a: Pointer[Scalar[dtype], ImmutAnyOrigin], b: Pointer[Scalar[dtype], ImmutAnyOrigin]) -> Float32:
    var s = Float32(0)
    for d in range(D):
        s += a[unsafe_offset=d].cast[DType.float32]() * b[unsafe_offset=d].cast[DType.float32]()
    return s


# ----------------------------------------------------------------------------- CPU
def _backward_cpu[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, topk: Int
](
    dq: Pointer[Scalar[dtype], MutAnyOrigin],
    dk: Pointer[Scalar[dtype], MutAnyOrigin],
    dv: Pointer[Scalar[dtype], MutAnyOrigin],
    dq_p: Pointer[Scalar[part_dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    o: Pointer[Scalar[dtype], ImmutAnyOrigin],
    dout: Pointer[Scalar[dtype], ImmutAnyOrigin],
    lse: F32Ptr, dlse: F32Ptr, block_ids: I32Ptr, row_offsets: I32Ptr, row_ptr: I32Ptr, entries: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale: Float32, num_seqs: Int, num_groups: Int, T: Int, S: Int, R: Int, r_max: Int,
):
    """Tasks of (group, block row): pack K^T, V^T and K of the block once, then
    the rows that chose it CPU_R at a time; the block's dK / dV stay in the
    task's scratch and are written once at the end."""
    comptime D = head_dim
    comptime DP = padded(D)
    comptime BP = padded(block_size)
    comptime NVK = tile_cols(BP)
    comptime NVD = tile_cols(DP)
    var Hq = num_groups * group
    for i in range(S * num_groups * D):  # keys no query chose get 0
        dk[unsafe_offset=i] = 0
        dv[unsafe_offset=i] = 0

    def task(i: Int) {dk, dv, dq_p, q, k, v, o, dout, lse, dlse, row_offsets, row_ptr, entries, cu_q, cu_k, scale,
                      num_seqs, num_groups, T, R, r_max, Hq}:
        var g = i // R
        var row = i % R
        var e0 = Int(row_ptr[unsafe_offset=g * (r_max + 1) + row])
        var e1 = Int(row_ptr[unsafe_offset=g * (r_max + 1) + row + 1])
        if e1 == e0:
            return
        var b = seq_of(row_offsets, num_seqs + 1, row)
        var j = row - Int(row_offsets[unsafe_offset=b])
        var q0 = Int(cu_q[unsafe_offset=b])
        var k0 = Int(cu_k[unsafe_offset=b])
        var tk = Int(cu_k[unsafe_offset=b + 1]) - k0
        var pos0 = tk - (Int(cu_q[unsafe_offset=b + 1]) - q0)
        var nk = min(block_size, tk - j * block_size)
        var kstart = k0 + j * block_size
        var buf = scratch(3 * DP * BP + 2 * (BP + CPU_R) * DP + CPU_R * (2 * DP + 3 * BP) + (BP + CPU_R) * CPU_R)
        var kt = buf  # K^T [D][BP]
        var vt = kt.unsafe_offset(DP * BP)  # V^T [D][BP]
        var kr = vt.unsafe_offset(DP * BP)  # K [BP][DP]
        var dk_s = kr.unsafe_offset(BP * DP)  # the block's dK, dV [BP + CPU_R][DP] (key tiles of CPU_R)
        var dv_s = dk_s.unsafe_offset((BP + CPU_R) * DP)
        var qs = dv_s.unsafe_offset((BP + CPU_R) * DP)  # the tile's Q, dO rows [CPU_R][DP]
        var dos = qs.unsafe_offset(CPU_R * DP)
        var pr = dos.unsafe_offset(CPU_R * DP)  # P [CPU_R][BP]
        var ds = pr.unsafe_offset(CPU_R * BP)  # scale dS [CPU_R][BP]
        var dp = ds.unsafe_offset(CPU_R * BP)  # dP [CPU_R][BP]
        var tr = dp.unsafe_offset(CPU_R * BP)  # P^T or dS^T [BP + CPU_R][CPU_R]
        var meta = int_scratch(2 * CPU_R)  # per tile row: visible keys, dq partial offset
        var kv_off = (kstart * num_groups + g) * D
        pack_transposed[dtype](kt, BP, k.unsafe_offset(kv_off), num_groups * D, nk, D)
        pack_transposed[dtype](vt, BP, v.unsafe_offset(kv_off), num_groups * D, nk, D)
        pack_rows[dtype](kr, DP, k.unsafe_offset(kv_off), num_groups * D, nk, D)
        var lse_r = Array[Float32, CPU_R](fill=0)
        var dr = Array[Float32, CPU_R](fill=0)
        var lanes = iota[DType.int32, CPU_W]()
        var rows = (e1 - e0) * group
        for r0 in range(0, rows, CPU_R):
            var kmax = 0
            for r in range(CPU_R):
                var nv = 0
                var off = -1
                if r0 + r < rows:
                    var ent = Int(entries[unsafe_offset=g * T * topk + e0 + (r0 + r) // group])
                    var t = ent // topk
                    var h = g * group + (r0 + r) % group
                    var rb = (t * Hq + h) * D
                    pack_rows[dtype](qs.unsafe_offset(r * DP), DP, q.unsafe_offset(rb), D, 1, D)
                    pack_rows[dtype](dos.unsafe_offset(r * DP), DP, dout.unsafe_offset(rb), D, 1, D)
                    nv = max(0, min(nk, pos0 + t - q0 - j * block_size + 1))
                    off = _part(t, h, ent % topk, Hq, topk)
                    lse_r[r] = lse[unsafe_offset=t * Hq + h]
                    dr[r] = _row_dot[dtype, D](dout.unsafe_offset(rb), o.unsafe_offset(rb)) - dlse[unsafe_offset=t * Hq + h]
                else:
                    for c in range(DP):
                        qs[unsafe_offset=r * DP + c] = 0
                        dos[unsafe_offset=r * DP + c] = 0
                meta[unsafe_offset=r] = nv
                meta[unsafe_offset=CPU_R + r] = off
                kmax = max(kmax, nv)
            # S = Q K^T and dP = dO V^T on register tiles, then P and scale dS per row
            for c in range(0, BP, NVK * CPU_W):
                var s_acc = mm_tile[CPU_R, NVK](qs, DP, kt.unsafe_offset(c), BP, D)
                var p_acc = mm_tile[CPU_R, NVK](dos, DP, vt.unsafe_offset(c), BP, D)
                comptime for r in range(CPU_R):
                    comptime for w in range(NVK):
                        var col = c + w * CPU_W
                        var seen = (lanes + Int32(col)).lt(SIMD[DType.int32, CPU_W](Int32(meta[unsafe_offset=r])))
                        var p = seen.select(exp(s_acc[r * NVK + w] * scale - lse_r[r]), FVec(0))
                        pr.unsafe_store(r * BP + col, p)
                        ds.unsafe_store(r * BP + col, seen.select(p * (p_acc[r * NVK + w] - dr[r]) * scale, FVec(0)))
            # dQ = scale dS K: each row's partial for its slot
            for c in range(0, DP, NVD * CPU_W):
                var acc = mm_tile[CPU_R, NVD](ds, BP, kr.unsafe_offset(c), DP, kmax)
                comptime for r in range(CPU_R):
                    var off = meta[unsafe_offset=CPU_R + r]
                    if off >= 0:
                        comptime for w in range(NVD):
                            var col = c + w * CPU_W
                            comptime for e in range(CPU_W):
                                if col + e < D:
                                    dq_p[unsafe_offset=off * D + col + e] = acc[r * NVD + w][e].cast[part_dtype]()
            # dV += P^T dO and dK += scale dS^T Q, CPU_R keys at a time
            comptime for which in range(2):
                var src = pr if which == 0 else ds
                var rhs = dos if which == 0 else qs
                var dst = dv_s if which == 0 else dk_s
                var kup = ceildiv(kmax, CPU_R) * CPU_R
                for key in range(kup):
                    comptime for r in range(CPU_R):
                        tr[unsafe_offset=key * CPU_R + r] = src[unsafe_offset=r * BP + key] if key < kmax else Float32(0)
                for k0_ in range(0, kmax, CPU_R):
                    for c in range(0, DP, NVD * CPU_W):
                        var acc = Array[FVec, CPU_R * NVD](fill=FVec(0))
                        comptime for r in range(CPU_R):
                            comptime for w in range(NVD):
                                acc[r * NVD + w] = dst.unsafe_load[width=CPU_W]((k0_ + r) * DP + c + w * CPU_W)
                        mm_tile_into[CPU_R, NVD](acc, tr.unsafe_offset(k0_ * CPU_R), CPU_R, rhs.unsafe_offset(c), DP, CPU_R)
                        comptime for r in range(CPU_R):
                            comptime for w in range(NVD):
                                dst.unsafe_store((k0_ + r) * DP + c + w * CPU_W, acc[r * NVD + w])
        for key in range(nk):
            var o = ((kstart + key) * num_groups + g) * D
            for d in range(D):
                dk[unsafe_offset=o + d] = dk_s[unsafe_offset=key * DP + d].cast[dtype]()
                dv[unsafe_offset=o + d] = dv_s[unsafe_offset=key * DP + d].cast[dtype]()
        release(buf)
        release(meta)

    sync_parallelize(task, num_groups * R)
    comptime CHUNK = 64  # dq rows per task

    def reduce(c: Int) {dq, dq_p, block_ids, cu_q, cu_k, num_seqs, num_groups, T, Hq}:
        for row in range(c * CHUNK, min(T * Hq, (c + 1) * CHUNK)):
            var t = row // Hq
            var g = (row % Hq) // group
            var jq = position_of(cu_q, cu_k, seq_of(cu_q, num_seqs, t), t) // block_size
            for d in range(D):
                var s = Float32(0)
                for slot in range(topk):  # the slots the inversion kept (ids in [0, own block]) were written
                    var j = Int(block_ids[unsafe_offset=(g * T + t) * topk + slot])
                    if j >= 0 and j <= jq:
                        s += dq_p[unsafe_offset=(row * topk + slot) * D + d].cast[DType.float32]()
                dq[unsafe_offset=row * D + d] = s.cast[dtype]()

    sync_parallelize(reduce, ceildiv(T * Hq, CHUNK))


# ----------------------------------------------------------------------------- GPU
comptime ROWDOT_VEC = 8  # values a lane loads at once (16 bytes of bf16)
comptime ROWDOT_THREADS = 8 * WARP_SIZE  # bwd_rowdot_kernel's block size


def rowdot_lanes(head_dim: Int) -> Int:
    """Lanes per row of bwd_rowdot_kernel: head_dim / 8 rounded up to a power
    of two (the shuffle tree's width)."""
    var n = 1
    while n * ROWDOT_VEC < head_dim:
        n *= 2
    return n


def bwd_rowdot_kernel[dtype: DType, head_dim: Int](
    dr: F32MutPtr, o: Pointer[Scalar[dtype], ImmutAnyOrigin], dout: Pointer[Scalar[dtype], ImmutAnyOrigin],
    dlse: F32Ptr, rows: Int32,
):
    """Dr = rowsum(dO * O) - dlse: rowdot_lanes(D) lanes per (t, h) row, 16-byte
    loads, a shuffle tree within the row's lanes (head_dim % 8 == 0)."""
    comptime L = rowdot_lanes(head_dim)
    comptime V = ROWDOT_VEC
    var lane = Int(lane_id())
    var row = (Int(block_idx.x) * ROWDOT_THREADS + Int(thread_idx.x)) // L
    var c = (lane % L) * V
    var s = Float32(0)
    if row < Int(rows) and c < head_dim:
        var a = o.unsafe_load[width=V, alignment=V * size_of[dtype]()](row * head_dim + c).cast[DType.float32]()
        var b = dout.unsafe_load[width=V, alignment=V * size_of[dtype]()](row * head_dim + c).cast[DType.float32]()
        s = (a * b).reduce_add()
    comptime for i in range(5):  # xor L/2, ..., 1: stays within the row's lanes
        comptime if (L >> (i + 1)) > 0:
            s += warp.shuffle_xor(s, UInt32(L >> (i + 1)))
    if row < Int(rows) and lane % L == 0:
        dr[unsafe_offset=row] = s - dlse[unsafe_offset=row]


comptime SharedF32 = Pointer[Float32, MutUntrackedOrigin, address_space=AddressSpace.SHARED]
comptime SharedI32 = Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED]


@always_inline
def stage_row_meta[group: Int, topk: Int, Hq: Int, BS: Int, NT: Int](
    it: _Item, entries: I32Ptr, nent: Int, lse: F32Ptr, dr: F32Ptr, c0: Int, rows: Int, rows_total: Int, tid: Int,
    lse2: SharedF32, dr_s: SharedF32, nvis: SharedI32, poff: SharedI32,
):
    """The metadata of the item's rows c0 .. c0 + rows - 1 into shared memory
    (NT threads): lse * log2(e), Dr, the block's keys the row sees, its dq
    partial row; rows past the item get 0 keys and partial row -1."""
    for r in range(tid, rows, NT):
        var mr = c0 + r
        var nv = 0
        var off = -1
        var l2 = Float32(0)
        var d_r = Float32(0)
        if mr < rows_total:
            var ent = it.entry(entries, nent, mr // group)
            var t = ent // topk
            var h = it.g * group + mr % group
            nv = it.visible(t, BS)
            off = _part(t, h, ent % topk, Hq, topk)
            l2 = lse[unsafe_offset=t * Hq + h] * LOG2E
            d_r = dr[unsafe_offset=t * Hq + h]
        nvis[unsafe_offset=r] = Int32(nv)
        poff[unsafe_offset=r] = Int32(off)
        lse2[unsafe_offset=r] = l2
        dr_s[unsafe_offset=r] = d_r


@always_inline
def gather_rows[dtype: DType, layout: Int, RT: Int, D: Int, NT: Int, topk: Int](
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    dout: Pointer[Scalar[dtype], ImmutAnyOrigin],
    q_buf: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    do_buf: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    poff: SharedI32, tile: Int, tid: Int,
):
    """cp.async of the staged rows tile * RT .. of Q and dO (the rows poff
    names: dq partial row // topk is the row of q) into buffer tile % 2 of
    q_buf / do_buf in `layout` (RT x D tiles), zeros for padding rows; NT
    threads, one commit."""
    comptime CPR = D // 8  # 16-byte chunks per row
    comptime TILE = RT * (D + 8) if layout == LAYOUT_PADDED else RT * D
    var qg = q.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var dog = dout.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var qd = q_buf.unsafe_offset((tile % 2) * TILE)
    var dd = do_buf.unsafe_offset((tile % 2) * TILE)
    for i in range(tid, RT * CPR, NT):
        var r = i // CPR
        var c = (i % CPR) * 8
        var so = tile_offset[layout, RT, D](r, c)
        var off = Int(poff[unsafe_offset=tile * RT + r])
        if off >= 0:
            var src = (off // topk) * D + c
            async_copy[16](qg.unsafe_offset(src), qd.unsafe_offset(so))
            async_copy[16](dog.unsafe_offset(src), dd.unsafe_offset(so))
        else:
            qd.unsafe_store[alignment=16](so, SIMD[dtype, 8](0))
            dd.unsafe_store[alignment=16](so, SIMD[dtype, 8](0))
    async_copy_commit_group()


def backward_mma_kernel[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, num_groups: Int, topk: Int,
](
    dq_p: Pointer[Scalar[part_dtype], MutAnyOrigin],
    dk_acc: F32MutPtr,
    dv_acc: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    dout: Pointer[Scalar[dtype], ImmutAnyOrigin],
    lse: F32Ptr, dr: F32Ptr, row_offsets: I32Ptr, entries: I32Ptr, work: I32Ptr, num_work: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale_p: F32Ptr, num_seqs: Int32, T: Int32,
):
    comptime D = head_dim
    comptime BS = block_size
    comptime KS = D + 8  # padded rows (elements) of K, V, Q and dO tiles: conflict-free ldmatrix
    comptime SS = BS + 8  # padded rows of the dS tile [rows][keys]
    comptime NW = BS // 16  # warps: one per 16 keys
    comptime NT = NW * WARP_SIZE
    comptime RT = BWD_ROWS
    comptime Hq = num_groups * group
    comptime DN = D // 8  # n8 tiles over D
    comptime CH = BWD_CHUNK
    comptime UC = 32 if D % 32 == 0 else 16  # columns of D in a dQ unit
    var w = Int(block_idx.x)
    if w >= Int(num_work[unsafe_offset=0]):
        return
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    var it = _Item(work, w, row_offsets, cu_q, cu_k, Int(num_seqs), BS)
    if it.count == 0:
        return
    var smem = external_memory[Scalar[dtype], address_space=AddressSpace.SHARED, alignment=128]()
    var k_s = smem
    var v_s = k_s.unsafe_offset(BS * KS)
    var q_buf = v_s.unsafe_offset(BS * KS)  # Q tiles [2][RT][KS]: the tile in use and the next one in flight
    var do_buf = q_buf.unsafe_offset(2 * RT * KS)  # dO tiles, the same
    var ds_s = do_buf.unsafe_offset(2 * RT * KS)  # scale dS [RT rows][BS keys]
    # per-row metadata of up to CH rows (a chunk of the item), staged once so
    # that a tile's gather has no dependent global load
    var lse2 = unsafe_stack_allocation[CH, Float32, address_space=AddressSpace.SHARED]()  # lse * log2(e)
    var dr_s = unsafe_stack_allocation[CH, Float32, address_space=AddressSpace.SHARED]()
    var nvis = unsafe_stack_allocation[CH, Int32, address_space=AddressSpace.SHARED]()
    var poff = unsafe_stack_allocation[CH, Int32, address_space=AddressSpace.SHARED]()  # dq partial row, -1: padding
    var kv_base = it.kv_base[False](kv_addr[False, num_groups, D](cu_k, scale_p.unsafe_bitcast[Int64]()), cu_k, BS)
    load_kv_tile[dtype, LAYOUT_PADDED, BS, D, NT](k, v, k_s, v_s, kv_base, num_groups * D, it.nk, tid)
    async_copy_commit_group()
    var scale = scale_p[unsafe_offset=0]
    var scale_log2 = scale * LOG2E
    var nent = Int(T) * topk
    var rows_total = it.count * group
    var t2 = (lane % 4) * 2
    var key_a = wid * 16 + lane // 4  # this thread's keys in the accumulators: key_a, key_a + 8
    var dk_w = Array[SIMD[DType.float32, 4], DN](fill=SIMD[DType.float32, 4](0))
    var dv_w = Array[SIMD[DType.float32, 4], DN](fill=SIMD[DType.float32, 4](0))
    for c0 in range(0, rows_total, CH):
        var ntiles = ceildiv(min(CH, rows_total - c0), RT)
        if c0 > 0:
            barrier()  # the last chunk's dQ rows have read their metadata
        stage_row_meta[group, topk, Hq, BS, NT](it, entries, nent, lse, dr, c0, ntiles * RT, rows_total, tid,
                                                 lse2, dr_s, nvis, poff)
        barrier()

        @always_inline
        def gather(tile: Int) {q, dout, q_buf, do_buf, poff, tid}:
            gather_rows[dtype, LAYOUT_PADDED, RT, D, NT, topk](q, dout, q_buf, do_buf, poff, tile, tid)

        gather(0)
        for ti in range(ntiles):
            async_copy_wait_group(0)
            barrier()  # tile ti (and the block) landed; every warp is done with tile ti - 1
            if ti + 1 < ntiles:
                gather(ti + 1)  # in flight while tile ti is computed
            var q_s = q_buf.unsafe_offset((ti % 2) * RT * KS)
            var do_s = do_buf.unsafe_offset((ti % 2) * RT * KS)
            var m0 = ti * RT  # the tile's first row in the staged metadata
            # S^T = K_w Q^T and dP^T = V_w dO^T: this warp's 16 keys x RT rows
            var s_t = Array[SIMD[DType.float32, 4], RT // 8](fill=SIMD[DType.float32, 4](0))
            var dp_t = Array[SIMD[DType.float32, 4], RT // 8](fill=SIMD[DType.float32, 4](0))
            comptime for kk in range(D // 16):
                var ka = frag_a[dtype, KS](k_s.unsafe_offset(wid * 16 * KS + kk * 16), lane)
                var va = frag_a[dtype, KS](v_s.unsafe_offset(wid * 16 * KS + kk * 16), lane)
                comptime for n2 in range(RT // 16):
                    var qb = frag_b2[dtype, KS](q_s.unsafe_offset(n2 * 16 * KS + kk * 16), lane).split()
                    var db = frag_b2[dtype, KS](do_s.unsafe_offset(n2 * 16 * KS + kk * 16), lane).split()
                    comptime for h in range(2):
                        var d0 = SIMD[DType.float32, 4](0)
                        mma(d0, ka, qb[h], s_t[2 * n2 + h])
                        s_t[2 * n2 + h] = d0
                        var d1 = SIMD[DType.float32, 4](0)
                        mma(d1, va, db[h], dp_t[2 * n2 + h])
                        dp_t[2 * n2 + h] = d1
            # P^T and scale dS^T; element e of tile n: key key_a + 8 (e // 2), row 8 n + t2 + e % 2
            comptime for n in range(RT // 8):
                var x = s_t[n]
                var y = dp_t[n]
                comptime for e in range(4):
                    var r = m0 + n * 8 + t2 + e % 2
                    var key = key_a + 8 * (e // 2)
                    var p = Float32(0)
                    if key < Int(nvis[unsafe_offset=r]):
                        p = exp2(x[e] * scale_log2 - lse2[unsafe_offset=r])
                    x[e] = p
                    y[e] = p * (y[e] - dr_s[unsafe_offset=r]) * scale
                s_t[n] = x
                dp_t[n] = y
            # dV_w += P^T dO, dK_w += (scale dS^T) Q: rows are the K dimension
            comptime for kk2 in range(RT // 16):
                var pa = s_t[2 * kk2].join(s_t[2 * kk2 + 1]).cast[dtype]()
                var dsa = dp_t[2 * kk2].join(dp_t[2 * kk2 + 1]).cast[dtype]()
                comptime for dn2 in range(D // 16):
                    var ob = frag_b2_trans[dtype, KS](do_s.unsafe_offset(kk2 * 16 * KS + dn2 * 16), lane).split()
                    var qb = frag_b2_trans[dtype, KS](q_s.unsafe_offset(kk2 * 16 * KS + dn2 * 16), lane).split()
                    comptime for h in range(2):
                        var d0 = SIMD[DType.float32, 4](0)
                        mma(d0, pa, ob[h], dv_w[2 * dn2 + h])
                        dv_w[2 * dn2 + h] = d0
                        var d1 = SIMD[DType.float32, 4](0)
                        mma(d1, dsa, qb[h], dk_w[2 * dn2 + h])
                        dk_w[2 * dn2 + h] = d1
            # scale dS into shared memory as [row][key]
            comptime for n in range(RT // 8):
                comptime for e in range(4):
                    ds_s[unsafe_offset=(n * 8 + t2 + e % 2) * SS + key_a + 8 * (e // 2)] = dp_t[n][e].cast[dtype]()
            barrier()
            # dQ = (scale dS) K for the tile's rows: units of 16 rows x UC columns of D over
            # the warps (one A fragment of dS feeds UC / 8 products)
            comptime UNITS = (RT // 16) * (D // UC)
            comptime for u0 in range(0, UNITS, NW):
                var u = u0 + wid
                if u < UNITS:
                    var mt = u // (D // UC)
                    var nc = u % (D // UC)
                    var acc = Array[SIMD[DType.float32, 4], UC // 8](fill=SIMD[DType.float32, 4](0))
                    comptime for kk in range(BS // 16):
                        var a = frag_a[dtype, SS](ds_s.unsafe_offset(mt * 16 * SS + kk * 16), lane)
                        comptime for nb in range(UC // 16):
                            var bb = frag_b2_trans[dtype, KS](k_s.unsafe_offset(kk * 16 * KS + nc * UC + nb * 16), lane).split()
                            comptime for h in range(2):
                                var d0 = SIMD[DType.float32, 4](0)
                                mma(d0, a, bb[h], acc[2 * nb + h])
                                acc[2 * nb + h] = d0
                    var r0 = m0 + mt * 16 + lane // 4
                    var p0 = Int(poff[unsafe_offset=r0])
                    var p1 = Int(poff[unsafe_offset=r0 + 8])
                    comptime for n8 in range(UC // 8):
                        var col = nc * UC + n8 * 8 + t2
                        if p0 >= 0:
                            dq_p.unsafe_store[alignment=2 * size_of[part_dtype]()](
                                p0 * D + col, SIMD[DType.float32, 2](acc[n8][0], acc[n8][1]).cast[part_dtype]())
                        if p1 >= 0:
                            dq_p.unsafe_store[alignment=2 * size_of[part_dtype]()](
                                p1 * D + col, SIMD[DType.float32, 2](acc[n8][2], acc[n8][3]).cast[part_dtype]())
    # this item's dK / dV of the block, added into the fp32 accumulators
    comptime for n in range(DN):
        var o = kv_base + key_a * num_groups * D + n * 8 + t2
        var o8 = o + 8 * num_groups * D
        red_add_acc_frag(dk_acc, dk_w[n], o, o8, key_a < it.nk, key_a + 8 < it.nk)
        red_add_acc_frag(dv_acc, dv_w[n], o, o8, key_a < it.nk, key_a + 8 < it.nk)


@always_inline
def opaque_zero() -> Int:
    """0, from an asm the compiler cannot see through: a wgmma chain's
    descriptors built from base + opaque_zero() are formed where the chain
    is issued instead of being hoisted out of the tile loop as invariants
    (16 live 64-bit registers per chain, which spill at 255)."""
    return Int(inlined_assembly["mov.u32 $0, 0;", Int32, constraints="=r", has_side_effect=True]())


@always_inline
def dq_tile_wgmma[dtype: DType, BS: Int](
    ds_t: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    k_panel: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    acc_regs: SIMD[DType.float32, SW128_COLS // 2],
) -> SIMD[DType.float32, SW128_COLS // 2]:
    """Issues (and commits) the warpgroup's 64 x 64 tile dQ = dS K: dS
    [row][key] (64 rows x BS keys, SW128) as the K-major A operand, K
    [key][d] as the MN-major B operand, one 64-column panel of it at
    k_panel. The first wgmma ignores acc_regs."""
    var acc = acc_regs
    wgmma_fence_aligned()
    comptime for kk in range(BS // 16):
        comptime a_off = tile_offset[LAYOUT_SW128, BWD_WG_ROWS, BS](0, kk * 16)
        acc = wgmma_async[
            64, SW128_COLS, 16, DType.float32, SW128_COLS // 2, a_type=dtype, b_type=dtype, layout_b="row",
            scale_d=0 if kk == 0 else 1,
        ](
            kmajor_desc[dtype, LAYOUT_SW128, BS](ds_t.unsafe_offset(a_off)),
            sw128_mnmajor_desc[dtype, BS](k_panel.unsafe_offset(kk * 16 * SW128_COLS)),
            acc,
        )
    wgmma_commit_group_sync()
    return acc


def backward_wgmma_kernel[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, num_groups: Int, topk: Int,
    tile_rows: Int,
](
    dq_p: Pointer[Scalar[part_dtype], MutAnyOrigin],
    dk_acc: F32MutPtr,
    dv_acc: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    dout: Pointer[Scalar[dtype], ImmutAnyOrigin],
    lse: F32Ptr, dr: F32Ptr, row_offsets: I32Ptr, entries: I32Ptr, work: I32Ptr, num_work: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale_p: F32Ptr, num_seqs: Int32, T: Int32,
):
    """The backward on Hopper's warpgroup MMA: two warpgroups, each owning 64
    keys of the block (keys in M), 64-row Q / dO tiles (rows in N). S^T and
    dP^T are wgmma chains from shared memory (K or V as A, the Q or dO tile
    as B, both K-major); P^T and scale dS^T go from their accumulators into
    register A fragments for dV += P^T dO and dK += dS^T Q (dO and Q as
    MN-major B), the same registers as the forward's P V; dS is written to
    shared memory as [row][key] and dQ = dS K is one chain per 64-column
    panel of D (one warpgroup each)."""
    comptime D = head_dim
    comptime BS = block_size
    comptime RT = tile_rows  # BWD_WG_ROWS (a parameter: the wgmma helpers' register counts are expressions of it)
    comptime NT = 2 * 4 * WARP_SIZE
    comptime Hq = num_groups * group
    comptime CH = BWD_CHUNK
    comptime TILE = RT * D
    comptime PC = SW128_COLS
    comptime DQ_WGS = D // PC  # warpgroups computing dQ: one per 64-column panel
    var w = Int(block_idx.x)
    if w >= Int(num_work[unsafe_offset=0]):
        return
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    var wg = wid // 4
    var it = _Item(work, w, row_offsets, cu_q, cu_k, Int(num_seqs), BS)
    if it.count == 0:
        return
    # 1024-byte aligned: the swizzle is a function of the shared address
    var smem = external_memory[Scalar[dtype], address_space=AddressSpace.SHARED, alignment=1024]()
    var k_s = smem
    var v_s = k_s.unsafe_offset(BS * D)
    var q_buf = v_s.unsafe_offset(BS * D)  # Q tiles [2][RT x D]: the tile in use and the next one in flight
    var do_buf = q_buf.unsafe_offset(2 * TILE)  # dO tiles, the same
    var ds_s = do_buf.unsafe_offset(2 * TILE)  # scale dS [RT rows][BS keys]
    var lse2 = unsafe_stack_allocation[CH, Float32, address_space=AddressSpace.SHARED]()  # lse * log2(e)
    var dr_s = unsafe_stack_allocation[CH, Float32, address_space=AddressSpace.SHARED]()
    var nvis = unsafe_stack_allocation[CH, Int32, address_space=AddressSpace.SHARED]()
    var poff = unsafe_stack_allocation[CH, Int32, address_space=AddressSpace.SHARED]()  # dq partial row, -1: padding
    var kv_base = it.kv_base[False](kv_addr[False, num_groups, D](cu_k, scale_p.unsafe_bitcast[Int64]()), cu_k, BS)
    load_kv_tile[dtype, LAYOUT_SW128, BS, D, NT](k, v, k_s, v_s, kv_base, num_groups * D, it.nk, tid)
    async_copy_commit_group()
    var scale = scale_p[unsafe_offset=0]
    var scale_log2 = scale * LOG2E
    var nent = Int(T) * topk
    var rows_total = it.count * group
    var t2 = (lane % 4) * 2
    var key_lo = wg * 64 + (wid % 4) * 16 + lane // 4  # this thread's keys in S^T: key_lo, key_lo + 8
    var a_k = k_s.unsafe_offset(wg * 64 * PC)  # this warpgroup's 64 keys (rows of the SW128 tile)
    var a_v = v_s.unsafe_offset(wg * 64 * PC)
    var dk_wg = SIMD[DType.float32, D // 2](0)
    var dv_wg = SIMD[DType.float32, D // 2](0)
    for c0 in range(0, rows_total, CH):
        var ntiles = ceildiv(min(CH, rows_total - c0), RT)
        if c0 > 0:
            barrier()  # the last chunk's dQ rows have read their metadata
        stage_row_meta[group, topk, Hq, BS, NT](it, entries, nent, lse, dr, c0, ntiles * RT, rows_total, tid,
                                                 lse2, dr_s, nvis, poff)
        barrier()

        @always_inline
        def gather(tile: Int) {q, dout, q_buf, do_buf, poff, tid}:
            gather_rows[dtype, LAYOUT_SW128, RT, D, NT, topk](q, dout, q_buf, do_buf, poff, tile, tid)

        gather(0)
        for ti in range(ntiles):
            async_copy_wait_group(0)
            fence_async_view_proxy()  # cp.async and st.shared writes -> visible to wgmma's async proxy
            barrier()  # tile ti (and the block) landed; every warpgroup is done with tile ti - 1
            if ti + 1 < ntiles:
                gather(ti + 1)  # in flight while tile ti is computed
            var q_cur = q_buf.unsafe_offset((ti % 2) * TILE)
            var do_cur = do_buf.unsafe_offset((ti % 2) * TILE)
            var m0 = ti * RT  # the tile's first row in the staged metadata
            # fresh accumulators: no chain is in flight here; descriptors formed here (opaque_zero)
            var z0 = opaque_zero()
            var s_t = score_tile_wgmma[dtype, D, RT, LAYOUT_SW128, BS](
                a_k.unsafe_offset(z0), q_cur, SIMD[DType.float32, RT // 2](0))
            var dp_t = score_tile_wgmma[dtype, D, RT, LAYOUT_SW128, BS](
                a_v.unsafe_offset(z0), do_cur, SIMD[DType.float32, RT // 2](0))
            wgmma_wait_group_sync[0]()
            s_t = wgmma_acc_fence[RT // 2](s_t)
            dp_t = wgmma_acc_fence[RT // 2](dp_t)
            # P^T and scale dS^T; element e of n8 tile n: key key_lo + 8 (e // 2), row 8 n + t2 + e % 2
            var p_acc = Array[SIMD[DType.float32, 4], RT // 8](fill=SIMD[DType.float32, 4](0))
            var ds_acc = Array[SIMD[DType.float32, 4], RT // 8](fill=SIMD[DType.float32, 4](0))
            comptime for n in range(RT // 8):
                var x = s_t.slice[4, offset=4 * n]()
                var y = dp_t.slice[4, offset=4 * n]()
                comptime for e in range(4):
                    var r = m0 + n * 8 + t2 + e % 2
                    var p = Float32(0)
                    if key_lo + 8 * (e // 2) < Int(nvis[unsafe_offset=r]):
                        p = exp2(x[e] * scale_log2 - lse2[unsafe_offset=r])
                    x[e] = p
                    y[e] = p * (y[e] - dr_s[unsafe_offset=r]) * scale
                p_acc[n] = x
                ds_acc[n] = y
            dv_wg = pv_tile_wgmma[dtype, D, RT, accumulate=True](p_acc, do_cur, dv_wg)
            dk_wg = pv_tile_wgmma[dtype, D, RT, accumulate=True](ds_acc, q_cur, dk_wg)
            # scale dS into shared memory as [row][key], the A operand of dQ
            comptime for n in range(RT // 8):
                comptime for e in range(4):
                    ds_s[unsafe_offset=tile_offset[LAYOUT_SW128, RT, BS](n * 8 + t2 + e % 2, key_lo + 8 * (e // 2))] = (
                        ds_acc[n][e].cast[dtype]()
                    )
            fence_async_view_proxy()
            barrier()  # both warpgroups' keys of dS are in place
            wgmma_wait_group_sync[0]()  # dV, dK of this tile
            dv_wg = wgmma_acc_fence[D // 2](dv_wg)
            dk_wg = wgmma_acc_fence[D // 2](dk_wg)
            if wg < DQ_WGS:
                var z = opaque_zero()
                var dq = SIMD[DType.float32, PC // 2](0)
                dq = dq_tile_wgmma[dtype, BS](ds_s.unsafe_offset(z), k_s.unsafe_offset(wg * BS * PC + z), dq)
                wgmma_wait_group_sync[0]()
                dq = wgmma_acc_fence[PC // 2](dq)
                var r0 = m0 + (wid % 4) * 16 + lane // 4
                var p0 = Int(poff[unsafe_offset=r0])
                var p1 = Int(poff[unsafe_offset=r0 + 8])
                comptime for n8 in range(PC // 8):
                    var col = wg * PC + n8 * 8 + t2
                    if p0 >= 0:
                        dq_p.unsafe_store[alignment=2 * size_of[part_dtype]()](
                            p0 * D + col, SIMD[DType.float32, 2](dq[4 * n8], dq[4 * n8 + 1]).cast[part_dtype]())
                    if p1 >= 0:
                        dq_p.unsafe_store[alignment=2 * size_of[part_dtype]()](
                            p1 * D + col, SIMD[DType.float32, 2](dq[4 * n8 + 2], dq[4 * n8 + 3]).cast[part_dtype]())
    # this item's dK / dV of the block, added into the fp32 accumulators
    comptime for n in range(D // 8):
        var o = kv_base + key_lo * num_groups * D + n * 8 + t2
        var o8 = o + 8 * num_groups * D
        red_add_acc_frag(dk_acc, dk_wg.slice[4, offset=4 * n](), o, o8, key_lo < it.nk, key_lo + 8 < it.nk)
        red_add_acc_frag(dv_acc, dv_wg.slice[4, offset=4 * n](), o, o8, key_lo < it.nk, key_lo + 8 < it.nk)


def bwd_finish_kernel[dtype: DType, part_dtype: DType, head_dim: Int, topk: Int, block_size: Int, num_groups: Int](
    dq: Pointer[Scalar[dtype], MutAnyOrigin], dk: Pointer[Scalar[dtype], MutAnyOrigin],
    dv: Pointer[Scalar[dtype], MutAnyOrigin], dq_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin],
    dk_acc: F32Ptr, dv_acc: F32Ptr, block_ids: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, num_seqs: Int32, T: Int32,
    num_heads: Int32, S: Int32,
):
    """dq = sum of the row's written partials (slots whose id lies in [0, own
    block], the ones the inversion kept), one thread per (row, 8 columns):
    16-byte loads of the partials, which a row's threads read as whole rows;
    then dk, dv cast from their accumulators, 8 values a thread."""
    comptime V = FINISH_COLS
    comptime CPR = head_dim // V
    var i = Int(block_idx.x) * 256 + Int(thread_idx.x)
    if i < Int(T) * Int(num_heads) * CPR:
        var row = i // CPR
        var d = (i % CPR) * V
        var t = row // Int(num_heads)
        var g = (row % Int(num_heads)) // (Int(num_heads) // num_groups)
        var jq = position_of(cu_q, cu_k, seq_of(cu_q, Int(num_seqs), t), t) // block_size
        var s = SIMD[DType.float32, V](0)
        comptime for slot in range(topk):
            var j = Int(block_ids[unsafe_offset=(g * Int(T) + t) * topk + slot])
            if j >= 0 and j <= jq:
                s += dq_p.unsafe_load[width=V, alignment=V * size_of[part_dtype]()](
                    (row * topk + slot) * head_dim + d).cast[DType.float32]()
        dq.unsafe_store[alignment=V * size_of[dtype]()](row * head_dim + d, s.cast[dtype]())
    if i < Int(S) * num_groups * CPR:
        dk.unsafe_store[alignment=V * size_of[dtype]()](i * V, dk_acc.unsafe_load[width=V, alignment=4 * V](i * V).cast[dtype]())
        dv.unsafe_store[alignment=V * size_of[dtype]()](i * V, dv_acc.unsafe_load[width=V, alignment=4 * V](i * V).cast[dtype]())


def backward_smem_bytes[dtype: DType, head_dim: Int, block_size: Int]() -> Int:
    """Dynamic shared memory: K, V, two Q and two dO tiles, and dS (the staged
    metadata is static)."""
    return ((2 * block_size + 4 * BWD_ROWS) * (head_dim + 8) + BWD_ROWS * (block_size + 8)) * size_of[dtype]()


def backward_gpu_supported[dtype: DType, head_dim: Int, block_size: Int]() -> Bool:
    return mma_supported[dtype, head_dim, block_size]()


def backward_wgmma_smem_bytes[dtype: DType, head_dim: Int, block_size: Int]() -> Int:
    """Dynamic shared memory of the wgmma path: K, V, two Q and two dO tiles
    and dS, 128B-swizzled (no padding)."""
    return ((2 * block_size + 4 * BWD_WG_ROWS) * head_dim + BWD_WG_ROWS * block_size) * size_of[dtype]()


def backward_wgmma_supported[dtype: DType, head_dim: Int, block_size: Int]() -> Bool:
    """bfloat16, whole 64-column swizzle panels of D, 128-key blocks (two
    warpgroups of 64 keys); the caller checks for a Hopper device."""
    return dtype == DType.bfloat16 and head_dim % SW128_COLS == 0 and head_dim <= 128 and block_size == 128


@register("msa_sparse_backward")
struct MSASparseBackward:
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
    ](
        dq: OutputTensor[dtype=dtype, rank=3, ...],
        dk: OutputTensor[dtype=dtype, rank=3, ...],
        dv: OutputTensor[dtype=dtype, rank=3, ...],
        dq_partial: OutputTensor[dtype=part_dtype, rank=4, ...],  # scratch [T, Hq, topk, D]
        scratch_f32: OutputTensor[dtype=DType.float32, rank=1, ...],  # GPU: dk, dv accumulators, Dr
        q: InputTensor[dtype=dtype, rank=3, ...],
        k: InputTensor[dtype=dtype, rank=3, ...],
        v: InputTensor[dtype=dtype, rank=3, ...],
        o: InputTensor[dtype=dtype, rank=3, ...],  # the forward's out
        dout: InputTensor[dtype=dtype, rank=3, ...],
        lse: InputTensor[dtype=DType.float32, rank=2, ...],
        dlse: InputTensor[dtype=DType.float32, rank=2, ...],
        block_ids: InputTensor[dtype=DType.int32, rank=3, ...],
        row_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        row_ptr: InputTensor[dtype=DType.int32, rank=2, ...],
        entries: InputTensor[dtype=DType.int32, rank=2, ...],
        work: InputTensor[dtype=DType.int32, rank=2, ...],
        num_work: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q.dim_size(0)
        var S = k.dim_size(0)
        var B = cu_seqlens_q.dim_size(0) - 1
        var Hq = group * num_groups
        if q.dim_size(1) != Hq or q.dim_size(2) != head_dim or k.dim_size(1) != num_groups or k.dim_size(2) != head_dim:
            raise Error("msa_sparse_backward: q must be [T, Hq, D] and k, v [S, Hkv, D] with the op's Hq, Hkv and D")
        if scratch_f32.dim_size(0) < 2 * S * num_groups * head_dim + T * Hq:
            raise Error("msa_sparse_backward: scratch too small")
        var r_max = row_ptr.dim_size(1) - 1
        comptime if is_cpu[target]():
            if T == 0 and S == 0:
                return
            _backward_cpu[dtype, part_dtype, head_dim, block_size, group, topk](
                dq.unsafe_ptr(), dk.unsafe_ptr(), dv.unsafe_ptr(), dq_partial.unsafe_ptr(), q.unsafe_ptr(),
                k.unsafe_ptr(), v.unsafe_ptr(), o.unsafe_ptr(), dout.unsafe_ptr(), lse.unsafe_ptr(),
                dlse.unsafe_ptr(), block_ids.unsafe_ptr(), row_offsets.unsafe_ptr(), row_ptr.unsafe_ptr(),
                entries.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), scale[0], B, num_groups, T, S,
                Int(row_offsets[B]), r_max,
            )
        else:
            comptime assert backward_gpu_supported[dtype, head_dim, block_size](), "msa_sparse_backward: the GPU backward needs bf16/fp16 with D and block_size multiples of 16 up to 128"
            var nkv = S * num_groups * head_dim
            var dk_acc = scratch_f32.unsafe_ptr()
            var dv_acc = dk_acc.unsafe_offset(nkv)
            var dr = dv_acc.unsafe_offset(nkv)
            ctx.enqueue_memset(scratch_f32.to_device_buffer(ctx), Float32(0))
            if T > 0:
                ctx.enqueue_function[bwd_rowdot_kernel[dtype, head_dim]](
                    dr, o.unsafe_ptr(), dout.unsafe_ptr(), dlse.unsafe_ptr(), Int32(T * Hq),
                    grid_dim=ceildiv(T * Hq, ROWDOT_THREADS // rowdot_lanes(head_dim)), block_dim=ROWDOT_THREADS,
                )
                # Hopper: warpgroup MMA; mma.sync elsewhere
                comptime if hopper_target() and backward_wgmma_supported[dtype, head_dim, block_size]():
                    comptime smem = backward_wgmma_smem_bytes[dtype, head_dim, block_size]()
                    comptime kernel = backward_wgmma_kernel[dtype, part_dtype, head_dim, block_size, group, num_groups, topk, BWD_WG_ROWS]
                    if work.dim_size(0) > 0:
                        ctx.enqueue_function[kernel](
                            dq_partial.unsafe_ptr(), dk_acc, dv_acc, q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
                            dout.unsafe_ptr(), lse.unsafe_ptr(), dr, row_offsets.unsafe_ptr(), entries.unsafe_ptr(),
                            work.unsafe_ptr(), num_work.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(),
                            scale.unsafe_ptr(), Int32(B), Int32(T),
                            grid_dim=work.dim_size(0), block_dim=8 * WARP_SIZE, shared_mem_bytes=smem,
                            func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
                        )
                else:
                    comptime smem = backward_smem_bytes[dtype, head_dim, block_size]()
                    comptime kernel = backward_mma_kernel[dtype, part_dtype, head_dim, block_size, group, num_groups, topk]
                    if work.dim_size(0) > 0:
                        ctx.enqueue_function[kernel](
                            dq_partial.unsafe_ptr(), dk_acc, dv_acc, q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
                            dout.unsafe_ptr(), lse.unsafe_ptr(), dr, row_offsets.unsafe_ptr(), entries.unsafe_ptr(),
                            work.unsafe_ptr(), num_work.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(),
                            scale.unsafe_ptr(), Int32(B), Int32(T),
                            grid_dim=work.dim_size(0), block_dim=(block_size // 16) * WARP_SIZE, shared_mem_bytes=smem,
                            func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
                        )
            var n = max(T * Hq * head_dim, nkv) // FINISH_COLS  # threads: one per 8 values
            if n > 0:
                ctx.enqueue_function[bwd_finish_kernel[dtype, part_dtype, head_dim, topk, block_size, num_groups]](
                    dq.unsafe_ptr(), dk.unsafe_ptr(), dv.unsafe_ptr(), dq_partial.unsafe_ptr(), dk_acc, dv_acc,
                    block_ids.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), Int32(B), Int32(T),
                    Int32(Hq), Int32(S),
                    grid_dim=ceildiv(n, 256), block_dim=256,
                )
