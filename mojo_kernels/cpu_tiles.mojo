# Register tiles of the CPU paths: every product of every MSA stage on a CPU
# is C[R, NV * W] = A[R, K] B[K, NV * W] in fp32, on R x NV vector
# accumulators held in registers (W = the fp32 SIMD width: 16 lanes with
# AVX-512, so 6 x 4 tiles use 24 of the 32 vector registers):
#   index scores (select, decode select)  A = q_idx rows (query, group)  B = k_idx^T [Di][keys]
#   S = Q K^T (block attention, forced     A = Q rows (query, head)       B = K^T [D][keys]
#              pass, decode attention)
#   O = P V                                A = P rows                     B = V [keys][D]
# A is read one broadcast element at a time and B one row of NV vectors at a
# time, so each step is R * NV FMAs for NV + R loads: the tile is bound by
# the FMA units, not by the caches.
#
# Operands are packed into fp32 scratch first (rows gathered, keys
# transposed, bf16 / fp16 converted, padded with zeros to whole vectors), so
# the inner loops only do fp32 FMAs on dense tiles. Scores are scaled after
# the product (the reference's order: scale * <q, k>).
#
# Attention is an online softmax over one key block at a time (attend_tile):
# a single block gives the block attention's partial, several blocks the
# forced pass's split and decode's whole answer. Keys a row does not see
# (past its position, past the sequence) get probability 0 and never enter
# P V: their values are not read for that row (a NaN value reaches exactly
# the rows that see it, as in the reference). A NaN score makes the row NaN.
#
# The callers spread independent tiles (query tiles, work items, query
# blocks, decode rows) over the cores with sync_parallelize; each task
# allocates its own scratch.

from std.math import ceildiv, exp, iota, log
from std.memory import alloc, bitcast, unsafe_stack_allocation
from std.sys import simd_width_of
from std.utils.numerics import isnan, nan

from .common import f32_neg_inf

comptime CPU_W = simd_width_of[DType.float32]()  # fp32 lanes of a vector
comptime CPU_R = 6  # rows of a register tile
comptime CPU_NV = 4  # vectors of columns of a register tile
comptime F32Buf = Pointer[Float32, MutUntrackedOrigin]
comptime IntBuf = Pointer[Int, MutUntrackedOrigin]
comptime FVec = SIMD[DType.float32, CPU_W]


@always_inline
def padded(n: Int) -> Int:
    """n rounded up to whole vectors."""
    return ceildiv(n, CPU_W) * CPU_W


@always_inline
def tile_cols(n: Int) -> Int:
    """Vectors of columns of the register tiles over n padded columns: CPU_NV,
    or fewer for narrow operands (n a multiple of CPU_W)."""
    return min(CPU_NV, n // CPU_W)


def scratch(n: Int) -> F32Buf:
    """n fp32 of scratch, zeroed (a task's own; free with release)."""
    var p = alloc[Float32](n).unsafe_origin_cast[MutUntrackedOrigin]()
    for i in range(n):
        p[unsafe_offset=i] = 0
    return p


def int_scratch(n: Int) -> IntBuf:
    """n Int of scratch, uninitialized (free with release)."""
    return alloc[Int](n).unsafe_origin_cast[MutUntrackedOrigin]()


def release(p: F32Buf):
    p.unsafe_free()


def release(p: IntBuf):
    p.unsafe_free()


@always_inline
def mm_tile[R: Int, NV: Int](a: F32Buf, lda: Int, b: F32Buf, ldb: Int, K: Int) -> Array[FVec, R * NV]:
    """C = A[R, K] B[K, NV * CPU_W]: A rows lda apart, B rows ldb apart."""
    var acc = Array[FVec, R * NV](fill=FVec(0))
    mm_tile_into[R, NV](acc, a, lda, b, ldb, K)
    return acc^


@always_inline
def mm_tile_into[R: Int, NV: Int](mut acc: Array[FVec, R * NV], a: F32Buf, lda: Int, b: F32Buf, ldb: Int, K: Int):
    """acc += A[R, K] B[K, NV * CPU_W]."""
    for kk in range(K):
        var bv = Array[FVec, NV](fill=FVec(0))
        comptime for v in range(NV):
            bv[v] = b.unsafe_load[width=CPU_W](kk * ldb + v * CPU_W)
        comptime for r in range(R):
            var av = FVec(a[unsafe_offset=r * lda + kk])
            comptime for v in range(NV):
                acc[r * NV + v] = av.fma(bv[v], acc[r * NV + v])


def pack_rows[dtype: DType](
    dst: F32Buf, ld: Int, src: Pointer[Scalar[dtype], ImmutAnyOrigin], src_stride: Int, nrows: Int, ncols: Int
):
    """dst[r][c] = src[r * src_stride + c] as fp32 for r < nrows, c < ncols (the
    rest of each row, up to ld, and the rows the caller padded stay as they were)."""
    for r in range(nrows):
        var s = src.unsafe_offset(r * src_stride)
        var d = dst.unsafe_offset(r * ld)
        var c0 = 0
        comptime if dtype == DType.float8_e4m3fn:  # the e4m3 cast is software: 16 at a time vectorizes it
            while c0 + 16 <= ncols:
                d.unsafe_store(c0, s.unsafe_load[width=16](c0).cast[DType.float32]())
                c0 += 16
        for c in range(c0, ncols):
            d[unsafe_offset=c] = s[unsafe_offset=c].cast[DType.float32]()


def pack_transposed[dtype: DType](
    dst: F32Buf, ld: Int, src: Pointer[Scalar[dtype], ImmutAnyOrigin], src_stride: Int, nrows: Int, ncols: Int
):
    """dst[c][r] = src[r * src_stride + c] as fp32 for r < nrows, c < ncols,
    and 0 for nrows <= r < ld: keys become columns."""
    comptime if dtype == DType.float8_e4m3fn:  # the e4m3 cast is software: a 256-entry table instead
        var table = unsafe_stack_allocation[256, Float32]()
        comptime for i in range(0, 256, 16):
            table.store(i, bitcast[dtype, 16](iota[DType.uint8, 16](UInt8(i))).cast[DType.float32]())
        var bytes = src.unsafe_bitcast[UInt8]()
        for c in range(ncols):
            var d = dst.unsafe_offset(c * ld)
            for r in range(nrows):
                d[unsafe_offset=r] = table[unsafe_offset=Int(bytes[unsafe_offset=r * src_stride + c])]
            for r in range(nrows, ld):
                d[unsafe_offset=r] = 0
        return
    for c in range(ncols):
        var d = dst.unsafe_offset(c * ld)
        for r in range(nrows):
            d[unsafe_offset=r] = src[unsafe_offset=r * src_stride + c].cast[DType.float32]()
        for r in range(nrows, ld):
            d[unsafe_offset=r] = 0


def any_nan(x: F32Buf, n: Int) -> Bool:
    """Whether x[0:n] holds a NaN (n a multiple of CPU_W)."""
    var bad = SIMD[DType.bool, CPU_W](fill=False)
    for i in range(0, n, CPU_W):
        bad |= isnan(x.unsafe_load[width=CPU_W](i))
    return bad.reduce_or()


struct AttendBlock(TrivialRegisterPassable):
    """One key block, packed: kt [D_pad][BS_pad] (K^T), vs [BS_pad][D_pad],
    its first key's position in the sequence and its count of keys."""

    var kt: F32Buf
    var vs: F32Buf
    var kbase: Int
    var nk: Int
    var v_nan: Bool  # V holds a NaN: P V row by row over each row's own keys

    @always_inline
    def __init__(out self, kt: F32Buf, vs: F32Buf, kbase: Int, nk: Int, v_nan: Bool):
        self.kt = kt
        self.vs = vs
        self.kbase = kbase
        self.nk = nk
        self.v_nan = v_nan


def pack_block[dtype: DType, D: Int, BS: Int](
    kt: F32Buf, vs: F32Buf, k: Pointer[Scalar[dtype], ImmutAnyOrigin], v: Pointer[Scalar[dtype], ImmutAnyOrigin],
    key_stride: Int, kbase: Int, nk: Int,
) -> AttendBlock:
    """Packs the nk keys at k / v (rows key_stride apart) into kt / vs."""
    comptime DP = padded(D)
    comptime BP = padded(BS)
    pack_transposed[dtype](kt, BP, k, key_stride, nk, D)
    pack_rows[dtype](vs, DP, v, key_stride, nk, D)
    for r in range(nk, BP):
        for c in range(DP):
            vs[unsafe_offset=r * DP + c] = 0
    return AttendBlock(kt, vs, kbase, nk, any_nan(vs, nk * DP))


struct RowState(TrivialRegisterPassable):
    """Online-softmax state of a tile of CPU_R rows: running max m and sum l
    (fp32, natural log domain) and the unnormalized output o [CPU_R][D_pad],
    in the task's scratch; each row's key position (-1: a padding row)."""

    var m: F32Buf
    var l: F32Buf
    var o: F32Buf
    var pos: IntBuf

    @always_inline
    def __init__(out self, m: F32Buf, l: F32Buf, o: F32Buf, pos: IntBuf):
        self.m = m
        self.l = l
        self.o = o
        self.pos = pos

    def reset[D: Int](self):
        comptime DP = padded(D)
        for r in range(CPU_R):
            self.m[unsafe_offset=r] = f32_neg_inf()
            self.l[unsafe_offset=r] = 0
            for c in range(DP):
                self.o[unsafe_offset=r * DP + c] = 0

    @always_inline
    def lse(self, r: Int) -> Float32:
        """The row's log-sum-exp: -inf with no visible key, NaN after a NaN score."""
        var l = self.l[unsafe_offset=r]
        if isnan(l):
            return nan[DType.float32]()
        return f32_neg_inf() if l == 0 else self.m[unsafe_offset=r] + log(l)

    @always_inline
    def inv_l(self, r: Int) -> Float32:
        var l = self.l[unsafe_offset=r]
        return Float32(1) / l if l > 0 else (Float32(0) if l == 0 else nan[DType.float32]())


def attend_tile[D: Int, BS: Int](qs: F32Buf, blk: AttendBlock, scale: Float32, p: F32Buf, st: RowState):
    """Folds one key block into the online softmax of CPU_R rows: qs [CPU_R][D_pad]
    the rows' queries (fp32), p scratch [CPU_R][BS_pad]. Row r sees the keys of
    the block at positions <= st.pos[r] (none for pos -1)."""
    comptime DP = padded(D)
    comptime BP = padded(BS)
    comptime NVK = tile_cols(BP)
    comptime NVD = tile_cols(DP)
    var nv = Array[Int, CPU_R](fill=0)
    var kmax = 0
    comptime for r in range(CPU_R):
        nv[r] = max(0, min(blk.nk, st.pos[unsafe_offset=r] - blk.kbase + 1))
        kmax = max(kmax, nv[r])
    if kmax == 0:
        return
    # S = Q K^T, scaled
    for c in range(0, ceildiv(kmax, NVK * CPU_W) * NVK * CPU_W, NVK * CPU_W):
        var acc = mm_tile[CPU_R, NVK](qs, DP, blk.kt.unsafe_offset(c), BP, D)
        comptime for r in range(CPU_R):
            comptime for v in range(NVK):
                p.unsafe_store(r * BP + c + v * CPU_W, acc[r * NVK + v] * scale)
    var lanes = iota[DType.int32, CPU_W]()
    comptime for r in range(CPU_R):
        var n = nv[r]
        var row = p.unsafe_offset(r * BP)
        var m_old = st.m[unsafe_offset=r]
        if n > 0:
            var mb = FVec(f32_neg_inf())
            var bad = SIMD[DType.bool, CPU_W](fill=False)
            for c in range(0, n, CPU_W):
                var x = row.unsafe_load[width=CPU_W](c)
                var seen = (lanes + Int32(c)).lt(SIMD[DType.int32, CPU_W](Int32(n)))
                bad |= seen & isnan(x)
                mb = max(mb, seen.select(x, FVec(f32_neg_inf())))
            var m_new = max(m_old, mb.reduce_max())
            if bad.reduce_or() or isnan(st.l[unsafe_offset=r]):
                # a NaN score: the softmax is NaN (the CPU's exp would make it inf)
                st.m[unsafe_offset=r] = m_new
                st.l[unsafe_offset=r] = nan[DType.float32]()
                for c in range(DP):
                    st.o[unsafe_offset=r * DP + c] = nan[DType.float32]()
                for c in range(0, BP, CPU_W):
                    row.unsafe_store(c, FVec(0))
                nv[r] = 0
            else:
                # exp(-inf) is not 0 on the CPU: keys past n get 0 explicitly
                var alpha = exp(m_old - m_new) if m_old > f32_neg_inf() else Float32(0)
                var sum = FVec(0)
                for c in range(0, BP, CPU_W):
                    var seen = (lanes + Int32(c)).lt(SIMD[DType.int32, CPU_W](Int32(n)))
                    var e = seen.select(exp(row.unsafe_load[width=CPU_W](c) - m_new), FVec(0))
                    row.unsafe_store(c, e)
                    sum += e
                st.m[unsafe_offset=r] = m_new
                st.l[unsafe_offset=r] = st.l[unsafe_offset=r] * alpha + sum.reduce_add()
                if alpha != 1:
                    for c in range(0, DP, CPU_W):
                        st.o.unsafe_store(r * DP + c, st.o.unsafe_load[width=CPU_W](r * DP + c) * alpha)
        else:
            for c in range(0, BP, CPU_W):
                row.unsafe_store(c, FVec(0))
    # O += P V over the keys some row sees
    var kp = 0
    comptime for r in range(CPU_R):
        kp = max(kp, nv[r])
    if kp == 0:
        return
    if blk.v_nan:
        # a NaN value must reach only the rows that see its key: row by row
        comptime for r in range(CPU_R):
            for key in range(nv[r]):
                var pr = FVec(p[unsafe_offset=r * BP + key])
                for c in range(0, DP, CPU_W):
                    st.o.unsafe_store(
                        r * DP + c, pr.fma(blk.vs.unsafe_load[width=CPU_W](key * DP + c), st.o.unsafe_load[width=CPU_W](r * DP + c))
                    )
        return
    for c in range(0, DP, NVD * CPU_W):
        var acc = Array[FVec, CPU_R * NVD](fill=FVec(0))
        comptime for r in range(CPU_R):
            comptime for v in range(NVD):
                acc[r * NVD + v] = st.o.unsafe_load[width=CPU_W](r * DP + c + v * CPU_W)
        mm_tile_into[CPU_R, NVD](acc, p, BP, blk.vs.unsafe_offset(c), DP, kp)
        comptime for r in range(CPU_R):
            comptime for v in range(NVD):
                st.o.unsafe_store(r * DP + c + v * CPU_W, acc[r * NVD + v])
