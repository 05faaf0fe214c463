# MSA.md step 6: merge the per-block partials of each (query, head) by LSE.
#
#   out[t, h] = sum_s exp(lse_p[t, h, s] - lse[t, h]) * o_p[t, h, s]
#   lse[t, h] = logsumexp_s lse_p[t, h, s]
#
# Unused slots carry lse_p = -inf and are skipped without reading o_p (their
# o_p is never written). A row with no visible key gets out 0, lse -inf; a
# NaN lse_p (a NaN score in that block) makes the row's out and lse NaN.
# CPU: rows in parallel chunks, SIMD over the columns (combine_row_cpu).
# GPU: one warp per (t, h) row, fp32 accumulation. When a 16-byte vector
# divides D and D / vector divides the warp, each lane reads 16 bytes per
# slot (the row's topk x D partials are contiguous, so a warp load covers
# 512 contiguous bytes and every lane has topk / slots_per_pass loads in
# flight), then lanes holding the same columns are summed by shuffles;
# otherwise lanes stride over D, one element each.

from std.math import ceildiv, exp, log
from std.memory import unsafe_stack_allocation
from std.sys import size_of
from std.utils.numerics import isnan, nan

from extensibility import InputTensor, OutputTensor, register
from max.gpu import WARP_SIZE, block_idx, lane_id, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu
from max.gpu.primitives import warp

from max.algorithm import sync_parallelize

from .common import F32MutPtr, F32Ptr, f32_neg_inf
from .cpu_tiles import CPU_W, F32Buf

comptime COMBINE_WARPS = 8


@always_inline
def combine_row[
    out_dtype: DType, part_dtype: DType, topk: Int, head_dim: Int, lanes: Int
](
    output: Pointer[Scalar[out_dtype], MutAnyOrigin],
    lse: F32MutPtr,
    o_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin],
    lse_p: F32Ptr,
    row: Int,
    lane: Int,
    extra_lse: Float32,
    extra: Pointer[Float32, MutUntrackedOrigin],
):
    """Merges one (t, h) row; `lanes` threads cooperate (32 on GPU, 1 on CPU).
    One more split may join: extra[0 .. head_dim) (normalized) with log-sum-exp
    extra_lse (-inf: none, extra is not read)."""
    var lrow = lse_p.unsafe_offset(row * topk)
    var m = extra_lse
    var bad = isnan(extra_lse)  # a NaN split makes the row NaN (max() would skip it)
    for s in range(topk):
        m = max(m, lrow[unsafe_offset=s])
        bad = bad or isnan(lrow[unsafe_offset=s])
    comptime PER_LANE = ceildiv(head_dim, lanes)
    var acc = Array[Float32, PER_LANE](fill=0)
    var den = Float32(0)
    if m > f32_neg_inf():
        if extra_lse > f32_neg_inf():
            var w = exp(extra_lse - m)
            den += w
            comptime for i in range(PER_LANE):
                var d = lane + i * lanes
                if d < head_dim:
                    acc[i] += w * extra[unsafe_offset=d]
        var orow = o_p.unsafe_offset(row * topk * head_dim)
        for s in range(topk):
            var l = lrow[unsafe_offset=s]
            if l == f32_neg_inf():
                continue
            var w = exp(l - m)
            den += w
            comptime for i in range(PER_LANE):
                var d = lane + i * lanes
                if d < head_dim:
                    acc[i] += w * orow[unsafe_offset=s * head_dim + d].cast[DType.float32]()
    var inv = Float32(1) / den if den > 0 else Float32(0)
    comptime for i in range(PER_LANE):
        var d = lane + i * lanes
        if d < head_dim:
            output[unsafe_offset=row * head_dim + d] = (nan[DType.float32]() if bad else acc[i] * inv).cast[out_dtype]()
    if lane == 0:
        lse[unsafe_offset=row] = nan[DType.float32]() if bad else (f32_neg_inf() if den == 0 else m + log(den))


def combine_row_cpu[out_dtype: DType, part_dtype: DType, topk: Int, head_dim: Int](
    output: Pointer[Scalar[out_dtype], MutAnyOrigin],
    lse: F32MutPtr,
    o_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin],
    lse_p: F32Ptr,
    row: Int,
    extra_lse: Float32,
    extra: F32Buf,
):
    """combine_row on a CPU core: one (t, h) row, SIMD over the columns (the
    CPU's fp32 width), one more split `extra` (normalized, fp32) joining with
    log-sum-exp extra_lse (-inf: none, not read)."""
    comptime W = CPU_W
    var lrow = lse_p.unsafe_offset(row * topk)
    var m = extra_lse
    var bad = isnan(extra_lse)
    for s in range(topk):
        m = max(m, lrow[unsafe_offset=s])
        bad = bad or isnan(lrow[unsafe_offset=s])
    var orow = o_p.unsafe_offset(row * topk * head_dim)
    var out_row = output.unsafe_offset(row * head_dim)
    if bad or not (m > f32_neg_inf()):
        for d in range(head_dim):
            out_row[unsafe_offset=d] = (nan[DType.float32]() if bad else Float32(0)).cast[out_dtype]()
        lse[unsafe_offset=row] = nan[DType.float32]() if bad else f32_neg_inf()
        return
    var w = Array[Float32, topk + 1](fill=0)
    var den = Float32(0)
    for s in range(topk):
        var l = lrow[unsafe_offset=s]
        w[s] = exp(l - m) if l > f32_neg_inf() else Float32(-1)  # -1: unused (never written, never read)
        den += max(w[s], 0)
    w[topk] = exp(extra_lse - m) if extra_lse > f32_neg_inf() else Float32(-1)
    den += max(w[topk], 0)
    var inv = Float32(1) / den
    var d = 0
    while d + W <= head_dim:
        var acc = SIMD[DType.float32, W](0)
        for s in range(topk):
            if w[s] >= 0:
                acc += w[s] * orow.unsafe_load[width=W](s * head_dim + d).cast[DType.float32]()
        if w[topk] >= 0:
            acc += w[topk] * extra.unsafe_load[width=W](d)
        out_row.unsafe_store(d, (acc * inv).cast[out_dtype]())
        d += W
    for dd in range(d, head_dim):
        var acc = Float32(0)
        for s in range(topk):
            if w[s] >= 0:
                acc += w[s] * orow[unsafe_offset=s * head_dim + dd].cast[DType.float32]()
        if w[topk] >= 0:
            acc += w[topk] * extra[unsafe_offset=dd]
        out_row[unsafe_offset=dd] = (acc * inv).cast[out_dtype]()
    lse[unsafe_offset=row] = m + log(den)


def combine_vec_width[part_dtype: DType, head_dim: Int]() -> Int:
    """Elements per 16-byte lane load when the vector layout fits, else 0."""
    comptime vec = 16 // size_of[part_dtype]()
    comptime lanes_per_slot = head_dim // vec
    comptime if head_dim % vec == 0 and lanes_per_slot <= WARP_SIZE and WARP_SIZE % lanes_per_slot == 0:
        return vec
    return 0


@always_inline
def _combine_row_vec[
    out_dtype: DType, part_dtype: DType, topk: Int, head_dim: Int, vec: Int
](
    output: Pointer[Scalar[out_dtype], MutAnyOrigin],
    lse: F32MutPtr,
    o_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin],
    lse_p: F32Ptr,
    row: Int,
    lane: Int,
):
    """One (t, h) row, a warp: lane l reads columns (l % LPS) * vec .. + vec of
    slots l // LPS, l // LPS + SPP, ... (LPS lanes per slot, SPP slots per pass)."""
    comptime LPS = head_dim // vec
    comptime SPP = WARP_SIZE // LPS
    var lrow = lse_p.unsafe_offset(row * topk)
    var m = f32_neg_inf()
    var bad = False  # a NaN slot makes the row NaN (max() would skip it)
    comptime for s in range(topk):
        m = max(m, lrow[unsafe_offset=s])
        bad = bad or isnan(lrow[unsafe_offset=s])
    var col = (lane % LPS) * vec
    var acc = SIMD[DType.float32, vec](0)
    var den = Float32(0)
    if m > f32_neg_inf():
        var orow = o_p.unsafe_offset(row * topk * head_dim + col)
        comptime for s0 in range(0, topk, SPP):
            var s = s0 + lane // LPS
            if s < topk:
                var l = lrow[unsafe_offset=s]
                if l > f32_neg_inf():  # unused slots are never written: skip the read
                    var w = exp(l - m)
                    den += w
                    acc += w * orow.unsafe_load[width=vec, alignment=16](s * head_dim).cast[DType.float32]()
    comptime for i in range(5):  # lanes LPS, 2 LPS, ... apart hold the same columns
        comptime if (LPS << i) < WARP_SIZE:
            den += warp.shuffle_xor(den, UInt32(LPS << i))
            comptime for e in range(vec):
                acc[e] += warp.shuffle_xor(acc[e], UInt32(LPS << i))
    var inv = Float32(1) / den if den > 0 else Float32(0)
    if lane < LPS:
        # naturally aligned (row * head_dim + col is a multiple of vec): one
        # vector store instead of vec scalar ones
        output.unsafe_store[alignment=vec * size_of[out_dtype]()](
            row * head_dim + col, (SIMD[DType.float32, vec](nan[DType.float32]()) if bad else acc * inv).cast[out_dtype]()
        )
    if lane == 0:
        lse[unsafe_offset=row] = nan[DType.float32]() if bad else (f32_neg_inf() if den == 0 else m + log(den))


@always_inline
def load_row_slots[part_dtype: DType, topk: Int, head_dim: Int, vec: Int, n: Int, base: Int](
    o_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin],
    row: Int,
    col: Int,
    lse_rows: Array[Float32, n],
    mut vals: Array[SIMD[part_dtype, vec], n],
):
    """Issues the loads of columns col .. col + vec of every written slot of
    one (t, h) row, whose lse_partial is lse_rows[base : base + topk], into
    vals[base : base + topk], all in flight at once (unused and forced
    slots, lse -inf, are never written, so never read)."""
    var orow = o_p.unsafe_offset(row * topk * head_dim + col)
    comptime for s in range(topk):
        if lse_rows[base + s] > f32_neg_inf():
            vals[base + s] = orow.unsafe_load[width=vec, alignment=16](s * head_dim)


@always_inline
def finish_row_cols[out_dtype: DType, part_dtype: DType, topk: Int, head_dim: Int, vec: Int, n: Int, base: Int](
    output: Pointer[Scalar[out_dtype], MutAnyOrigin],
    lse: F32MutPtr,
    row: Int,
    col: Int,
    lse_rows: Array[Float32, n],
    vals: Array[SIMD[part_dtype, vec], n],
    extra_lse: Float32,
    extra: SIMD[DType.float32, vec],
    write_lse: Bool,
):
    """Merges one (t, h) row's columns col .. col + vec from its slots'
    values (load_row_slots, at base) and lse_partial, plus one more split:
    log-sum-exp extra_lse (-inf: none) and normalized output `extra` (these
    columns). write_lse: this thread writes lse[row]."""
    var m = extra_lse
    var bad = isnan(extra_lse)  # a NaN split makes the row NaN (max() would skip it)
    comptime for s in range(topk):
        m = max(m, lse_rows[base + s])
        bad = bad or isnan(lse_rows[base + s])
    var acc = SIMD[DType.float32, vec](0)
    var den = Float32(0)
    if m > f32_neg_inf():
        comptime for s in range(topk):
            var l = lse_rows[base + s]
            if l > f32_neg_inf():
                var w = exp(l - m)
                den += w
                acc += w * vals[base + s].cast[DType.float32]()
        if extra_lse > f32_neg_inf():
            var w = exp(extra_lse - m)
            den += w
            acc += w * extra
    var inv = Float32(1) / den if den > 0 else Float32(0)
    output.unsafe_store[alignment=vec * size_of[out_dtype]()](  # one vector store, naturally aligned
        row * head_dim + col, (SIMD[DType.float32, vec](nan[DType.float32]()) if bad else acc * inv).cast[out_dtype]()
    )
    if write_lse:
        lse[unsafe_offset=row] = nan[DType.float32]() if bad else (f32_neg_inf() if den == 0 else m + log(den))


def combine_kernel[
    out_dtype: DType, part_dtype: DType, topk: Int, head_dim: Int
](
    output: Pointer[Scalar[out_dtype], MutAnyOrigin],
    lse: F32MutPtr,
    o_p: Pointer[Scalar[part_dtype], ImmutAnyOrigin],
    lse_p: F32Ptr,
    rows: Int32,
):
    var row = Int(block_idx.x) * COMBINE_WARPS + Int(thread_idx.x) // WARP_SIZE
    if row >= Int(rows):
        return
    comptime vec = combine_vec_width[part_dtype, head_dim]()
    comptime if vec > 0:
        _combine_row_vec[out_dtype, part_dtype, topk, head_dim, vec](output, lse, o_p, lse_p, row, Int(lane_id()))
    else:
        combine_row[out_dtype, part_dtype, topk, head_dim, WARP_SIZE](
            output, lse, o_p, lse_p, row, Int(lane_id()), f32_neg_inf(), unsafe_stack_allocation[1, Float32]()
        )


@register("msa_combine")
struct MSACombine:
    @staticmethod
    def execute[
        out_dtype: DType,
        part_dtype: DType,
        //,
        target: StaticString,
        topk: Int,
        head_dim: Int,
    ](
        output: OutputTensor[dtype=out_dtype, rank=3, ...],
        lse: OutputTensor[dtype=DType.float32, rank=2, ...],
        o_partial: InputTensor[dtype=part_dtype, rank=4, ...],
        lse_partial: InputTensor[dtype=DType.float32, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        var T = o_partial.dim_size(0)
        var H = o_partial.dim_size(1)
        if o_partial.dim_size(2) != topk or o_partial.dim_size(3) != head_dim:
            raise Error("msa_combine: o_partial must be [T, Hq, topk, D] with the op's topk and D")
        var rows = T * H
        if rows == 0:
            return
        comptime if is_cpu[target]():
            var out_p = output.unsafe_ptr()
            var lse_o = lse.unsafe_ptr()
            var o_in = o_partial.unsafe_ptr()
            var l_in = lse_partial.unsafe_ptr()
            comptime CHUNK = 256  # rows per task

            def chunk(c: Int) {out_p, lse_o, o_in, l_in, rows}:
                var none = unsafe_stack_allocation[1, Float32]().unsafe_origin_cast[MutUntrackedOrigin]()
                for r in range(c * CHUNK, min(rows, (c + 1) * CHUNK)):
                    combine_row_cpu[out_dtype, part_dtype, topk, head_dim](out_p, lse_o, o_in, l_in, r, f32_neg_inf(),
                                                                         none)

            sync_parallelize(chunk, ceildiv(rows, CHUNK))
        else:
            ctx.enqueue_function[combine_kernel[out_dtype, part_dtype, topk, head_dim]](
                output.unsafe_ptr(),
                lse.unsafe_ptr(),
                o_partial.unsafe_ptr(),
                lse_partial.unsafe_ptr(),
                Int32(rows),
                grid_dim=ceildiv(rows, COMBINE_WARPS),
                block_dim=COMBINE_WARPS * WARP_SIZE,
            )
