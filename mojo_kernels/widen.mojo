# Widening of e4m3 paged caches for the prefill kernels.
#
# The decode kernels read e4m3 caches directly (decode.mojo,
# decode_attention.mojo). The prefill kernels keep their 16-bit shared-memory
# layouts (wgmma, TMA), so a prefill chunk over an e4m3 cache first widens
# the pages its sequences use into a compact cache in q's dtype:
#
#   wide page b * max_pages + j = cache page page_table[b, j], times scale,
#   for the pages j < ceil(seq_lens[b] / block_size) (zeros for the rest),
#   table_out[b, j] = b * max_pages + j.
#
# Cost: the sequences' pages read once in e4m3 and written once in 16 bits,
# against a prefill whose indexer and attention are bound by their FLOPs
# (NOTES counts it). e4m3 -> bf16 / fp16 / fp32 is exact; scale 1 keeps it
# exact (the callers fold k_scale and k_idx_scale into the softmax and index
# scales and pass v_scale here, one rounding of the product).
#
# Layout: a page holds block_size keys x groups rows of width contiguous
# elements; row (key, g) of physical page p is at
#   p * page_stride + key * key_stride + g * group_stride
# with the strides of the geometry vector (common.mojo `kv_addr` for K / V,
# `idx_addr` for the index keys, groups 1). The output is contiguous:
# [B * max_pages, block_size, groups, width].
#
# Paths: GPU, one thread per chunk of up to 16 elements (one 16-byte e4m3
# load), grid-stride; CPU, pages in parallel.

from std.math import ceildiv

from max.algorithm import sync_parallelize

from extensibility import InputTensor, OutputTensor, register
from max.gpu import block_dim, block_idx, grid_dim, thread_idx
from max.gpu.host import DeviceContext
from max.gpu.host.info import is_cpu

from .common import F32Ptr, I32MutPtr, I32Ptr, I64Ptr, KVAddr, cache_element, idx_addr, kv_addr

comptime WIDEN_THREADS = 256


def _chunk[width: Int]() -> Int:
    """Elements a step converts: 16 (one 16-byte e4m3 load) when they divide the row."""
    return 16 if width % 16 == 0 else (8 if width % 8 == 0 else 1)


@always_inline
def _addr[which: Int, groups: Int, width: Int](table: I32Ptr, geom: I64Ptr) -> KVAddr:
    comptime if which == 0:
        return kv_addr[True, groups, width](table, geom)
    return idx_addr[True, width](table, geom)


@always_inline
def _widen_chunk[
    dtype: DType, kdt: DType, block_size: Int, groups: Int, width: Int, which: Int
](
    wide: Pointer[Scalar[dtype], MutAnyOrigin], table_out: I32MutPtr, cache: Pointer[Scalar[kdt], ImmutAnyOrigin],
    table: I32Ptr, seq_lens: I32Ptr, ad: KVAddr, scale: Float32, max_pages: Int, i: Int,
):
    """Chunk i of the output: (page pg, row, column c)."""
    comptime W = _chunk[width]()
    comptime NC = width // W
    comptime ROWS = block_size * groups
    var c = (i % NC) * W
    var row = (i // NC) % ROWS
    var pg = i // (NC * ROWS)
    var b = pg // max_pages
    var j = pg % max_pages
    if c == 0 and row == 0:
        table_out[unsafe_offset=pg] = Int32(pg)
    var key = row // groups
    var g = row % groups
    var dst = (pg * ROWS + row) * width + c
    if j * block_size + key < Int(seq_lens[unsafe_offset=b]):
        var src = ad.block[True](table, b, j, block_size) + key * ad.key_stride + g * ad.group_stride + c
        var x = cache.unsafe_load[width=W](src).cast[DType.float32]() * scale
        wide.unsafe_store(dst, x.cast[dtype]())
    else:
        wide.unsafe_store(dst, SIMD[dtype, W](0))


def widen_pages_kernel[
    dtype: DType, kdt: DType, block_size: Int, groups: Int, width: Int, which: Int
](
    wide: Pointer[Scalar[dtype], MutAnyOrigin], table_out: I32MutPtr, cache: Pointer[Scalar[kdt], ImmutAnyOrigin],
    table: I32Ptr, seq_lens: I32Ptr, geom: I64Ptr, scale_p: F32Ptr, total: Int64,
):
    var ad = _addr[which, groups, width](table, geom)
    var scale = scale_p[unsafe_offset=0]
    var step = Int(grid_dim.x) * Int(block_dim.x)
    for i in range(Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x), Int(total), step):
        _widen_chunk[dtype, kdt, block_size, groups, width, which](wide, table_out, cache, table, seq_lens, ad, scale,
                                                                   ad.max_pages, i)


@register("msa_widen_pages")
struct MSAWidenPages:
    """Widened pages: wide [B * max_pages * block_size * groups * width] in
    q's dtype and table_out [B, max_pages], the pages of an e4m3 cache (float8_e4m3fn, or
    its bytes as uint8) that the sequences use, widened (which 0: K or V,
    [num_pages, block_size, Hkv, D] through the geometry's kv strides; 1: the
    index keys, [num_pages, block_size, Di])."""

    @staticmethod
    def execute[
        dtype: DType,
        cache_dtype: DType,
        //,
        target: StaticString,
        block_size: Int,
        groups: Int,
        width: Int,
        which: Int,
    ](
        wide: OutputTensor[dtype=dtype, rank=1, ...],
        table_out: OutputTensor[dtype=DType.int32, rank=2, ...],
        cache: InputTensor[dtype=cache_dtype, rank=1, ...],
        page_table: InputTensor[dtype=DType.int32, rank=2, ...],
        seq_lens: InputTensor[dtype=DType.int32, rank=1, ...],
        geom: InputTensor[dtype=DType.int64, rank=1, ...],
        scale: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime kdt = cache_element[cache_dtype]()
        comptime W = _chunk[width]()
        var B = page_table.dim_size(0)
        var max_pages = page_table.dim_size(1)
        var pages = B * max_pages
        if wide.dim_size(0) != pages * block_size * groups * width or table_out.dim_size(0) != B:
            raise Error("msa_widen_pages: wide must be [B * max_pages * block_size * groups * width], table_out [B, max_pages]")
        if pages == 0:
            return
        var o = wide.unsafe_ptr()
        var t_out = table_out.unsafe_ptr()
        var src = cache.unsafe_ptr().unsafe_bitcast[Scalar[kdt]]()
        var table = page_table.unsafe_ptr()
        var sl = seq_lens.unsafe_ptr()
        var g = geom.unsafe_ptr()
        var sc = scale.unsafe_ptr()
        var total = pages * block_size * groups * (width // W)
        comptime if is_cpu[target]():
            var ad = _addr[which, groups, width](table, g)
            var s0 = sc[unsafe_offset=0]
            comptime PER_PAGE = block_size * groups * (width // W)

            def page(p: Int) {o, t_out, src, table, sl, ad, s0, max_pages}:
                for i in range(p * PER_PAGE, (p + 1) * PER_PAGE):
                    _widen_chunk[dtype, kdt, block_size, groups, width, which](o, t_out, src, table, sl, ad, s0,
                                                                               max_pages, i)

            sync_parallelize(page, pages)
        else:
            comptime kernel = widen_pages_kernel[dtype, kdt, block_size, groups, width, which]
            ctx.enqueue_function[kernel](
                o, t_out, src, table, sl, g, sc, Int64(total),
                grid_dim=min(ceildiv(total, WIDEN_THREADS), 132 * 16), block_dim=WIDEN_THREADS,
            )
