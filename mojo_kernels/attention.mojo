# MSA.md step 5: block-major attention. One thread block per work item
# (g, row, begin, count): it loads the K/V block of `row` ONCE into shared
# memory and streams the `count` selecting queries (all G heads of group g)
# through it. Softmax is over one tile, so there is no online rescaling:
# each (query, head, slot) gets o_partial (normalized within the block) and
# lse_partial (natural log). Keys past the query's position are masked
# (causality inside its own block); K/V rows past the sequence are zero-filled.
#
# Three GPU paths:
#   wgmma (Hopper, bf16, D 64 or 128, block_size <= 128): the mma path's
#        tiling on warpgroup MMA. K, V and two Q tiles sit in shared memory
#        in wgmma's 128B-swizzled layout; S = Q K^T is one asynchronous
#        chain per 64-row tile (K read once per tile, not once per warp),
#        O = P V takes P from registers and V as the MN-major operand, and
#        tile i+1's S runs on the tensor cores while tile i's output leaves.
#   mma  (bf16/fp16, D <= 128, block_size <= 128): rows = (entry, head) pairs
#        packed into the M dimension, 64 per tile (16 per warp);
#        S = Q K^T and O = P V on tensor cores (mma.sync m16n8k16, fp32
#        accumulate), K and V resident in shared memory (V read transposed by
#        ldmatrix.trans), Q rows gathered with cp.async into two buffers (the
#        gather of tile i+1 overlaps the MMAs of tile i; one entry lookup per
#        lane, row sources shuffled), P kept in registers (its accumulator
#        layout is the A operand layout of the second product), each partial
#        tile written back through the warp's own Q rows as whole rows with
#        16-byte stores (when o_partial has q's dtype).
#   simt (any float dtype): one warp per (entry, head) row.
# lse_partial is filled with -inf first, so slots no work item touches read
# as unused in the combine.
#
# Decode runs query-major with the merge fused instead (decode_attention.mojo).

from std.math import ceildiv, exp, exp2, log
from std.memory import unsafe_stack_allocation
from std.sys import size_of
from std.utils.numerics import isnan, nan

from extensibility import InputTensor, OutputTensor, register
from max.gpu import WARP_SIZE, barrier, block_idx, lane_id, syncwarp, thread_idx
from max.gpu.compute.mma import mma, wgmma_wait_group_sync
from max.gpu.host import DeviceContext, FuncAttribute
from max.gpu.host.info import is_cpu
from max.gpu.memory import (
    AddressSpace, async_copy, async_copy_commit_group, async_copy_wait_group, external_memory, fence_async_view_proxy,
)
from max.gpu.primitives import warp

from max.algorithm import sync_parallelize

from .cpu_tiles import CPU_R, RowState, attend_tile, pack_block, pack_rows, padded, int_scratch, release, scratch
from .common import (
    SMEM_OPTIN_BYTES, SW128_COLS, F32MutPtr, F32Ptr, I32Ptr, I64Ptr, KVAddr, kv_addr, f32_neg_inf, frag_a, frag_b2, frag_b2_trans, seq_of,
    LAYOUT_PADDED, LAYOUT_SW128, hopper_target, pv_tile_wgmma, score_tile_wgmma, tile_offset, wgmma_acc_fence,
)

comptime LOG2E = Float32(1.4426950408889634)
comptime LN2 = Float32(0.6931471805599453)
comptime SIMT_WARPS = 8
comptime MMA_WARPS = 4
comptime MMA_BM = 16 * MMA_WARPS  # rows of a query tile


struct _Item(TrivialRegisterPassable):
    """A decoded work item: which block, which entries, where its keys live."""

    var g: Int
    var b: Int
    var j: Int
    var begin: Int
    var count: Int
    var nk: Int  # keys in the block (< block_size for a sequence's last block)
    var pos0: Int  # key position of query index 0 of the sequence: tk - tq
    var q0: Int  # first query token of the sequence

    @always_inline
    def __init__(
        out self, work: I32Ptr, w: Int, row_offsets: I32Ptr, cu_q: I32Ptr, cu_k: I32Ptr, num_seqs: Int,
        block_size: Int,
    ):
        """Work item w of the work list."""
        var wp = work.unsafe_offset(w * 4)
        self.g = Int(wp[unsafe_offset=0])
        var row = Int(wp[unsafe_offset=1])
        self.begin = Int(wp[unsafe_offset=2])
        self.count = Int(wp[unsafe_offset=3])
        self.b = seq_of(row_offsets, num_seqs + 1, row)
        self.j = row - Int(row_offsets[unsafe_offset=self.b])
        self.q0 = Int(cu_q[unsafe_offset=self.b])
        var k0 = Int(cu_k[unsafe_offset=self.b])
        var tk = Int(cu_k[unsafe_offset=self.b + 1]) - k0
        var tq = Int(cu_q[unsafe_offset=self.b + 1]) - self.q0
        self.nk = min(block_size, tk - self.j * block_size)
        self.pos0 = tk - tq

    @always_inline
    def kv_base[paged: Bool](self, kv: KVAddr, cu_k: I32Ptr, block_size: Int) -> Int:
        """Element offset of this item's K/V block's first key in its KV group."""
        return kv.block[paged](cu_k, self.b, self.j, block_size) + self.g * kv.group_stride

    @always_inline
    def entry(self, entries: I32Ptr, nent: Int, e: Int) -> Int:
        """The e-th entry (t * topk + slot) of this item."""
        return Int(entries[unsafe_offset=self.g * nent + self.begin + e])

    @always_inline
    def visible(self, t: Int, block_size: Int) -> Int:
        """Keys of this block that query token t sees."""
        return max(0, min(self.nk, self.pos0 + (t - self.q0) - self.j * block_size + 1))


@always_inline
def _part_offset(t: Int, h: Int, slot: Int, num_heads: Int, topk: Int) -> Int:
    return (t * num_heads + h) * topk + slot


def _fill_kernel(x: F32MutPtr, value: Float32, n: Int32):
    var i = Int(block_idx.x) * 256 + Int(thread_idx.x)
    if i < Int(n):
        x[unsafe_offset=i] = value


# ----------------------------------------------------------------------------- CPU
def _attention_cpu[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, topk: Int, paged: Bool
](
    o_p: Pointer[Scalar[part_dtype], MutAnyOrigin],
    lse_p: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    row_offsets: I32Ptr, entries: I32Ptr, work: I32Ptr, num_work: Int,
    cu_q: I32Ptr, cu_k: I32Ptr, scale: Float32, num_seqs: Int, num_groups: Int, T: Int, kv: KVAddr,
):
    """Work items in parallel: each packs its K/V block once (cpu_tiles) and
    streams its (entry, head) rows through it, CPU_R at a time."""
    comptime D = head_dim
    comptime DP = padded(D)
    comptime BP = padded(block_size)
    var Hq = num_groups * group

    def item(w: Int) {o_p, lse_p, q, k, v, row_offsets, entries, work, cu_q, cu_k, scale, num_seqs, num_groups, T, Hq,
                      kv}:
        var it = _Item(work, w, row_offsets, cu_q, cu_k, num_seqs, block_size)
        var buf = scratch(2 * DP * BP + CPU_R * (2 * DP + BP + 2))
        var pos = int_scratch(CPU_R)
        var part = int_scratch(CPU_R)
        var kt = buf
        var vs = kt.unsafe_offset(DP * BP)
        var qs = vs.unsafe_offset(DP * BP)
        var pr = qs.unsafe_offset(CPU_R * DP)
        var st = RowState(pr.unsafe_offset(CPU_R * BP), pr.unsafe_offset(CPU_R * BP + CPU_R),
                          pr.unsafe_offset(CPU_R * BP + 2 * CPU_R), pos)
        var kv_off = it.kv_base[paged](kv, cu_k, block_size)
        var blk = pack_block[dtype, D, block_size](kt, vs, k.unsafe_offset(kv_off), v.unsafe_offset(kv_off),
                                                   kv.key_stride, it.j * block_size, it.nk)
        var rows = it.count * group
        for r0 in range(0, rows, CPU_R):
            st.reset[D]()
            for r in range(CPU_R):
                if r0 + r < rows:
                    var ent = it.entry(entries, T * topk, (r0 + r) // group)
                    var t = ent // topk
                    var h = it.g * group + (r0 + r) % group
                    pack_rows[dtype](qs.unsafe_offset(r * DP), DP, q.unsafe_offset((t * Hq + h) * D), D, 1, D)
                    pos[unsafe_offset=r] = it.pos0 + t - it.q0
                    part[unsafe_offset=r] = _part_offset(t, h, ent % topk, Hq, topk)
                else:
                    pos[unsafe_offset=r] = -1
            attend_tile[D, block_size](qs, blk, scale, pr, st)
            for r in range(min(CPU_R, rows - r0)):
                var off = part[unsafe_offset=r]
                var inv = st.inv_l(r)
                for d in range(D):
                    o_p[unsafe_offset=off * D + d] = (st.o[unsafe_offset=r * DP + d] * inv).cast[part_dtype]()
                lse_p[unsafe_offset=off] = st.lse(r)
        release(buf)
        release(pos)
        release(part)

    sync_parallelize(item, num_work)


# ----------------------------------------------------------------------------- GPU, SIMT
def attention_simt_kernel[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, num_groups: Int, topk: Int,
    paged: Bool,
](
    o_p: Pointer[Scalar[part_dtype], MutAnyOrigin],
    lse_p: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    row_offsets: I32Ptr, entries: I32Ptr, work: I32Ptr, num_work: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale_p: F32Ptr, num_seqs: Int32, T: Int32, table: I32Ptr, geom: I64Ptr,
):
    comptime KP = head_dim + 1  # padded K rows (fp32): lanes walk different keys
    comptime Hq = num_groups * group
    comptime KPL = ceildiv(block_size, WARP_SIZE)  # keys per lane
    comptime DPL = ceildiv(head_dim, WARP_SIZE)  # dims per lane
    var w = Int(block_idx.x)
    if w >= Int(num_work[unsafe_offset=0]):
        return
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    var it = _Item(work, w, row_offsets, cu_q, cu_k, Int(num_seqs), block_size)
    if it.count == 0:
        return
    var smem = external_memory[Float32, address_space=AddressSpace.SHARED, alignment=16]()
    var k_s = smem
    var v_s = smem.unsafe_offset(block_size * KP)
    var q_s = v_s.unsafe_offset(block_size * head_dim).unsafe_offset(wid * head_dim)
    var p_s = v_s.unsafe_offset(block_size * head_dim + SIMT_WARPS * head_dim).unsafe_offset(wid * block_size)
    var kva = kv_addr[paged, num_groups, head_dim](table, geom)
    var base = it.kv_base[paged](kva, cu_k, block_size)
    for i in range(tid, block_size * head_dim, SIMT_WARPS * WARP_SIZE):
        var key = i // head_dim
        var d = i % head_dim
        var kv = Float32(0)
        var vv = Float32(0)
        if key < it.nk:
            var off = base + key * kva.key_stride + d
            kv = k[unsafe_offset=off].cast[DType.float32]()
            vv = v[unsafe_offset=off].cast[DType.float32]()
        k_s[unsafe_offset=key * KP + d] = kv
        v_s[unsafe_offset=i] = vv
    barrier()
    var scale = scale_p[unsafe_offset=0]
    var nent = Int(T) * topk
    for r in range(wid, it.count * group, SIMT_WARPS):
        var ent = it.entry(entries, nent, r // group)
        var h = it.g * group + r % group
        var t = ent // topk
        var off = _part_offset(t, h, ent % topk, Hq, topk)
        var nvis = it.visible(t, block_size)
        comptime for i in range(DPL):
            var d = lane + i * WARP_SIZE
            if d < head_dim:
                q_s[unsafe_offset=d] = q[unsafe_offset=(t * Hq + h) * head_dim + d].cast[DType.float32]() * scale
        syncwarp()
        var s = SIMD[DType.float32, KPL](0)
        var m = f32_neg_inf()
        comptime for kk in range(KPL):
            var key = lane + kk * WARP_SIZE
            var dot = Float32(0)
            if key < nvis:
                for d in range(head_dim):
                    dot += q_s[unsafe_offset=d] * k_s[unsafe_offset=key * KP + d]
                m = max(m, dot)
            s[kk] = dot
        m = warp.max(m)
        var den = Float32(0)
        comptime for kk in range(KPL):
            var key = lane + kk * WARP_SIZE
            var pr = Float32(0)
            if key < nvis:
                pr = exp(s[kk] - m)
            den += pr
            if key < block_size:
                p_s[unsafe_offset=key] = pr
        den = warp.sum(den)
        syncwarp()
        var inv = Float32(1) / den if den > 0 else Float32(0)
        comptime for i in range(DPL):
            var d = lane + i * WARP_SIZE
            if d < head_dim:
                var a = Float32(0)
                for key in range(nvis):
                    a += p_s[unsafe_offset=key] * v_s[unsafe_offset=key * head_dim + d]
                o_p[unsafe_offset=off * head_dim + d] = (a * inv).cast[part_dtype]()
        if lane == 0:
            lse_p[unsafe_offset=off] = f32_neg_inf() if den == 0 else m + log(den)
        syncwarp()


def simt_smem_bytes[head_dim: Int, block_size: Int]() -> Int:
    return 4 * (block_size * (head_dim + 1) + block_size * head_dim + SIMT_WARPS * (head_dim + block_size))


# ----------------------------------------------------------------------------- tensor-core tile steps
# One warp, 16 (query, head) rows against one K/V block in shared memory
# (padded rows of KS elements), mma.sync m16n8k16 with fp32 accumulators.
# Accumulator layout: this thread holds rows lane // 4 and lane // 4 + 8,
# columns 8 n + 2 (lane % 4) + {0, 1}. Shared by the block attention and
# the forced pass.
@always_inline
def qk_rows16[dtype: DType, D: Int, BS: Int, KS: Int](
    q_w: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    k_s: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    lane: Int,
    mut s_acc: Array[SIMD[DType.float32, 4], BS // 8],
):
    """Adds Q K^T to s_acc: q_w the warp's 16 Q rows, k_s the block's keys."""
    comptime for kk in range(D // 16):
        var a = frag_a[dtype, KS](q_w.unsafe_offset(kk * 16), lane)
        comptime for nj2 in range(BS // 16):
            var bv = frag_b2[dtype, KS](k_s.unsafe_offset(nj2 * 16 * KS + kk * 16), lane)
            var bh = bv.split()
            var d0 = SIMD[DType.float32, 4](0)
            mma(d0, a, bh[0], s_acc[2 * nj2])
            s_acc[2 * nj2] = d0
            var d1 = SIMD[DType.float32, 4](0)
            mma(d1, a, bh[1], s_acc[2 * nj2 + 1])
            s_acc[2 * nj2 + 1] = d1


@always_inline
def mask_rows16[BS: Int](
    mut s_acc: Array[SIMD[DType.float32, 4], BS // 8], nv0: Int, nv1: Int, scale_log2: Float32, t2: Int
) -> SIMD[DType.float32, 2]:
    """Scales scores to the log2 domain, masks keys at or past each row's
    visible count (nv0, nv1) to -inf; returns the two rows' maxima."""
    var m_0 = f32_neg_inf()
    var m_1 = f32_neg_inf()
    comptime for nj in range(BS // 8):
        var col = nj * 8 + t2
        var x = s_acc[nj] * scale_log2
        if col >= nv0:
            x[0] = f32_neg_inf()
        if col + 1 >= nv0:
            x[1] = f32_neg_inf()
        if col >= nv1:
            x[2] = f32_neg_inf()
        if col + 1 >= nv1:
            x[3] = f32_neg_inf()
        s_acc[nj] = x
        m_0 = max(m_0, max(x[0], x[1]))
        m_1 = max(m_1, max(x[2], x[3]))
    m_0 = max(m_0, warp.shuffle_xor(m_0, 1))
    m_0 = max(m_0, warp.shuffle_xor(m_0, 2))
    m_1 = max(m_1, warp.shuffle_xor(m_1, 1))
    m_1 = max(m_1, warp.shuffle_xor(m_1, 2))
    return SIMD[DType.float32, 2](m_0, m_1)


@always_inline
def exp2_rows16[BS: Int](mut s_acc: Array[SIMD[DType.float32, 4], BS // 8], mu0: Float32, mu1: Float32) -> SIMD[DType.float32, 2]:
    """Scores -> exp2(x - mu) in place; returns the two rows' sums."""
    var l_0 = Float32(0)
    var l_1 = Float32(0)
    comptime for nj in range(BS // 8):
        var x = s_acc[nj]
        var pr = SIMD[DType.float32, 4](exp2(x[0] - mu0), exp2(x[1] - mu0), exp2(x[2] - mu1), exp2(x[3] - mu1))
        l_0 += pr[0] + pr[1]
        l_1 += pr[2] + pr[3]
        s_acc[nj] = pr
    l_0 += warp.shuffle_xor(l_0, 1)
    l_0 += warp.shuffle_xor(l_0, 2)
    l_1 += warp.shuffle_xor(l_1, 1)
    l_1 += warp.shuffle_xor(l_1, 2)
    return SIMD[DType.float32, 2](l_0, l_1)


@always_inline
def pv_rows16[dtype: DType, D: Int, BS: Int, KS: Int](
    p_acc: Array[SIMD[DType.float32, 4], BS // 8],
    v_s: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    lane: Int,
    mut o_acc: Array[SIMD[DType.float32, 4], D // 8],
):
    """Adds P V to o_acc: P's accumulator layout is the A layout of this product;
    V stored [key][d] is read transposed by ldmatrix.trans."""
    comptime for kk2 in range(BS // 16):
        var a = p_acc[2 * kk2].join(p_acc[2 * kk2 + 1]).cast[dtype]()
        comptime for dn2 in range(D // 16):
            var bv = frag_b2_trans[dtype, KS](v_s.unsafe_offset(kk2 * 16 * KS + dn2 * 16), lane)
            var bh = bv.split()
            var d0 = SIMD[DType.float32, 4](0)
            mma(d0, a, bh[0], o_acc[2 * dn2])
            o_acc[2 * dn2] = d0
            var d1 = SIMD[DType.float32, 4](0)
            mma(d1, a, bh[1], o_acc[2 * dn2 + 1])
            o_acc[2 * dn2 + 1] = d1


# ----------------------------------------------------------------------------- tile loads
@always_inline
def load_kv_tile[dtype: DType, layout: Int, BS: Int, D: Int, NT: Int](
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k_s: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    v_s: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    base: Int, key_stride: Int, nk: Int, tid: Int,
):
    """Issues the cp.async copies of one K/V block (nk keys, the first at
    element offset base of k and v, key_stride apart) into k_s / v_s in
    `layout`, zeros for its rows past nk; NT threads, no commit. V is stored
    [key][d] too: mma.sync reads it transposed by ldmatrix.trans, wgmma as
    its MN-major operand."""
    comptime CPR = D // 8  # 16-byte chunks per row
    var kg = k.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var vg = v.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    for i in range(tid, BS * CPR, NT):
        var key = i // CPR
        var c = (i % CPR) * 8
        var so = tile_offset[layout, BS, D](key, c)
        if key < nk:
            var goff = base + key * key_stride + c
            async_copy[16](kg.unsafe_offset(goff), k_s.unsafe_offset(so))
            async_copy[16](vg.unsafe_offset(goff), v_s.unsafe_offset(so))
        else:
            k_s.unsafe_store[alignment=16](so, SIMD[dtype, 8](0))
            v_s.unsafe_store[alignment=16](so, SIMD[dtype, 8](0))


@always_inline
def tile_row_entry[group: Int](it: _Item, entries: I32Ptr, nent: Int, rows_total: Int, m0: Int, wid: Int, lane: Int) -> Int32:
    """The entry (t * topk + slot) of this lane's row of the 64-row tile at
    row m0 (lane l: row 16 * wid + l % 16), -1 past the item's rows: the
    global load gather_q_tile needs, issued early by the caller so the
    gather does not wait on it."""
    var mr = m0 + wid * 16 + lane % 16
    if mr < rows_total:
        return Int32(it.entry(entries, nent, mr // group))
    return -1


@always_inline
def gather_q_tile[dtype: DType, layout: Int, D: Int, BS: Int, group: Int, Hq: Int, topk: Int](
    it: _Item, entries: I32Ptr, nent: Int, rows_total: Int,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    m0: Int,
    qbuf: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    mbuf: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    wid: Int, lane: Int,
):
    """gather_q_tile_from_entry with the lane's entry looked up here."""
    gather_q_tile_from_entry[dtype, layout, D, BS, group, Hq, topk](
        it, tile_row_entry[group](it, entries, nent, rows_total, m0, wid, lane), q, m0, qbuf, mbuf, wid, lane
    )


@always_inline
def gather_q_tile_from_entry[dtype: DType, layout: Int, D: Int, BS: Int, group: Int, Hq: Int, topk: Int](
    it: _Item, ent_row: Int32,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    m0: Int,
    qbuf: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    mbuf: Pointer[Int32, MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    wid: Int, lane: Int,
):
    """Gathers the Q rows of the 64-row tile starting at row m0 of work item
    `it` (cp.async, into qbuf in `layout`) and its per-row metadata (mbuf:
    partial offset, -1 for padding, and visible keys). Warp w fills rows
    16w .. 16w + 15: ent_row is this lane's row's entry (tile_row_entry;
    -1 for padding), and every cp.async takes its row's source from a
    shuffle, so no global load waits between two async copies; consecutive
    lanes copy consecutive 16-byte pieces of a row."""
    comptime CPR = D // 8
    var qg = q.unsafe_address_space_cast[AddressSpace.GLOBAL]()
    var r_l = wid * 16 + lane % 16
    var mr = m0 + r_l
    var q_row = Int32(-1)  # row of q ([T * Hq] rows) gathered into tile row r_l
    var poff = -1
    var nvis = 0
    if ent_row >= 0:
        var ent = Int(ent_row)
        var t = ent // topk
        var h = it.g * group + mr % group
        q_row = Int32(t * Hq + h)
        poff = _part_offset(t, h, ent % topk, Hq, topk)
        nvis = it.visible(t, BS)
    if lane < 16:
        mbuf[unsafe_offset=r_l * 2] = Int32(poff)
        mbuf[unsafe_offset=r_l * 2 + 1] = Int32(nvis)
    comptime for i in range(ceildiv(16 * CPR, WARP_SIZE)):
        var c = lane + i * WARP_SIZE
        var rr = min(c // CPR, 15)
        var col = (c % CPR) * 8
        var src = Int(warp.shuffle_idx(q_row, UInt32(rr)))
        if c < 16 * CPR:
            var so = tile_offset[layout, MMA_BM, D](wid * 16 + rr, col)
            if src >= 0:
                async_copy[16](qg.unsafe_offset(src * D + col), qbuf.unsafe_offset(so))
            else:
                qbuf.unsafe_store[alignment=16](so, SIMD[dtype, 8](0))


# ----------------------------------------------------------------------------- GPU, tensor cores
def attention_mma_kernel[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, num_groups: Int, topk: Int,
    paged: Bool,
](
    o_p: Pointer[Scalar[part_dtype], MutAnyOrigin],
    lse_p: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    row_offsets: I32Ptr, entries: I32Ptr, work: I32Ptr, num_work: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale_p: F32Ptr, num_seqs: Int32, T: Int32, table: I32Ptr, geom: I64Ptr,
):
    comptime D = head_dim
    comptime BS = block_size
    comptime KS = D + 8  # padded row stride (elements) of K_s and Q_s: conflict-free ldmatrix
    comptime Hq = num_groups * group
    comptime NT = MMA_WARPS * WARP_SIZE
    comptime CPR = D // 8  # 16-byte chunks per row
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
    var v_s = smem.unsafe_offset(BS * KS)
    var q_s = v_s.unsafe_offset(BS * KS)
    # per tile row, two buffers: partial offset (-1: padding), visible keys
    var meta = unsafe_stack_allocation[MMA_BM * 4, Int32, address_space=AddressSpace.SHARED]()
    var kv = kv_addr[paged, num_groups, D](table, geom)
    load_kv_tile[dtype, LAYOUT_PADDED, BS, D, NT](k, v, k_s, v_s, it.kv_base[paged](kv, cu_k, BS), kv.key_stride, it.nk,
                                                  tid)
    async_copy_commit_group()
    var scale_log2 = scale_p[unsafe_offset=0] * LOG2E
    var nent = Int(T) * topk
    var rows_total = it.count * group
    var g_lane = lane // 4
    var t2 = (lane % 4) * 2
    var q_s1 = q_s.unsafe_offset(MMA_BM * KS)
    var meta1 = meta.unsafe_offset(MMA_BM * 2)

    @always_inline
    def stage(m0: Int, qbuf: type_of(q_s), mbuf: type_of(meta)) {
        var wid, var lane, var it, var entries, var q, var nent, var rows_total
    }:
        gather_q_tile[dtype, LAYOUT_PADDED, D, BS, group, Hq, topk](
            it, entries, nent, rows_total, q, m0, qbuf, mbuf, wid, lane
        )

    # Q tiles double-buffered: the gather of tile i+1 overlaps the MMAs of tile i
    stage(0, q_s, meta)
    async_copy_commit_group()
    for m0 in range(0, rows_total, MMA_BM):
        var odd = (m0 // MMA_BM) % 2 == 1
        var q_cur = q_s1 if odd else q_s
        var m_cur = meta1 if odd else meta
        if m0 + MMA_BM < rows_total:
            stage(m0 + MMA_BM, q_s if odd else q_s1, meta if odd else meta1)
            async_copy_commit_group()
            async_copy_wait_group(1)
        else:
            async_copy_wait_group(0)
        barrier()
        # S = Q K^T for this warp's 16 rows
        var s_acc = Array[SIMD[DType.float32, 4], BS // 8](fill=SIMD[DType.float32, 4](0))
        qk_rows16[dtype, D, BS, KS](q_cur.unsafe_offset(wid * 16 * KS), k_s, lane, s_acc)
        # mask and softmax (log2 domain); this thread holds rows r0 and r0 + 8
        var r0 = wid * 16 + g_lane
        var nv0 = Int(m_cur[unsafe_offset=r0 * 2 + 1])
        var nv1 = Int(m_cur[unsafe_offset=(r0 + 8) * 2 + 1])
        var mx = mask_rows16[BS](s_acc, nv0, nv1, scale_log2, t2)
        var m_0 = mx[0]
        var m_1 = mx[1]
        var mu0 = m_0 if m_0 > f32_neg_inf() else Float32(0)
        var mu1 = m_1 if m_1 > f32_neg_inf() else Float32(0)
        var ls = exp2_rows16[BS](s_acc, mu0, mu1)
        var l_0 = ls[0]
        var l_1 = ls[1]
        # O = P V: P's accumulator layout is the A layout of the next product
        var o_acc = Array[SIMD[DType.float32, 4], D // 8](fill=SIMD[DType.float32, 4](0))
        pv_rows16[dtype, D, BS, KS](s_acc, v_s, lane, o_acc)
        var p0 = Int(m_cur[unsafe_offset=r0 * 2])
        var p1 = Int(m_cur[unsafe_offset=(r0 + 8) * 2])
        var inv0 = Float32(1) / l_0 if l_0 > 0 else Float32(0)
        var inv1 = Float32(1) / l_1 if l_1 > 0 else Float32(0)
        comptime if part_dtype == dtype:
            # through this warp's own Q rows (free once its S is computed), then
            # out as whole rows with 16-byte stores: full 32-byte sectors
            var o_w = q_cur.unsafe_offset(wid * 16 * KS)
            # other lanes' ldmatrix reads of these rows come first (racecheck
            # reports the write-after-read without it)
            syncwarp()
            comptime for dn in range(D // 8):
                var d = dn * 8 + t2
                var o = o_acc[dn]
                o_w.unsafe_store[alignment=4](g_lane * KS + d, SIMD[DType.float32, 2](o[0], o[1]).__mul__(inv0).cast[dtype]())
                o_w.unsafe_store[alignment=4]((g_lane + 8) * KS + d, SIMD[DType.float32, 2](o[2], o[3]).__mul__(inv1).cast[dtype]())
            syncwarp()
            comptime for i in range(16 * CPR // WARP_SIZE):
                var c = lane + i * WARP_SIZE
                var r = c // CPR
                var col = (c % CPR) * 8
                var p = Int(m_cur[unsafe_offset=(wid * 16 + r) * 2])
                if p >= 0:
                    o_p.unsafe_store[alignment=16](
                        p * D + col, o_w.unsafe_load[width=8, alignment=16](r * KS + col).cast[part_dtype]()
                    )
        else:
            comptime PAIR_ALIGN = 2 * size_of[part_dtype]()
            comptime for dn in range(D // 8):
                var d = dn * 8 + t2
                var o = o_acc[dn]
                if p0 >= 0:
                    o_p.unsafe_store[alignment=PAIR_ALIGN](
                        p0 * D + d, SIMD[DType.float32, 2](o[0], o[1]).__mul__(inv0).cast[part_dtype]()
                    )
                if p1 >= 0:
                    o_p.unsafe_store[alignment=PAIR_ALIGN](
                        p1 * D + d, SIMD[DType.float32, 2](o[2], o[3]).__mul__(inv1).cast[part_dtype]()
                    )
        if lane % 4 == 0:
            if p0 >= 0:
                lse_p[unsafe_offset=p0] = f32_neg_inf() if l_0 == 0 else m_0 * LN2 + log(l_0)
            if p1 >= 0:
                lse_p[unsafe_offset=p1] = f32_neg_inf() if l_1 == 0 else m_1 * LN2 + log(l_1)
        barrier()  # this tile's q and meta buffers are refilled two tiles on


# ----------------------------------------------------------------------------- GPU, Hopper wgmma
def attention_wgmma_kernel[
    dtype: DType, part_dtype: DType, head_dim: Int, block_size: Int, group: Int, num_groups: Int, topk: Int,
    paged: Bool,
](
    o_p: Pointer[Scalar[part_dtype], MutAnyOrigin],
    lse_p: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    row_offsets: I32Ptr, entries: I32Ptr, work: I32Ptr, num_work: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale_p: F32Ptr, num_seqs: Int32, T: Int32, table: I32Ptr, geom: I64Ptr,
):
    """The block attention on Hopper's warpgroup MMA: one warpgroup per work
    item, K, V and two Q tiles in shared memory in the 128B-swizzled layout
    (no bank conflicts for cp.async writes or wgmma reads, and K/V read
    once per 64-row tile instead of once per warp). S = Q K^T and O = P V
    are asynchronous wgmma chains; the next tile's S is issued before this
    tile's output leaves, so its epilogue (normalize, stage through the Q
    buffer, 16-byte stores, lse) runs while the tensor cores work."""
    comptime D = head_dim
    comptime BS = block_size
    comptime Hq = num_groups * group
    comptime NT = MMA_WARPS * WARP_SIZE
    comptime CPR = D // 8  # 16-byte chunks per row
    comptime Q_TILE = MMA_BM * D
    var w = Int(block_idx.x)
    if w >= Int(num_work[unsafe_offset=0]):
        return
    var tid = Int(thread_idx.x)
    var lane = Int(lane_id())
    var wid = tid // WARP_SIZE
    var it = _Item(work, w, row_offsets, cu_q, cu_k, Int(num_seqs), BS)
    if it.count == 0:
        return
    # 1024-byte aligned: the swizzle is a function of the shared address
    var smem = external_memory[Scalar[dtype], address_space=AddressSpace.SHARED, alignment=1024]()
    var k_s = smem
    var v_s = smem.unsafe_offset(BS * D)
    var q_s = v_s.unsafe_offset(BS * D)  # two Q tiles
    var meta = unsafe_stack_allocation[MMA_BM * 4, Int32, address_space=AddressSpace.SHARED]()
    var kv = kv_addr[paged, num_groups, D](table, geom)
    load_kv_tile[dtype, LAYOUT_SW128, BS, D, NT](k, v, k_s, v_s, it.kv_base[paged](kv, cu_k, BS), kv.key_stride, it.nk,
                                                 tid)
    async_copy_commit_group()
    var scale_log2 = scale_p[unsafe_offset=0] * LOG2E
    var nent = Int(T) * topk
    var rows_total = it.count * group
    var n_tiles = ceildiv(rows_total, MMA_BM)
    var g_lane = lane // 4
    var t2 = (lane % 4) * 2
    var r0 = wid * 16 + g_lane

    @always_inline
    def stage(m0: Int, qbuf: type_of(q_s), mbuf: type_of(meta)) {
        var wid, var lane, var it, var entries, var q, var nent, var rows_total
    }:
        gather_q_tile[dtype, LAYOUT_SW128, D, BS, group, Hq, topk](
            it, entries, nent, rows_total, q, m0, qbuf, mbuf, wid, lane
        )

    # tile i uses buffer i % 2; the gather of tile i + 2 starts once tile i's
    # output has left its buffer. cp.async groups: K/V, Q_0, Q_1, then one per tile.
    stage(0, q_s, meta)
    async_copy_commit_group()
    if n_tiles > 1:
        stage(MMA_BM, q_s.unsafe_offset(Q_TILE), meta.unsafe_offset(MMA_BM * 2))
        async_copy_commit_group()
        async_copy_wait_group(1)  # K, V and Q_0
    else:
        async_copy_wait_group(0)
    fence_async_view_proxy()  # cp.async and st.shared writes -> visible to wgmma's async proxy
    barrier()
    var s_wg = SIMD[DType.float32, BS // 2](0)
    var o_wg = SIMD[DType.float32, D // 2](0)
    s_wg = score_tile_wgmma[dtype, D, BS, LAYOUT_SW128, MMA_BM](q_s, k_s, s_wg)
    for i in range(n_tiles):
        var odd = i % 2 == 1
        var q_cur = q_s.unsafe_offset(Q_TILE) if odd else q_s
        var m_cur = meta.unsafe_offset(MMA_BM * 2) if odd else meta
        var more = i + 1 < n_tiles
        # the entry of this lane's row of tile i + 2, in flight through this tile's math
        var ent_next = tile_row_entry[group](it, entries, nent, rows_total, (i + 2) * MMA_BM, wid, lane)
        wgmma_wait_group_sync[0]()  # S_i (the only chain in flight)
        s_wg = wgmma_acc_fence(s_wg)
        var s_acc = Array[SIMD[DType.float32, 4], BS // 8](fill=SIMD[DType.float32, 4](0))
        comptime for nj in range(BS // 8):
            s_acc[nj] = s_wg.slice[4, offset=4 * nj]()
        var nv0 = Int(m_cur[unsafe_offset=r0 * 2 + 1])
        var nv1 = Int(m_cur[unsafe_offset=(r0 + 8) * 2 + 1])
        var mx = mask_rows16[BS](s_acc, nv0, nv1, scale_log2, t2)
        var m_0 = mx[0]
        var m_1 = mx[1]
        var mu0 = m_0 if m_0 > f32_neg_inf() else Float32(0)
        var mu1 = m_1 if m_1 > f32_neg_inf() else Float32(0)
        var ls = exp2_rows16[BS](s_acc, mu0, mu1)
        var l_0 = ls[0]
        var l_1 = ls[1]
        o_wg = pv_tile_wgmma[dtype, D, BS](s_acc, v_s, o_wg)  # P V_i, in flight
        # every warp is past its S_i wait (Q_i is read) and Q_{i+1} has landed
        async_copy_wait_group(0)
        fence_async_view_proxy()
        barrier()
        if more:
            s_wg = score_tile_wgmma[dtype, D, BS, LAYOUT_SW128, MMA_BM](q_s if odd else q_s.unsafe_offset(Q_TILE), k_s, s_wg)
            wgmma_wait_group_sync[1]()  # P V_i (S_{i+1} stays in flight)
        else:
            wgmma_wait_group_sync[0]()
        o_wg = wgmma_acc_fence(o_wg)
        var inv0 = Float32(1) / l_0 if l_0 > 0 else Float32(0)
        var inv1 = Float32(1) / l_1 if l_1 > 0 else Float32(0)
        var p0 = Int(m_cur[unsafe_offset=r0 * 2])
        var p1 = Int(m_cur[unsafe_offset=(r0 + 8) * 2])
        comptime if part_dtype == dtype:
            # the output tile through this warp's own rows of Q_i's buffer,
            # then out as whole rows with 16-byte stores
            comptime for dn in range(D // 8):
                q_cur.unsafe_store[alignment=4](
                    tile_offset[LAYOUT_SW128, MMA_BM, D](r0, dn * 8 + t2),
                    SIMD[DType.float32, 2](o_wg[4 * dn], o_wg[4 * dn + 1]).__mul__(inv0).cast[dtype](),
                )
                q_cur.unsafe_store[alignment=4](
                    tile_offset[LAYOUT_SW128, MMA_BM, D](r0 + 8, dn * 8 + t2),
                    SIMD[DType.float32, 2](o_wg[4 * dn + 2], o_wg[4 * dn + 3]).__mul__(inv1).cast[dtype](),
                )
            syncwarp()
            comptime for c0 in range(16 * CPR // WARP_SIZE):
                var c = lane + c0 * WARP_SIZE
                var r = wid * 16 + c // CPR
                var col = (c % CPR) * 8
                var p = Int(m_cur[unsafe_offset=r * 2])
                if p >= 0:
                    o_p.unsafe_store[alignment=16](
                        p * D + col,
                        q_cur.unsafe_load[width=8, alignment=16](tile_offset[LAYOUT_SW128, MMA_BM, D](r, col)).cast[part_dtype](),
                    )
        else:
            comptime PAIR_ALIGN = 2 * size_of[part_dtype]()
            comptime for dn in range(D // 8):
                var d = dn * 8 + t2
                if p0 >= 0:
                    o_p.unsafe_store[alignment=PAIR_ALIGN](
                        p0 * D + d,
                        SIMD[DType.float32, 2](o_wg[4 * dn], o_wg[4 * dn + 1]).__mul__(inv0).cast[part_dtype](),
                    )
                if p1 >= 0:
                    o_p.unsafe_store[alignment=PAIR_ALIGN](
                        p1 * D + d,
                        SIMD[DType.float32, 2](o_wg[4 * dn + 2], o_wg[4 * dn + 3]).__mul__(inv1).cast[part_dtype](),
                    )
        if lane % 4 == 0:
            if p0 >= 0:
                lse_p[unsafe_offset=p0] = f32_neg_inf() if l_0 == 0 else m_0 * LN2 + log(l_0)
            if p1 >= 0:
                lse_p[unsafe_offset=p1] = f32_neg_inf() if l_1 == 0 else m_1 * LN2 + log(l_1)
        if i + 2 < n_tiles:
            # a warp's rows of the buffer (Q, output staging, metadata) are
            # its own outside the wgmma, which waited above
            syncwarp()
            gather_q_tile_from_entry[dtype, LAYOUT_SW128, D, BS, group, Hq, topk](
                it, ent_next, q, (i + 2) * MMA_BM, q_cur, m_cur, wid, lane
            )
            async_copy_commit_group()


def mma_smem_bytes[dtype: DType, head_dim: Int, block_size: Int, wgmma: Bool, q_tiles: Int = 2]() -> Int:
    """K, V and q_tiles 64-row Q tiles: 128B-swizzled (no padding) for
    wgmma, padded rows for mma.sync (the forced pass holds one Q tile)."""
    return (2 * block_size + q_tiles * MMA_BM) * (head_dim if wgmma else head_dim + 8) * size_of[dtype]()


def wgmma_supported[dtype: DType, head_dim: Int, block_size: Int]() -> Bool:
    """bfloat16 (P as wgmma's register A operand), whole 64-column swizzle
    panels, 16-key steps, S's registers within budget (the caller checks
    for a Hopper device)."""
    return (
        dtype == DType.bfloat16
        and head_dim % SW128_COLS == 0
        and head_dim <= 128
        and block_size % 16 == 0
        and block_size <= 128
    )


def mma_supported[dtype: DType, head_dim: Int, block_size: Int]() -> Bool:
    return (
        (dtype == DType.bfloat16 or dtype == DType.float16)
        and head_dim % 16 == 0
        and head_dim <= 128
        and block_size % 16 == 0
        and block_size <= 128
    )


def _launch[
    dtype: DType, part_dtype: DType, //, target: StaticString, topk: Int, block_size: Int, group: Int,
    num_groups: Int, head_dim: Int, use_mma: Bool, paged: Bool,
](
    o_partial: Pointer[Scalar[part_dtype], MutAnyOrigin],
    lse_partial: F32MutPtr,
    q: Pointer[Scalar[dtype], ImmutAnyOrigin],
    k: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    row_offsets: I32Ptr, entries: I32Ptr, work: I32Ptr, num_work: I32Ptr,
    cu_q: I32Ptr, cu_k: I32Ptr, scale: F32Ptr, B: Int, T: Int, grid: Int, table: I32Ptr, geom: I64Ptr,
    ctx: DeviceContext,
) raises:
    """Fills lse_partial with -inf, then one thread block per work item (`grid`
    is the work list's capacity; blocks past num_work exit)."""
    var n_part = T * group * num_groups * topk
    comptime if is_cpu[target]():
        for i in range(n_part):
            lse_partial[unsafe_offset=i] = f32_neg_inf()
        _attention_cpu[dtype, part_dtype, head_dim, block_size, group, topk, paged](
            o_partial, lse_partial, q, k, v, row_offsets, entries, work, Int(num_work[unsafe_offset=0]),
            cu_q, cu_k, scale[unsafe_offset=0], B, num_groups, T, kv_addr[paged, num_groups, head_dim](table, geom),
        )
    else:
        ctx.enqueue_function[_fill_kernel](
            lse_partial, f32_neg_inf(), Int32(n_part), grid_dim=ceildiv(n_part, 256), block_dim=256,
        )
        if grid == 0:
            return
        # Hopper: warpgroup MMA; mma.sync elsewhere
        comptime if use_mma and hopper_target() and wgmma_supported[dtype, head_dim, block_size]():
            comptime smem = mma_smem_bytes[dtype, head_dim, block_size, True]()
            comptime kernel = attention_wgmma_kernel[
                dtype, part_dtype, head_dim, block_size, group, num_groups, topk, paged
            ]
            ctx.enqueue_function[kernel](
                o_partial, lse_partial, q, k, v, row_offsets, entries, work, num_work,
                cu_q, cu_k, scale, Int32(B), Int32(T), table, geom,
                grid_dim=grid, block_dim=MMA_WARPS * WARP_SIZE, shared_mem_bytes=smem,
                func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
            )
        elif use_mma and mma_supported[dtype, head_dim, block_size]():
            comptime smem = mma_smem_bytes[dtype, head_dim, block_size, False]()
            comptime kernel = attention_mma_kernel[
                dtype, part_dtype, head_dim, block_size, group, num_groups, topk, paged
            ]
            ctx.enqueue_function[kernel](
                o_partial, lse_partial, q, k, v, row_offsets, entries, work, num_work,
                cu_q, cu_k, scale, Int32(B), Int32(T), table, geom,
                grid_dim=grid, block_dim=MMA_WARPS * WARP_SIZE, shared_mem_bytes=smem,
                func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
            )
        else:
            comptime smem = simt_smem_bytes[head_dim, block_size]()
            comptime assert smem <= SMEM_OPTIN_BYTES, "msa_block_attention: block_size * head_dim too large for the SIMT path"
            comptime kernel = attention_simt_kernel[
                dtype, part_dtype, head_dim, block_size, group, num_groups, topk, paged
            ]
            ctx.enqueue_function[kernel](
                o_partial, lse_partial, q, k, v, row_offsets, entries, work, num_work,
                cu_q, cu_k, scale, Int32(B), Int32(T), table, geom,
                grid_dim=grid, block_dim=SIMT_WARPS * WARP_SIZE, shared_mem_bytes=smem,
                func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem)),
            )


def _check_shapes[group: Int, num_groups: Int, head_dim: Int](name: StaticString, q_heads: Int, q_dim: Int,
                                                             k_heads: Int, k_dim: Int) raises:
    if q_heads != group * num_groups or q_dim != head_dim:
        raise Error(String(name, ": q must be [T, Hq, D] with the op's Hq and D"))
    if k_heads != num_groups or k_dim != head_dim:
        raise Error(String(name, ": k must be [S, Hkv, D] with the op's Hkv and D"))


@register("msa_block_attention")
struct MSABlockAttention:
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
        use_mma: Bool = True,
    ](
        o_partial: OutputTensor[dtype=part_dtype, rank=4, ...],
        lse_partial: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=dtype, rank=3, ...],
        k: InputTensor[dtype=dtype, rank=3, ...],
        v: InputTensor[dtype=dtype, rank=3, ...],
        row_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        entries: InputTensor[dtype=DType.int32, rank=2, ...],
        work: InputTensor[dtype=DType.int32, rank=2, ...],
        num_work: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        _check_shapes[group, num_groups, head_dim](
            "msa_block_attention", q.dim_size(1), q.dim_size(2), k.dim_size(1), k.dim_size(2)
        )
        var T = q.dim_size(0)
        if T == 0:
            return
        _launch[target, topk, block_size, group, num_groups, head_dim, use_mma, False](
            o_partial.unsafe_ptr(), lse_partial.unsafe_ptr(), q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(),
            row_offsets.unsafe_ptr(), entries.unsafe_ptr(), work.unsafe_ptr(), num_work.unsafe_ptr(),
            cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), scale.unsafe_ptr(),
            cu_seqlens_q.dim_size(0) - 1, T, work.dim_size(0), cu_seqlens_k.unsafe_ptr(),
            scale.unsafe_ptr().unsafe_bitcast[Int64](), ctx,
        )


@register("msa_block_attention_paged")
struct MSABlockAttentionPaged:
    """msa_block_attention over paged caches: k_cache / v_cache the flat
    storage of [num_pages, block_size, Hkv, D] (strides in geom), page_table
    [B, max_pages], cu_seqlens_k the prefix sums of the sequences' lengths."""

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
        use_mma: Bool = True,
    ](
        o_partial: OutputTensor[dtype=part_dtype, rank=4, ...],
        lse_partial: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=dtype, rank=3, ...],
        k_cache: InputTensor[dtype=dtype, rank=1, ...],
        v_cache: InputTensor[dtype=dtype, rank=1, ...],
        row_offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        entries: InputTensor[dtype=DType.int32, rank=2, ...],
        work: InputTensor[dtype=DType.int32, rank=2, ...],
        num_work: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_q: InputTensor[dtype=DType.int32, rank=1, ...],
        cu_seqlens_k: InputTensor[dtype=DType.int32, rank=1, ...],
        page_table: InputTensor[dtype=DType.int32, rank=2, ...],
        geom: InputTensor[dtype=DType.int64, rank=1, ...],
        scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        if q.dim_size(1) != group * num_groups or q.dim_size(2) != head_dim:
            raise Error("msa_block_attention_paged: q must be [T, Hq, D] with the op's Hq and D")
        var T = q.dim_size(0)
        if T == 0:
            return
        _launch[target, topk, block_size, group, num_groups, head_dim, use_mma, True](
            o_partial.unsafe_ptr(), lse_partial.unsafe_ptr(), q.unsafe_ptr(), k_cache.unsafe_ptr(),
            v_cache.unsafe_ptr(), row_offsets.unsafe_ptr(), entries.unsafe_ptr(), work.unsafe_ptr(),
            num_work.unsafe_ptr(), cu_seqlens_q.unsafe_ptr(), cu_seqlens_k.unsafe_ptr(), scale.unsafe_ptr(),
            cu_seqlens_q.dim_size(0) - 1, T, work.dim_size(0), page_table.unsafe_ptr(), geom.unsafe_ptr(), ctx,
        )
