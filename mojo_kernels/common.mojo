# Helpers shared by the MSA ops: pointer aliases, sequence lookups.

from std.sys import inlined_assembly, size_of
from std.utils.numerics import neg_inf

from max.gpu.host import DeviceContext
from max.gpu.compute.mma import WGMMADescriptor, ld_matrix, wgmma_async, wgmma_commit_group_sync, wgmma_fence_aligned
from max.gpu.host.nvidia.tma import TensorMapSwizzle
from max.gpu import lane_id
from max.gpu.memory import AddressSpace
from max.gpu.primitives import warp

comptime SMEM_OPTIN_BYTES = 227 * 1024  # shared memory a thread block may opt into (sm_80, sm_90)

comptime I32Ptr = Pointer[Int32, ImmutAnyOrigin]
comptime I32MutPtr = Pointer[Int32, MutAnyOrigin]
comptime F32Ptr = Pointer[Float32, ImmutAnyOrigin]
comptime F32MutPtr = Pointer[Float32, MutAnyOrigin]


@always_inline
def hopper_target() -> Bool:
    """The op is being built for a Hopper GPU (compute capability 9.x), where
    the wgmma paths apply. Host-side dispatch: the accelerator the graph is
    compiled for, not the host's own target (`_is_sm_9x()` there is the CPU's)."""
    return DeviceContext.default_device_info.compute >= 9.0 and DeviceContext.default_device_info.compute < 10.0


@always_inline
def f32_neg_inf() -> Float32:
    return neg_inf[DType.float32]()


@always_inline
def seq_of(cu: I32Ptr, num_seqs: Int, t: Int) -> Int:
    """The b with cu[b] <= t < cu[b+1] (the last such b when sequences are empty)."""
    var lo = 0
    var hi = num_seqs - 1
    while lo < hi:
        var mid = (lo + hi + 1) // 2
        if Int(cu[unsafe_offset=mid]) <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


@always_inline
def position_of(cu_q: I32Ptr, cu_k: I32Ptr, b: Int, t: Int) -> Int:
    """Key position tk - tq + i of query token t, the i-th of sequence b."""
    var q0 = Int(cu_q[unsafe_offset=b])
    var tq = Int(cu_q[unsafe_offset=b + 1]) - q0
    var tk = Int(cu_k[unsafe_offset=b + 1]) - Int(cu_k[unsafe_offset=b])
    return tk - tq + t - q0


struct Forced(TrivialRegisterPassable):
    """The forced blocks of a query at key position p (MSA.md step 2): sinks
    0 .. nsink - 1 and local blocks local_lo .. jq, disjoint and ascending."""

    var jq: Int
    var nsink: Int
    var local_lo: Int

    @always_inline
    def __init__(out self, p: Int, block_size: Int, init_blocks: Int, local_blocks: Int):
        self.jq = p // block_size
        self.nsink = min(init_blocks, self.jq + 1)
        self.local_lo = max(self.nsink, self.jq - local_blocks + 1)

    @always_inline
    def num_forced(self) -> Int:
        return self.nsink + self.jq + 1 - self.local_lo

    @always_inline
    def block(self, i: Int) -> Int:
        """The i-th forced block, ascending (i < num_forced())."""
        return i if i < self.nsink else self.local_lo + i - self.nsink

    @always_inline
    def holds(self, j: Int) -> Bool:
        """Whether block j (<= jq) is forced."""
        return j < self.nsink or j >= self.local_lo


@always_inline
def blocks_of(num_keys: Int, block_size: Int) -> Int:
    return (num_keys + block_size - 1) // block_size


# mma.sync m16n8k16 operand fragments from shared memory (ldmatrix.x4)
@always_inline
def frag_a[dtype: DType, stride: Int](
    base: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED], lane: Int
) -> SIMD[dtype, 8]:
    """A operand (16 x 16, row-major at base): ldmatrix.x4 over rows 0-15, k 0/8."""
    return ld_matrix[8](base.unsafe_offset((lane % 16) * stride + (lane // 16) * 8))


@always_inline
def frag_b2[dtype: DType, stride: Int](
    base: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED], lane: Int
) -> SIMD[dtype, 8]:
    """B operands of two n8 tiles from a [n][k] block (16 n x 16 k) at base."""
    return ld_matrix[8](base.unsafe_offset(((lane % 8) + (lane // 16) * 8) * stride + ((lane // 8) % 2) * 8))


@always_inline
def frag_b2_trans[dtype: DType, stride: Int](
    base: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED], lane: Int
) -> SIMD[dtype, 8]:
    """B operands of two n8 tiles from a [k][n] block (16 k x 16 n, row-major at
    base), e.g. V stored [key][d]: ldmatrix.x4.trans over k rows 0-15, n 0/8."""
    return ld_matrix[8, transpose=True](base.unsafe_offset((lane % 16) * stride + (lane // 16) * 8))


# FP8 (e4m3) caches on the mma.sync paths: rows are staged as they are stored
# (16-byte cp.async, half the bytes of bf16) and widened in shared memory to
# the compute dtype before ldmatrix. e4m3 -> bf16 / fp16 is exact (3 mantissa
# bits into 7 / 10, its exponent range inside theirs), so the products are
# those of the dequantized cache times its per-tensor scale, which the
# callers fold into the softmax / index scale (K) or the output (V).
def cache_element[cache_dtype: DType]() -> DType:
    """The element type a cache tensor holds: uint8 carries e4m3 bytes (MAX's
    CPU device has no float8 tensors); any other dtype is itself."""
    return DType.float8_e4m3fn if cache_dtype == DType.uint8 else cache_dtype


def stage_stride[cache_dtype: DType, dtype: DType, width: Int]() -> Int:
    """Row stride (elements) of cache rows staged in shared memory: the
    padded MMA stride when the cache is in the compute dtype (read in place),
    else width + 16 (16-byte aligned e4m3 rows, widened before the MMA)."""
    return width + 8 if cache_dtype == dtype else width + 16


@always_inline
def widen_rows[
    cache_dtype: DType, dtype: DType, //, rows: Int, width: Int, src_stride: Int, dst_stride: Int, nthreads: Int
](
    src: Pointer[Scalar[cache_dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    dst: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    tid: Int,
):
    """dst[r][c] = src[r][c] as dtype for r < rows, c < width, 16 bytes of
    src a thread step (the thread block's nthreads threads share the rows)."""
    comptime E = 16 // size_of[cache_dtype]()
    comptime CPR = width // E
    for i in range(tid, rows * CPR, nthreads):
        var r = i // CPR
        var c = (i % CPR) * E
        var x = src.unsafe_load[width=E, alignment=16](r * src_stride + c)
        dst.unsafe_store[alignment=16](r * dst_stride + c, x.cast[dtype]())


# Shared-memory tile layouts (16-bit elements) for tensor-core operands.
#   PADDED: rows of cols + 8 elements (conflict-free ldmatrix for mma.sync).
#   CORE:   wgmma's no-swizzle K-major canonical layout, 8 x 8 core matrices
#           of 128 bytes with the ones adjacent along K contiguous (LBO 128
#           bytes) and row groups cols * 16 bytes apart (SBO).
#   SW128:  wgmma's 128-byte-swizzled layout: panels of 64 columns (128 bytes
#           a row), panel p holding rows x 64 elements, the 16-byte chunk j
#           of row r at chunk j ^ (r % 8). The hardware applies the same XOR
#           to the addresses it forms (bits 4-6 ^= bits 7-9), so panels start
#           1024-byte aligned. Read as a K-major operand (K = columns) or an
#           MN-major one (N = columns, K = rows), each 8-row group is one
#           1024-byte swizzle atom. cp.async writes and wgmma reads are free
#           of bank conflicts; the no-swizzle layout reads slower.
# 1-byte elements (e4m3, the FP8 indexer) use SW128 only: the same 128-byte
# rows and 16-byte chunks, so a panel holds 128 columns and a chunk 16
# (tile_offset's eb = element bytes; sw128_cols).
comptime LAYOUT_PADDED = 0
comptime LAYOUT_CORE = 1
comptime LAYOUT_SW128 = 2
comptime SW128_COLS = 64


def sw128_cols[dtype: DType]() -> Int:
    """Columns of one SW128 panel (128 bytes a row) for this element type."""
    return 128 // size_of[dtype]()


@always_inline
def tile_offset[layout: Int, rows: Int, cols: Int, eb: Int = 2](r: Int, c: Int) -> Int:
    """Element offset of (row r, column c) in a rows x cols tile stored in
    `layout` with eb-byte elements; c a multiple of 16 // eb plus an offset
    inside its 16-byte chunk."""
    comptime if layout == LAYOUT_SW128:
        comptime PC = 128 // eb  # columns per panel
        comptime CC = 16 // eb  # columns per 16-byte chunk
        var j = (c % PC) // CC
        return (c // PC) * (rows * PC) + r * PC + (j ^ (r % 8)) * CC + c % CC
    elif layout == LAYOUT_CORE:
        return ((r // 8) * (cols // 8) + c // 8) * 64 + (r % 8) * 8 + c % 8
    else:
        return r * (cols + 8) + c


@always_inline
def kmajor_desc[dtype: DType, layout: Int, cols: Int](
    base: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED]
) -> WGMMADescriptor[dtype]:
    """wgmma descriptor of a K-major operand (SBO and LBO in 16-byte units);
    base: its first row at the K step's first column. CORE: row groups
    cols * 16 bytes apart, K-adjacent core matrices 128 bytes apart. SW128:
    8-row groups 1024 bytes apart; a 16-wide K step stays inside one
    128-byte row (LBO unused), and base is the step's panel plus its column
    offset (the hardware swizzles the address it forms from it)."""
    comptime assert layout != LAYOUT_PADDED, "wgmma reads the CORE or SW128 layout"
    comptime if layout == LAYOUT_SW128:
        return WGMMADescriptor[dtype].create[1024 // 16, 1, TensorMapSwizzle.SWIZZLE_128B](base)
    return WGMMADescriptor[dtype].create[(cols // 8) * 128 // 16, 128 // 16](base)


@always_inline
def sw128_mnmajor_desc[dtype: DType, rows: Int](
    base: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED]
) -> WGMMADescriptor[dtype]:
    """MN-major operand (N = columns, K = rows) in the SW128 layout: 64-wide
    N panels rows x 128 bytes apart (LBO), 8-row K groups 1024 bytes apart
    (SBO). base: the K step's first row in panel 0."""
    return WGMMADescriptor[dtype].create[1024 // 16, rows * 128 // 16, TensorMapSwizzle.SWIZZLE_128B](base)


@always_inline
def score_tile_wgmma[dtype: DType, K: Int, BN: Int, layout: Int, a_rows: Int](
    a_t: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    b_t: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    acc_regs: SIMD[DType.float32, BN // 2],
) -> SIMD[DType.float32, BN // 2]:
    """Issues (and commits, without waiting) the warpgroup's 64 x BN tile
    A B^T: one wgmma chain over K. A: 64 rows at a_t, inside a tile of
    a_rows rows (its SW128 panels are a_rows x 64 apart); B: BN rows at b_t,
    its own tile; both K-major in `layout`. Each warp's share of the result
    is the mma.sync m16n8 accumulator layout, 4 floats per n8 tile.
    acc_regs: the registers to accumulate in (ignored: the first wgmma does
    not add them). Reusing the previous tile's registers, not zeroing new
    ones, keeps non-wgmma instructions off accumulator registers while
    other chains are in flight, which would make ptxas serialize every
    wgmma (C7514)."""
    var acc = acc_regs
    comptime EB = size_of[dtype]()
    comptime KSTEP = 32 // EB  # one wgmma's K: 16 for 16-bit inputs, 32 for e4m3 (32 bytes either way)
    comptime assert EB == 2 or layout == LAYOUT_SW128, "score_tile_wgmma: 1-byte inputs read the SW128 layout"
    wgmma_fence_aligned()
    comptime for kk in range(K // KSTEP):
        # row 0 at column kk * KSTEP: the step's start (SW128: its panel plus 32 bytes a step)
        comptime a_off = tile_offset[layout, a_rows, K, EB](0, kk * KSTEP)
        comptime b_off = tile_offset[layout, BN, K, EB](0, kk * KSTEP)
        acc = wgmma_async[
            64, BN, KSTEP, DType.float32, BN // 2, a_type=dtype, b_type=dtype, layout_b="col",
            scale_d=0 if kk == 0 else 1,
        ](kmajor_desc[dtype, layout, K](a_t.unsafe_offset(a_off)), kmajor_desc[dtype, layout, K](b_t.unsafe_offset(b_off)), acc)
    wgmma_commit_group_sync()
    return acc


@always_inline
def pv_tile_wgmma[dtype: DType, D: Int, BS: Int, accumulate: Bool = False](
    p_acc: Array[SIMD[DType.float32, 4], BS // 8],
    v_t: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED],
    acc_regs: SIMD[DType.float32, D // 2],
) -> SIMD[DType.float32, D // 2]:
    """Issues (and commits) the warpgroup's 64 x D output tile O = P V: P from
    registers (each warp's 16 rows in the m16n8 accumulator layout, which is
    wgmma's register A layout), V [key][d] in the 128B-swizzled layout read
    as the MN-major B operand. accumulate: add to acc_regs (else the first
    wgmma ignores them)."""
    var acc = acc_regs
    # every A fragment converted before the chain: a register written between
    # two wgmmas makes ptxas fence each one (C7519)
    var a_frag = Array[SIMD[dtype, 8], BS // 16](fill=SIMD[dtype, 8](0))
    comptime for kk2 in range(BS // 16):
        a_frag[kk2] = p_acc[2 * kk2].join(p_acc[2 * kk2 + 1]).cast[dtype]()
    wgmma_fence_aligned()
    comptime for kk2 in range(BS // 16):
        acc = wgmma_async[64, D, 16, a_type=dtype, b_type=dtype, layout_b="row", scale_d=1 if (accumulate or kk2 > 0) else 0](
            a_frag[kk2], sw128_mnmajor_desc[dtype, BS](v_t.unsafe_offset(kk2 * 16 * SW128_COLS)), acc
        )
    wgmma_commit_group_sync()
    return acc


@always_inline
def wgmma_acc_fence[n: Int](acc: SIMD[DType.float32, n]) -> SIMD[DType.float32, n]:
    """Passes each accumulator register through an empty volatile asm. Put
    right after a wgmma wait, it keeps LLVM from hoisting reads of the
    accumulators above the wait (it sees the wgmma's outputs as ready at
    issue). ptxas, finding such a read inside the pipeline, serializes every
    wgmma of the kernel (C7514), which made the indexer's two-half pipeline
    run one chain at a time."""
    var out = acc
    comptime for i in range(n):
        out[i] = inlined_assembly["", Float32, constraints="=f,0", has_side_effect=True](acc[i])
    return out


@always_inline
def red_add_v4(p: F32MutPtr, x: SIMD[DType.float32, 4]):
    """Adds x into 4 floats at p (16-byte aligned, global) with one vector
    reduction, red.global.add.v4.f32 (sm_90): L2 handles reductions per
    transaction, so this is a quarter of the work of four scalar atomics."""
    inlined_assembly["red.global.add.v4.f32 [$0], {$1, $2, $3, $4};", NoneType, constraints="l,f,f,f,f,~{memory}",
                     has_side_effect=True](Int(p), x[0], x[1], x[2], x[3])


@always_inline
def red_add_acc_frag(dst: F32MutPtr, x: SIMD[DType.float32, 4], o_lo: Int, o_hi: Int, lo_ok: Bool, hi_ok: Bool):
    """Adds one 8-column tile of an MMA accumulator (mma.sync's and wgmma's
    layout: x[0:2] at row g, columns t2, t2 + 1, offset o_lo; x[2:4] at row
    g + 8, offset o_hi) into dst, one v4 reduction a lane: a lane pair swaps
    halves, so the even lane holds 4 columns of row g and the odd lane 4 of
    row g + 8. lo_ok / hi_ok: the rows exist. Every lane of the warp calls it."""
    var odd = lane_id() % 2 == 1
    var r0 = warp.shuffle_xor(x[0] if odd else x[2], 1)
    var r1 = warp.shuffle_xor(x[1] if odd else x[3], 1)
    if odd:
        if hi_ok:
            red_add_v4(dst.unsafe_offset(o_hi - 2), SIMD[DType.float32, 4](r0, r1, x[2], x[3]))
    elif lo_ok:
        red_add_v4(dst.unsafe_offset(o_lo), SIMD[DType.float32, 4](x[0], x[1], r0, r1))


# Where a sequence's keys live. Packed: the rows of k [S, Hkv, D] (or k_idx
# [S, Di]) from cu_seqlens_k[b]. Paged (page size == block_size): block j of
# sequence b is page page_table[b, j] of a cache [num_pages, block_size, Hkv,
# D] with any strides, the last dimension contiguous. The paged ops take the
# strides as a geometry vector (int64): [max_pages, kv page, kv key, kv
# group, index page, index key].
comptime I64Ptr = Pointer[Int64, ImmutAnyOrigin]
comptime GEOM_LEN = 6


struct KVAddr(TrivialRegisterPassable):
    """Element offsets of key blocks: block(b, j) is the offset of block j of
    sequence b's first key (group 0); key k of it is key_stride further, KV
    group g group_stride further."""

    var table: Pointer[Int32, MutUntrackedOrigin]
    var max_pages: Int
    var page_stride: Int
    var key_stride: Int
    var group_stride: Int

    @always_inline
    def __init__(out self, table: I32Ptr, max_pages: Int, page_stride: Int, key_stride: Int, group_stride: Int):
        self.table = table.unsafe_mut_cast[True]().unsafe_origin_cast[MutUntrackedOrigin]()
        self.max_pages = max_pages
        self.page_stride = page_stride
        self.key_stride = key_stride
        self.group_stride = group_stride

    @always_inline
    def block[paged: Bool](self, cu_k: I32Ptr, b: Int, j: Int, block_size: Int) -> Int:
        comptime if paged:
            return Int(self.table[unsafe_offset=b * self.max_pages + j]) * self.page_stride
        return (Int(cu_k[unsafe_offset=b]) + j * block_size) * self.key_stride


@always_inline
def kv_addr[paged: Bool, num_groups: Int, head_dim: Int](table: I32Ptr, geom: I64Ptr) -> KVAddr:
    """K / V addressing: packed [S, Hkv, D] rows, or the pages of the geometry vector."""
    comptime if paged:
        return KVAddr(table, Int(geom[unsafe_offset=0]), Int(geom[unsafe_offset=1]), Int(geom[unsafe_offset=2]),
                      Int(geom[unsafe_offset=3]))
    return KVAddr(table, 0, 0, num_groups * head_dim, head_dim)


@always_inline
def idx_addr[paged: Bool, idx_dim: Int](table: I32Ptr, geom: I64Ptr) -> KVAddr:
    """Index-key addressing: packed [S, Di] rows, or the pages of the geometry vector."""
    comptime if paged:
        return KVAddr(table, Int(geom[unsafe_offset=0]), Int(geom[unsafe_offset=4]), Int(geom[unsafe_offset=5]), 0)
    return KVAddr(table, 0, 0, idx_dim, 0)
