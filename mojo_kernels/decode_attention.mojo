# MSA.md steps 5-6 for decode: query-major split-K with the merge fused.
#
# One thread block per (g, t, 16-head tile) walks the blocks query t selected
# for group g. The K/V blocks stream through an NST-stage cp.async ring, so
# the next blocks are in flight while the current one is multiplied. Every
# block is one split of flash-decoding's split-K: the 4 warps split each
# block's keys, and each warp keeps an online softmax (running max and sum,
# O in registers) over its share of the keys of every block. At the end the
# warps' states are merged through shared memory into out and lse. No
# partials, no inversion, no combine pass: at decode the grid (Hkv x queries)
# already fills the card, and the bytes that matter are the selected K/V.
#
# Rows are the heads of the group (all the same query, so one visibility per
# key); S = Q K^T and O = P V on tensor cores (mma.sync m16n8k16, fp32
# accumulate), Q as register-resident A fragments, P kept in registers (its
# accumulator layout is the A layout of the second product). Keys past the
# query's position are masked; K/V rows past the sequence are zero-filled.
# A query with no visible key gets out 0 and lse -inf.
#
# FP8 (e4m3) caches (the paged op): the ring holds K/V as stored, half the
# bytes; each block is widened into one bf16 / fp16 stage before the MMAs
# (exact). k_scale is folded into the softmax scale by the caller; v_scale
# (scale[1]) multiplies the output. The CPU path reads them the same way.

from std.math import ceildiv, exp, exp2, log
from std.memory import unsafe_stack_allocation

from max.algorithm import sync_parallelize
from std.sys import size_of

from extensibility import InputTensor, OutputTensor, register
from max.gpu import WARP_SIZE, barrier, block_idx, lane_id, thread_idx
from max.gpu.compute.mma import mma
from max.gpu.host import DeviceContext, FuncAttribute
from max.gpu.host.info import is_cpu
from max.gpu.memory import AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory
from max.gpu.primitives import warp

from .attention import LN2, LOG2E, mma_supported
from .cpu_tiles import CPU_R, RowState, attend_tile, pack_block, pack_rows, padded, int_scratch, release, scratch
from .common import (
    SMEM_OPTIN_BYTES, F32MutPtr, F32Ptr, I32Ptr, I64Ptr, f32_neg_inf, frag_a, frag_b2, frag_b2_trans, kv_addr, seq_of,
    cache_element, stage_stride, widen_rows,
)

comptime DA_WARPS = 4
comptime DA_ROWS = 16  # heads per thread block: one MMA M tile
comptime SMEM_MAX = SMEM_OPTIN_BYTES - 1024  # room for the static block-id lists


def _stage_elems[kvt: DType, dtype: DType, head_dim: Int, block_size: Int]() -> Int:
    return 2 * block_size * stage_stride[kvt, dtype, head_dim]()  # K then V, rows as staged


def _wide_bytes[kvt: DType, dtype: DType, head_dim: Int, block_size: Int]() -> Int:
    """The widened K/V stage of an e4m3 cache (none when the ring is read in place)."""
    return 0 if kvt == dtype else 2 * block_size * (head_dim + 8) * size_of[dtype]()


def decode_attention_stages[kvt: DType, dtype: DType, head_dim: Int, block_size: Int]() -> Int:
    """K/V blocks in the ring: three when they fit, else two."""
    comptime stage = _stage_elems[kvt, dtype, head_dim, block_size]() * size_of[kvt]()
    comptime fixed = DA_ROWS * (head_dim + 8) * size_of[dtype]() + _wide_bytes[kvt, dtype, head_dim, block_size]()
    return 3 if 3 * stage + fixed <= SMEM_MAX else 2


def decode_attention_smem_bytes[kvt: DType, dtype: DType, head_dim: Int, block_size: Int]() -> Int:
    comptime ring = decode_attention_stages[kvt, dtype, head_dim, block_size]() * _stage_elems[
        kvt, dtype, head_dim, block_size
    ]() * size_of[kvt]()
    comptime merge = 4 * DA_WARPS * DA_ROWS * (head_dim + 2)  # fp32 O, m, l per warp, reusing the ring
    return DA_ROWS * (head_dim + 8) * size_of[dtype]() + max(_wide_bytes[kvt, dtype, head_dim, block_size]() + ring,
                                                              merge)


def decode_attention_supported[dtype: DType, head_dim: Int, block_size: Int]() -> Bool:
    return mma_supported[dtype, head_dim, block_size]()


@always_inline
def _visible(j: Int, pos: Int, block_size: Int) -> Int:
    """Keys of block j a query at key position pos sees (pos < the sequence's length)."""
    return max(0, min(block_size, pos - j * block_size + 1))


# ----------------------------------------------------------------------------- CPU
def _decode_attention_cpu[
    dtype: DType, kvt: DType, head_dim: Int, block_size: Int, group: Int, num_groups: Int, topk: Int, paged: Bool
](
    output: Pointer[Scalar[dtype], MutAnyOrigin],
    lse: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[kvt], ImmutAnyOrigin],
    v: Pointer[Scalar[kvt], ImmutAnyOrigin],
    block_ids: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, scale: Float32, v_scale: Float32, num_seqs: Int, T: Int,
    table: I32Ptr, geom: I64Ptr,
):
    """(query, KV group) tasks in parallel: the online softmax of the group's
    G heads (CPU_R rows a register tile) over the query's selected blocks in
    slot order, each block packed once (cpu_tiles), as the GPU kernel's splits."""
    comptime D = head_dim
    comptime DP = padded(D)
    comptime BP = padded(block_size)
    comptime Hq = group * num_groups
    comptime NTILE = ceildiv(group, CPU_R)
    comptime ROWS = NTILE * CPU_R

    var kv = kv_addr[paged, num_groups, head_dim](table, geom)

    def task(i: Int) {output, lse, q, k, v, block_ids, cu_q, cu_k, scale, v_scale, num_seqs, T, kv}:
        var t = i // num_groups
        var g = i % num_groups
        var b = seq_of(cu_q, num_seqs, t)
        var q0 = Int(cu_q[unsafe_offset=b])
        var k0 = Int(cu_k[unsafe_offset=b])
        var tk = Int(cu_k[unsafe_offset=b + 1]) - k0
        var pos = tk - (Int(cu_q[unsafe_offset=b + 1]) - q0) + (t - q0)
        var buf = scratch(2 * DP * BP + CPU_R * BP + ROWS * (2 * DP + 2))
        var ps = int_scratch(ROWS)
        var kt = buf
        var vs = kt.unsafe_offset(DP * BP)
        var pr = vs.unsafe_offset(DP * BP)
        var qs = pr.unsafe_offset(CPU_R * BP)
        var o = qs.unsafe_offset(ROWS * DP)
        var ml = o.unsafe_offset(ROWS * DP)
        for r in range(ROWS):
            ps[unsafe_offset=r] = pos if r < group else -1
        pack_rows[dtype](qs, DP, q.unsafe_offset((t * Hq + g * group) * D), D, group, D)

        @always_inline
        def state(tile: Int) {o, ml, ps} -> RowState:
            return RowState(ml.unsafe_offset(tile * CPU_R), ml.unsafe_offset(ROWS + tile * CPU_R),
                            o.unsafe_offset(tile * CPU_R * DP), ps.unsafe_offset(tile * CPU_R))

        comptime for tile in range(NTILE):
            state(tile).reset[D]()
        for slot in range(topk):
            var j = Int(block_ids[unsafe_offset=(g * T + t) * topk + slot])
            if j < 0 or _visible(j, pos, block_size) == 0:
                continue
            var kv_off = kv.block[paged](cu_k, b, j, block_size) + g * kv.group_stride
            var blk = pack_block[kvt, D, block_size](kt, vs, k.unsafe_offset(kv_off), v.unsafe_offset(kv_off),
                                                      kv.key_stride, j * block_size, min(block_size, tk - j * block_size))
            comptime for tile in range(NTILE):
                attend_tile[D, block_size](qs.unsafe_offset(tile * CPU_R * DP), blk, scale, pr, state(tile))
        for h in range(group):
            var st = state(h // CPU_R)
            var r = h % CPU_R
            var inv = st.inv_l(r) * v_scale
            var row = (t * Hq + g * group + h)
            for d in range(D):
                output[unsafe_offset=row * D + d] = (st.o[unsafe_offset=r * DP + d] * inv).cast[dtype]()
            lse[unsafe_offset=row] = st.lse(r)
        release(buf)
        release(ps)

    sync_parallelize(task, T * num_groups)


# ----------------------------------------------------------------------------- GPU
def decode_attention_kernel[
    dtype: DType, kvt: DType, head_dim: Int, block_size: Int, group: Int, num_groups: Int, topk: Int, paged: Bool
](
    output: Pointer[Scalar[dtype], MutAnyOrigin],
    lse: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[kvt], ImmutAnyOrigin],
    v: Pointer[Scalar[kvt], ImmutAnyOrigin],
    block_ids: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, scale_p: F32Ptr, num_seqs: Int32, T: Int32, table: I32Ptr,
    geom: I64Ptr,
):
    comptime D = head_dim
    comptime BS = block_size
    comptime KS = D + 8  # padded row stride: conflict-free ldmatrix
    comptime CPR = D // 8  # 16-byte chunks per row of Q
    comptime WIDE = kvt == dtype  # else an e4m3 cache, widened per block
    comptime KE = 16 // size_of[kvt]()  # cache elements per 16-byte copy
    comptime KLS = stage_stride[kvt, dtype, D]()  # row stride of the ring
    comptime KCPR = D // KE  # 16-byte chunks per cache row
    comptime Hq = group * num_groups
    comptime MTILES = ceildiv(group, DA_ROWS)
    comptime NT = DA_WARPS * WARP_SIZE
    comptime TILES = BS // 16  # 16-key tiles per block
    comptime TPW = ceildiv(TILES, DA_WARPS)  # of them per warp
    comptime NST = decode_attention_stages[kvt, dtype, D, BS]()
    comptime STAGE = _stage_elems[kvt, dtype, D, BS]()
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    var w = Int(block_idx.x)
    var mt = w % MTILES
    var t = (w // MTILES) % Int(T)
    var g = (w // MTILES) // Int(T)
    var b = seq_of(cu_q, Int(num_seqs), t)
    var q0 = Int(cu_q[unsafe_offset=b])
    var k0 = Int(cu_k[unsafe_offset=b])
    var tk = Int(cu_k[unsafe_offset=b + 1]) - k0
    var pos = tk - (Int(cu_q[unsafe_offset=b + 1]) - q0) + (t - q0)  # this query's key position
    var smem = external_memory[Scalar[dtype], address_space=AddressSpace.SHARED, alignment=128]()
    var q_s = smem
    var work = smem.unsafe_offset(DA_ROWS * KS)  # the widened stage (e4m3), then the merge
    var ring = work.unsafe_offset(_wide_bytes[kvt, dtype, D, BS]() // size_of[dtype]()).unsafe_bitcast[Scalar[kvt]]()
    var raw = unsafe_stack_allocation[topk, Int32, address_space=AddressSpace.SHARED]()
    var ids = unsafe_stack_allocation[topk + 1, Int32, address_space=AddressSpace.SHARED]()
    var qg = q.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var kg = k.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var vg = v.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    # the selected blocks with a visible key, in slot order
    for s in range(tid, topk, NT):
        raw[unsafe_offset=s] = block_ids[unsafe_offset=(g * Int(T) + t) * topk + s]
    # Q rows (this tile's heads of group g) by cp.async; zeros past the group
    for i in range(tid, DA_ROWS * CPR, NT):
        var r = i // CPR
        var c = (i % CPR) * 8
        var hh = mt * DA_ROWS + r
        if hh < group:
            async_copy[16](qg.unsafe_offset((t * Hq + g * group + hh) * D + c), q_s.unsafe_offset(r * KS + c))
        else:
            q_s.unsafe_store[alignment=16](r * KS + c, SIMD[dtype, 8](0))
    async_copy_commit_group()
    barrier()
    if tid == 0:
        var n = 0
        for s in range(topk):
            var j = Int(raw[unsafe_offset=s])
            if j >= 0 and _visible(j, pos, BS) > 0:
                ids[unsafe_offset=n] = Int32(j)
                n += 1
        ids[unsafe_offset=topk] = Int32(n)
    barrier()
    var nblk = Int(ids[unsafe_offset=topk])

    var kv = kv_addr[paged, num_groups, D](table, geom)

    @always_inline
    def load(e: Int) {var tid, var kg, var vg, var ids, var ring, var tk, var g, var kv, var cu_k, var b}:
        """K and V of the e-th block into ring stage e % NST; zeros past the sequence."""
        var dst = ring.unsafe_offset((e % NST) * STAGE)
        var j = Int(ids[unsafe_offset=e])
        var nk = min(BS, tk - j * BS)
        var base = kv.block[paged](cu_k, b, j, BS) + g * kv.group_stride
        for i in range(tid, BS * KCPR, NT):
            var key = i // KCPR
            var c = (i % KCPR) * KE
            if key < nk:
                var goff = base + key * kv.key_stride + c
                async_copy[16](kg.unsafe_offset(goff), dst.unsafe_offset(key * KLS + c))
                async_copy[16](vg.unsafe_offset(goff), dst.unsafe_offset((BS + key) * KLS + c))
            else:
                dst.unsafe_store[alignment=16](key * KLS + c, SIMD[kvt, KE](0))
                dst.unsafe_store[alignment=16]((BS + key) * KLS + c, SIMD[kvt, KE](0))

    comptime for s in range(NST - 1):
        if s < nblk:
            load(s)
        async_copy_commit_group()
    async_copy_wait_group(Int32(NST - 1))  # Q landed
    barrier()
    var qa = Array[SIMD[dtype, 8], D // 16](fill=SIMD[dtype, 8](0))
    comptime for kk in range(D // 16):
        qa[kk] = frag_a[dtype, KS](q_s.unsafe_offset(kk * 16), lane)
    var scale_log2 = scale_p[unsafe_offset=0] * LOG2E
    var v_scale = Float32(1) if WIDE else scale_p[unsafe_offset=1]
    var t2 = (lane % 4) * 2
    var key0 = wid * TPW * 16  # this warp's first key in every block
    # online softmax state of rows lane // 4 and lane // 4 + 8 (log2 domain);
    # l is this thread's share, summed over the quad at the end
    var m0 = f32_neg_inf()
    var m1 = f32_neg_inf()
    var l0 = Float32(0)
    var l1 = Float32(0)
    var o_acc = Array[SIMD[DType.float32, 4], D // 8](fill=SIMD[DType.float32, 4](0))
    for e in range(nblk):
        if e + NST - 1 < nblk:
            load(e + NST - 1)
        async_copy_commit_group()
        async_copy_wait_group(Int32(NST - 1))
        barrier()
        var k_cur = work
        comptime if WIDE:
            k_cur = ring.unsafe_offset((e % NST) * STAGE).unsafe_bitcast[Scalar[dtype]]()
        else:  # e4m3 -> dtype, exact
            widen_rows[2 * BS, D, KLS, KS, NT](ring.unsafe_offset((e % NST) * STAGE), work, tid)
            barrier()
        var v_cur = k_cur.unsafe_offset(BS * KS)
        var nvis = _visible(Int(ids[unsafe_offset=e]), pos, BS)
        var s_acc = Array[SIMD[DType.float32, 4], 2 * TPW](fill=SIMD[DType.float32, 4](0))
        comptime for kk in range(D // 16):
            comptime for u in range(TPW):
                if wid * TPW + u < TILES:
                    var bv = frag_b2[dtype, KS](k_cur.unsafe_offset((key0 + u * 16) * KS + kk * 16), lane)
                    var bh = bv.split()
                    var d0 = SIMD[DType.float32, 4](0)
                    mma(d0, qa[kk], bh[0], s_acc[2 * u])
                    s_acc[2 * u] = d0
                    var d1 = SIMD[DType.float32, 4](0)
                    mma(d1, qa[kk], bh[1], s_acc[2 * u + 1])
                    s_acc[2 * u + 1] = d1
        # every row is the same query: one visibility per key column
        var mb0 = f32_neg_inf()
        var mb1 = f32_neg_inf()
        comptime for nj in range(2 * TPW):
            var col = key0 + nj * 8 + t2
            var x = s_acc[nj] * scale_log2
            if col >= nvis:
                x[0] = f32_neg_inf()
                x[2] = f32_neg_inf()
            if col + 1 >= nvis:
                x[1] = f32_neg_inf()
                x[3] = f32_neg_inf()
            s_acc[nj] = x
            mb0 = max(mb0, max(x[0], x[1]))
            mb1 = max(mb1, max(x[2], x[3]))
        mb0 = max(mb0, warp.shuffle_xor(mb0, 1))
        mb0 = max(mb0, warp.shuffle_xor(mb0, 2))
        mb1 = max(mb1, warp.shuffle_xor(mb1, 1))
        mb1 = max(mb1, warp.shuffle_xor(mb1, 2))
        var mn0 = max(m0, mb0)
        var mn1 = max(m1, mb1)
        var base0 = mn0 if mn0 > f32_neg_inf() else Float32(0)  # no visible key yet: nothing to rescale
        var base1 = mn1 if mn1 > f32_neg_inf() else Float32(0)
        var a0 = exp2(m0 - base0)
        var a1 = exp2(m1 - base1)
        m0 = mn0
        m1 = mn1
        l0 *= a0
        l1 *= a1
        comptime for dn in range(D // 8):
            o_acc[dn] = o_acc[dn] * SIMD[DType.float32, 4](a0, a0, a1, a1)
        comptime for nj in range(2 * TPW):
            var x = s_acc[nj]
            var p = SIMD[DType.float32, 4](exp2(x[0] - base0), exp2(x[1] - base0), exp2(x[2] - base1), exp2(x[3] - base1))
            l0 += p[0] + p[1]
            l1 += p[2] + p[3]
            s_acc[nj] = p
        comptime for u in range(TPW):
            if wid * TPW + u < TILES:
                var a = s_acc[2 * u].join(s_acc[2 * u + 1]).cast[dtype]()
                comptime for dn2 in range(D // 16):
                    var bv = frag_b2_trans[dtype, KS](v_cur.unsafe_offset((key0 + u * 16) * KS + dn2 * 16), lane)
                    var bh = bv.split()
                    var d0 = SIMD[DType.float32, 4](0)
                    mma(d0, a, bh[0], o_acc[2 * dn2])
                    o_acc[2 * dn2] = d0
                    var d1 = SIMD[DType.float32, 4](0)
                    mma(d1, a, bh[1], o_acc[2 * dn2 + 1])
                    o_acc[2 * dn2 + 1] = d1
        barrier()  # this stage is refilled by the next iteration's load
    async_copy_wait_group(0)
    # merge the warps: fp32 O, m, l per warp through shared memory (the ring is free now)
    l0 += warp.shuffle_xor(l0, 1)
    l0 += warp.shuffle_xor(l0, 2)
    l1 += warp.shuffle_xor(l1, 1)
    l1 += warp.shuffle_xor(l1, 2)
    var o_w = work.unsafe_bitcast[Float32]()  # [DA_WARPS, DA_ROWS, D]
    var m_w = o_w.unsafe_offset(DA_WARPS * DA_ROWS * D)  # [DA_WARPS, DA_ROWS]
    var l_w = m_w.unsafe_offset(DA_WARPS * DA_ROWS)
    var r0 = lane // 4
    comptime for dn in range(D // 8):
        var o = o_acc[dn]
        var d = dn * 8 + t2
        o_w.unsafe_store[alignment=8]((wid * DA_ROWS + r0) * D + d, SIMD[DType.float32, 2](o[0], o[1]))
        o_w.unsafe_store[alignment=8]((wid * DA_ROWS + r0 + 8) * D + d, SIMD[DType.float32, 2](o[2], o[3]))
    if lane % 4 == 0:
        m_w[unsafe_offset=wid * DA_ROWS + r0] = m0
        m_w[unsafe_offset=wid * DA_ROWS + r0 + 8] = m1
        l_w[unsafe_offset=wid * DA_ROWS + r0] = l0
        l_w[unsafe_offset=wid * DA_ROWS + r0 + 8] = l1
    barrier()
    # each warp's weight per row, exp2(m_w - M) / L, in place of m_w; lse
    if tid < DA_ROWS:
        var mm = f32_neg_inf()
        comptime for ww in range(DA_WARPS):
            mm = max(mm, m_w[unsafe_offset=ww * DA_ROWS + tid])
        var base = mm if mm > f32_neg_inf() else Float32(0)
        var ll = Float32(0)
        comptime for ww in range(DA_WARPS):
            ll += l_w[unsafe_offset=ww * DA_ROWS + tid] * exp2(m_w[unsafe_offset=ww * DA_ROWS + tid] - base)
        var inv = Float32(1) / ll if ll > 0 else Float32(0)
        comptime for ww in range(DA_WARPS):
            m_w[unsafe_offset=ww * DA_ROWS + tid] = exp2(m_w[unsafe_offset=ww * DA_ROWS + tid] - base) * inv
        var hh = mt * DA_ROWS + tid
        if hh < group:
            lse[unsafe_offset=t * Hq + g * group + hh] = f32_neg_inf() if ll == 0 else mm * LN2 + log(ll)
    barrier()
    for i in range(tid, DA_ROWS * CPR, NT):
        var r = i // CPR
        var c = (i % CPR) * 8
        var hh = mt * DA_ROWS + r
        if hh < group:
            var acc = SIMD[DType.float32, 8](0)
            comptime for ww in range(DA_WARPS):
                acc += o_w.unsafe_load[width=8, alignment=16]((ww * DA_ROWS + r) * D + c) * m_w[unsafe_offset=ww * DA_ROWS + r]
            output.unsafe_store[alignment=16]((t * Hq + g * group + hh) * D + c, (acc * v_scale).cast[dtype]())


def _launch_decode_attention[
    dtype: DType, kvt: DType, //, target: StaticString, block_size: Int, group: Int, num_groups: Int, head_dim: Int,
    topk: Int, paged: Bool,
](
    output: Pointer[Scalar[dtype], MutAnyOrigin], lse: F32MutPtr, q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[kvt], ImmutAnyOrigin], v: Pointer[Scalar[kvt], ImmutAnyOrigin], block_ids: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale: F32Ptr, table: I32Ptr, geom: I64Ptr, B: Int, T: Int, ctx: DeviceContext,
) raises:
    comptime if is_cpu[target]():
        var v_scale = Float32(1) if kvt == dtype else scale[unsafe_offset=1]
        _decode_attention_cpu[dtype, kvt, head_dim, block_size, group, num_groups, topk, paged](
            output, lse, q, k, v, block_ids, cu_q, cu_k, scale[unsafe_offset=0], v_scale, B, T, table, geom,
        )
    else:
        comptime assert decode_attention_supported[dtype, head_dim, block_size](), (
            "msa_decode_attention: GPU needs bf16/fp16, D % 16 == 0, D <= 128, block_size % 16 == 0, <= 128"
        )
        comptime assert kvt == dtype or kvt == DType.float8_e4m3fn, "msa_decode_attention: K/V in q's dtype or e4m3"
        comptime smem = decode_attention_smem_bytes[kvt, dtype, head_dim, block_size]()
        comptime kernel = decode_attention_kernel[dtype, kvt, head_dim, block_size, group, num_groups, topk, paged]
        ctx.enqueue_function[kernel](
            output, lse, q, k, v, block_ids, cu_q, cu_k, scale, Int32(B), Int32(T), table, geom,
            grid_dim=num_groups * T * ceildiv(group, DA_ROWS), block_dim=DA_WARPS * WARP_SIZE,
            shared_mem_bytes=smem, func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
        )


@register("msa_decode_attention")
struct MSADecodeAttention:
    @staticmethod
    def execute[
        dtype: DType,
        //,
        target: StaticString,
        block_size: Int,
        group: Int,
        num_groups: Int,
        head_dim: Int,
        topk: Int,
    ](
        output: OutputTensor[dtype=dtype, rank=3, ...],
        lse: OutputTensor[dtype=DType.float32, rank=2, ...],
        q: InputTensor[dtype=dtype, rank=3, ...],
        k: InputTensor[dtype=dtype, rank=3, ...],
        v: InputTensor[dtype=dtype, rank=3, ...],
        block_ids: InputTensor[dtype=DType.int32, rank=3, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q.dim_size(0)
        if q.dim_size(1) != group * num_groups or q.dim_size(2) != head_dim:
            raise Error("msa_decode_attention: q must be [T, Hq, D] with the op's Hq and D")
        if k.dim_size(1) != num_groups or k.dim_size(2) != head_dim:
            raise Error("msa_decode_attention: k must be [S, Hkv, D] with the op's Hkv and D")
        if block_ids.dim_size(0) != num_groups or block_ids.dim_size(1) != T or block_ids.dim_size(2) != topk:
            raise Error("msa_decode_attention: block_ids must be [Hkv, T, topk]")
        if T == 0:
            return
        _launch_decode_attention[target, block_size, group, num_groups, head_dim, topk, False](
            output.unsafe_ptr(), lse.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
            block_ids.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), scale.unsafe_ptr(),
            cu_seqlens_k.unsafe_ptr(), scale.unsafe_ptr().unsafe_bitcast[Int64](), cu_seqlens_q.dim_size(0) - 1, T, ctx,
        )


@register("msa_decode_attention_paged")
struct MSADecodeAttentionPaged:
    """msa_decode_attention over paged caches: k_cache / v_cache the flat
    storage of [num_pages, block_size, Hkv, D] caches (any strides, given in
    geom), page_table [B, max_pages], cu_seqlens_k the prefix sums of the
    sequences' lengths. The caches may be e4m3, as float8_e4m3fn or their
    bytes as uint8: scale is then [2], the softmax scale times k_scale and
    v_scale."""

    @staticmethod
    def execute[
        dtype: DType,
        cache_dtype: DType,
        //,
        target: StaticString,
        block_size: Int,
        group: Int,
        num_groups: Int,
        head_dim: Int,
        topk: Int,
    ](
        output: OutputTensor[dtype=dtype, rank=3, ...],
        lse: OutputTensor[dtype=DType.float32, rank=2, ...],
        q: InputTensor[dtype=dtype, rank=3, ...],
        k_cache: InputTensor[dtype=cache_dtype, rank=1, ...],
        v_cache: InputTensor[dtype=cache_dtype, rank=1, ...],
        block_ids: InputTensor[dtype=DType.int32, rank=3, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        page_table: InputTensor[dtype=DType.int32, rank=2, ...],
        geom: InputTensor[dtype=DType.int64, rank=1, ...],
        scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var T = q.dim_size(0)
        if cache_dtype != dtype and scale.dim_size(0) < 2:
            raise Error("msa_decode_attention_paged: e4m3 caches need scale [2] (softmax scale * k_scale, v_scale)")
        if q.dim_size(1) != group * num_groups or q.dim_size(2) != head_dim:
            raise Error("msa_decode_attention_paged: q must be [T, Hq, D] with the op's Hq and D")
        if block_ids.dim_size(0) != num_groups or block_ids.dim_size(1) != T or block_ids.dim_size(2) != topk:
            raise Error("msa_decode_attention_paged: block_ids must be [Hkv, T, topk]")
        if T == 0:
            return
        comptime kvt = cache_element[cache_dtype]()
        _launch_decode_attention[target, block_size, group, num_groups, head_dim, topk, True](
            output.unsafe_ptr(), lse.unsafe_ptr(), q.unsafe_ptr(), k_cache.unsafe_ptr().unsafe_bitcast[Scalar[kvt]](),
            v_cache.unsafe_ptr().unsafe_bitcast[Scalar[kvt]](),
            block_ids.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), scale.unsafe_ptr(),
            page_table.unsafe_ptr(), geom.unsafe_ptr(), cu_seqlens_q.dim_size(0) - 1, T, ctx,
        )
