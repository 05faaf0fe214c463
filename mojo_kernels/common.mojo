# Helpers shared by the MSA ops: pointer aliases, sequence lookups.

from std.sys import inlined_assembly
from std.utils.numerics import neg_inf

from max.gpu.compute.mma import WGMMADescriptor, ld_matrix
from max.gpu.memory import AddressSpace

comptime SMEM_OPTIN_BYTES = 227 * 1024  # shared memory a thread block may opt into (sm_80, sm_90)

comptime I32Ptr = Pointer[Int32, ImmutAnyOrigin]
comptime I32MutPtr = Pointer[Int32, MutAnyOrigin]
comptime F32Ptr = Pointer[Float32, ImmutAnyOrigin]
comptime F32MutPtr = Pointer[Float32, MutAnyOrigin]


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


# wgmma operands in shared memory (Hopper)
@always_inline
def tile_offset[core: Bool, cols: Int, stride: Int](r: Int, c: Int) -> Int:
    """Element offset of (row r, column c), c a multiple of 8, in a tile of
    `cols` columns. core: wgmma's no-swizzle K-major canonical layout, 8 x 8
    core matrices of 128 bytes with the ones adjacent along K contiguous
    (LBO 128 bytes) and row groups cols * 16 bytes apart (SBO); else padded
    rows of `stride` elements (conflict-free ldmatrix)."""
    comptime if core:
        return ((r // 8) * (cols // 8) + c // 8) * 64 + (r % 8) * 8 + c % 8
    else:
        return r * stride + c


@always_inline
def kmajor_desc[dtype: DType, cols: Int](
    base: Pointer[Scalar[dtype], MutUntrackedOrigin, address_space=AddressSpace.SHARED]
) -> WGMMADescriptor[dtype]:
    """wgmma descriptor of a K-major operand stored by tile_offset[core=True]
    (SBO and LBO in 16-byte units); base: its first row, first K column."""
    return WGMMADescriptor[dtype].create[(cols // 8) * 128 // 16, 128 // 16](base)


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
