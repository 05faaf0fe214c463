"""MSA stages as MAX graph values: drop-in functions for `max.graph` graphs.

Same names, argument order and keywords as `msa_py.reference`; tensors are
`TensorValue`s and each stage is one `ops.custom` call into the Mojo kernels::

    from max.graph import Graph
    import msa_py.graph as msa

    with Graph("layer", input_types=..., custom_extensions=[msa.kernels_path()]) as g:
        out, lse = msa.msa_attention(q, k, v, q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, topk=16)

Token counts (T, S, B) may be symbolic dims: one compiled graph serves every
sequence length. Static parameters (topk, block_size, heads, head dims,
dtype) specialise the kernels. `scale` / `idx_scale` may be Python floats
(baked in as constants) or rank-1 float32 tensors of one element (graph
inputs, so one compiled model serves any scale).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, Dim, StaticDim, TensorType, TensorValue, ops

from . import _validate as V
from .build import kernels_path

__all__ = [
    "kernels_path",
    "select_blocks",
    "invert",
    "Inversion",
    "block_attention",
    "combine",
    "forced_combine",
    "forced_pass_fits",
    "forced_gpu_fits",
    "forced_layer",
    "sparse_attention",
    "msa_attention",
    "layer_attention",
    "sparse_attention_backward",
    "backward_gpu_fits",
    "decode_attention",
    "PagedCache",
    "paged_cache",
    "seq_offsets",
    "paged_select_blocks",
    "paged_sparse_attention",
    "paged_msa_attention",
    "partial_dtype_for",
    "use_decode",
    "DECODE_MAX_Q",
]

# Decode path (query-major): taken when a batch has at most DECODE_MAX_Q
# queries per sequence on average (plain decode 1, speculative drafts up to 8).
DECODE_MAX_Q = 8

_DTYPE_NAMES = {DType.float32: "float32", DType.float16: "float16", DType.bfloat16: "bfloat16"}


class Inversion(NamedTuple):
    """Graph values of the block -> queries CSR (see msa_py.reference.Inversion).

    Sizes are upper bounds: row_ptr [Hkv, S // block_size + B + 1],
    entries [Hkv, T*topk] (-1 past each group's nnz), work [W_max, 4] of which
    the first num_work[0] items are valid.
    """

    row_offsets: TensorValue
    row_ptr: TensorValue
    entries: TensorValue
    work: TensorValue
    num_work: TensorValue


def _shape(x: TensorValue) -> tuple:
    return tuple(int(d) if isinstance(d, StaticDim) else d for d in x.shape)


def _dtype_name(name: str, x: TensorValue) -> str:
    n = _DTYPE_NAMES.get(x.dtype)
    if n is None:
        raise ValueError(f"{name} must have a floating dtype in {V.FLOAT_DTYPES}, got {x.dtype}")
    return n


def _check_int32(name: str, x: TensorValue) -> None:
    if x.dtype != DType.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")


def _static(name: str, d) -> int:
    if not isinstance(d, (int, np.integer)):
        raise ValueError(f"{name} must be a static dimension, got {d}")
    return int(d)


def partial_dtype_for(dtype: DType) -> DType:
    """o_partial is stored in the inputs' 16-bit dtype (half the traffic), else fp32."""
    return dtype if dtype in (DType.bfloat16, DType.float16) else DType.float32


def _scale_value(scale, default: float, device: DeviceRef) -> TensorValue:
    if isinstance(scale, TensorValue):
        if scale.dtype != DType.float32 or len(scale.shape) != 1:
            raise ValueError(f"a tensor scale must be float32 of shape [1], got {scale.type}")
        return scale
    V.check_scale("scale", scale)
    value = default if scale is None else float(scale)
    return ops.constant(np.array([value], np.float32), DType.float32, device=device)


def _seqlens(cu_q, cu_k, T, S, device: DeviceRef):
    V.check_cu_seqlens_shapes(None if cu_q is None else _shape(cu_q), None if cu_k is None else _shape(cu_k))
    if cu_q is not None:
        _check_int32("cu_seqlens_q", cu_q)
        _check_int32("cu_seqlens_k", cu_k)
        return cu_q, cu_k

    def one(n):
        zero = ops.constant(np.zeros(1, np.int64), DType.int64, device=DeviceRef.CPU())
        cu = ops.concat([zero, ops.shape_to_tensor([n])]).cast(DType.int32)
        return cu.to(device)

    return one(T), one(S)


_SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on sm_90
_STATIC_SMEM_LIMIT = 48 * 1024  # statically sized shared memory per block


def mma_attention_fits(sixteen_bit: bool, head_dim: int, block_size: int) -> bool:
    """Shapes the tensor-core attention tiles take (block attention, forced
    pass): 16-bit inputs, D and block_size multiples of 16 up to 128."""
    return sixteen_bit and head_dim % 16 == 0 and head_dim <= 128 and block_size % 16 == 0 and block_size <= 128


def _check_gpu_fit(kind: str, device: DeviceRef, dtype: DType, *, topk: int, block_size: int, dim: int,
                   num_groups: int = 1) -> None:
    """Shared memory the GPU kernels will ask for, checked before any compile:
    a configuration that cannot fit gets a ValueError naming what to change."""
    if str(device.device_type) == "cpu":
        return
    sixteen = dtype in (DType.bfloat16, DType.float16)
    if kind == "select":
        if sixteen and dim % 16 == 0 and dim <= 256 and block_size % 16 == 0 and block_size <= 128:
            need = (128 + 2 * block_size) * (dim + 8) * 2 + 8 * 128 * topk
        else:
            rows = max(1, 64 // num_groups) * num_groups
            need = 4 * (rows * (dim + 1) + min(32, block_size) * (dim + 1) + 2 * rows * topk)
        what = f"topk={topk}, Di={dim}, block_size={block_size}"
    else:
        if mma_attention_fits(sixteen, dim, block_size):
            need = (2 * block_size + 128) * (dim + 8) * 2
        else:
            need = 4 * (block_size * (dim + 1) + block_size * dim + 8 * (dim + block_size))
        what = f"D={dim}, block_size={block_size}, dtype={dtype}"
    if need > _SMEM_LIMIT:
        raise ValueError(f"{kind} on the GPU needs {need} bytes of shared memory for {what} "
                         f"(limit {_SMEM_LIMIT}): use a smaller block_size/topk or a 16-bit dtype")


def _num_seqs(cu_q: TensorValue):
    return cu_q.shape[0] - 1


# largest feature dim of each decode kernel on the GPU: index keys (Di), heads (D)
DECODE_MAX_DIM = {"select": 256, "attention": 128}
# the decode top-k pass keeps a running top-k per thread in static shared memory (48 KB)
DECODE_MAX_TOPK = 40


def decode_operands_fit(sixteen_bit: bool, fp8_index: bool, stage: str, dim: int) -> bool:
    """Tensor-core operands of a decode stage: 16-bit, or for the indexer e4m3
    index inputs (its FP8 score pass reads Di in 64-byte lane chunks)."""
    return sixteen_bit or (fp8_index and stage == "select" and dim % 64 == 0)


def _decode_gpu_fits(sixteen_bit: bool, stage: str, dim: int, block_size: int, topk: int) -> bool:
    return (sixteen_bit and dim % 16 == 0 and dim <= DECODE_MAX_DIM[stage] and block_size % 16 == 0
            and block_size <= 128 and (stage != "select" or topk <= DECODE_MAX_TOPK))


def decode_fits(T: int, B: int, sixteen_bit: bool, on_gpu: bool, *, stage: str = "attention", dim: int = 128,
                block_size: int = 128, topk: int = 16) -> bool:
    """The automatic choice (this layer and the torch layer): at most
    DECODE_MAX_Q queries per sequence on average, and on the GPU a 16-bit
    dtype and tensor-core shapes for `stage` ("select": dim is Di, topk <=
    DECODE_MAX_TOPK; "attention": dim is D; multiples of 16, block_size <= 128)."""
    if on_gpu and not _decode_gpu_fits(sixteen_bit, stage, dim, block_size, topk):
        return False
    return T <= DECODE_MAX_Q * max(B, 1)


def use_decode(decode, T, B1, dtype: DType, device: DeviceRef, *, stage: str, dim: int, block_size: int,
               topk: int = 16) -> bool:
    """The decode path for `decode=None` (auto, decode_fits on static T and
    B = B1 - 1). Symbolic shapes take the general path unless the caller says
    decode=True."""
    on_gpu = str(device.device_type) != "cpu"
    sixteen = decode_operands_fit(dtype in (DType.bfloat16, DType.float16),
                                  dtype in (DType.uint8, DType.float8_e4m3fn), stage, dim)
    if decode is None:
        static = isinstance(T, (int, np.integer)) and isinstance(B1, (int, np.integer))
        return bool(static and decode_fits(int(T), int(B1) - 1, sixteen, on_gpu, stage=stage, dim=dim,
                                           block_size=block_size, topk=topk))
    if decode and on_gpu and not _decode_gpu_fits(sixteen, stage, dim, block_size, topk):
        what = "Di" if stage == "select" else "D"
        extra = f", topk <= {DECODE_MAX_TOPK}" if stage == "select" else ""
        raise ValueError(f"decode=True on the GPU needs bfloat16 or float16 inputs with {what} a multiple of 16 "
                         f"<= {DECODE_MAX_DIM[stage]} and block_size a multiple of 16 <= 128{extra}; got {dtype}, "
                         f"{what}={dim}, block_size={block_size}" + (f", topk={topk}" if extra else ""))
    return bool(decode)


def _decode_max_q(num_groups: int, queries: int | None = None) -> int:
    """Queries per sequence scored in the decode indexer's tile ((query, group)
    rows <= 32, kept in registers); later queries of a sequence are still
    right, only slower. queries: a caller's bound on a sequence's new tokens
    (a plan's n_new): a smaller tile, fewer registers (one n tile for plain
    decode at Hkv <= 8)."""
    return max(1, min(DECODE_MAX_Q, 32 // num_groups, queries or DECODE_MAX_Q))


# --------------------------------------------------------------------------- stages
def select_blocks(
    q_idx: TensorValue,
    k_idx: TensorValue,
    cu_seqlens_q: TensorValue | None = None,
    cu_seqlens_k: TensorValue | None = None,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    idx_scale=None,
    decode: bool | None = None,
) -> TensorValue:
    """Steps 1-3. Returns block_ids [Hkv, T, topk] int32.

    decode: None picks the decode indexer (split over keys, for a few queries
    per sequence) when T <= DECODE_MAX_Q * B with static T and B; True/False force it.

    The FP8 indexer: q_idx and k_idx both uint8, holding e4m3 bytes (MAX's
    CPU device has no float8 tensors), e.g. from msa_py.quantize_index. Scores are
    e4m3 products summed in fp32 (wgmma e4m3 on Hopper, Di a multiple of
    128; any Di on the CPU). Any positive scale of a query row or of all keys
    leaves the ranking unchanged, so per-row query scales and a per-tensor
    key scale need not be passed: the selection is the reference's on the
    dequantized inputs. Decode-sized calls take the decode indexer's e4m3
    score pass (mma.sync e4m3 from registers), others the general indexer.
    """
    T, S, Hkv, Di = V.index_dims(_shape(q_idx), _shape(k_idx))
    fp8 = _fp8_index(q_idx, k_idx)
    if not fp8:
        V.check_same_dtype([("q_idx", _dtype_name("q_idx", q_idx)), ("k_idx", _dtype_name("k_idx", k_idx))])
    V.Config(topk, block_size, init_blocks, local_blocks).check()
    dev = q_idx.device
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, q_idx.shape[0], k_idx.shape[0], dev)
    Di = _static("q_idx index dim Di", Di)
    Hkv = _static("q_idx groups Hkv", Hkv)
    scale = _scale_value(idx_scale, 1.0 / math.sqrt(Di), dev)
    params = {"topk": topk, "block_size": block_size, "init_blocks": init_blocks,
              "local_blocks": local_blocks, "num_groups": Hkv, "idx_dim": Di}
    if fp8:
        _check_fp8_index_dim(dev, Di)
    else:
        _check_gpu_fit("select", dev, q_idx.dtype, topk=topk, block_size=block_size, dim=Di, num_groups=Hkv)
    if use_decode(decode, _shape(q_idx)[0], _shape(cu_q)[0], q_idx.dtype, dev, stage="select", dim=Di,
                  block_size=block_size, topk=topk):
        B = _num_seqs(cu_q)
        max_q = _decode_max_q(Hkv)
        r_max = Dim(k_idx.shape[0]) // block_size + B
        return ops.custom(
            "msa_select_decode",
            device=dev,
            values=[q_idx, k_idx, cu_q, cu_k, scale],
            out_types=[
                TensorType(DType.int32, [q_idx.shape[1], q_idx.shape[0], topk], device=dev),
                TensorType(DType.float32, [Hkv * max_q * r_max], device=dev),  # block scores
                TensorType(DType.int32, [B + 1], device=dev),  # row offsets
            ],
            parameters=dict(params, max_q=max_q),
        )[0].tensor
    return ops.custom(
        "msa_select",
        device=dev,
        values=[q_idx, k_idx, cu_q, cu_k, scale],
        out_types=[TensorType(DType.int32, [q_idx.shape[1], q_idx.shape[0], topk], device=dev)],
        parameters=params,
    )[0].tensor


def _check_fp8_index_dim(dev: DeviceRef, Di: int) -> None:
    """The FP8 indexer's GPU kernel reads 128-byte rows (wgmma on SW128 panels)."""
    if str(dev.device_type) != "cpu" and Di % 128 != 0:
        raise ValueError(f"the FP8 indexer (e4m3 q_idx and index keys) on the GPU needs Di a multiple of 128 "
                         f"(Hopper wgmma on 128-byte rows), got Di={Di}")


def _fp8_index(q_idx: TensorValue, k_idx: TensorValue) -> bool:
    """Whether the index inputs are e4m3 bytes (uint8, both of them)."""
    u8 = (q_idx.dtype == DType.uint8, k_idx.dtype == DType.uint8)
    if u8[0] != u8[1]:
        raise ValueError(f"q_idx and k_idx must both be uint8 (e4m3 bytes, the FP8 indexer) or both floating; got "
                         f"{q_idx.dtype} and {k_idx.dtype}")
    return u8[0]


def invert(
    block_ids: TensorValue,
    cu_seqlens_q: TensorValue,
    cu_seqlens_k: TensorValue,
    *,
    num_keys,
    block_size: int = 128,
    q_budget: int = 64,
    init_blocks: int = 0,
    local_blocks: int = 0,
) -> Inversion:
    """Step 4. `num_keys` is S (a Dim): output sizes are bounded by it.
    init_blocks / local_blocks > 0 leave each query's forced blocks out (the
    layer's forced pass, `forced_combine`, attends to them)."""
    _check_int32("block_ids", block_ids)
    bshape = _shape(block_ids)
    V.check_rank("block_ids", bshape, 3, "[Hkv, T, topk]")
    topk = _static("block_ids topk", bshape[2])
    V.Config(topk, block_size, init_blocks, local_blocks, q_budget).check()
    V.check_cu_seqlens_shapes(_shape(cu_seqlens_q), _shape(cu_seqlens_k))
    _check_int32("cu_seqlens_q", cu_seqlens_q)
    _check_int32("cu_seqlens_k", cu_seqlens_k)
    dev = block_ids.device
    Hkv, T = block_ids.shape[0], block_ids.shape[1]
    B = _num_seqs(cu_seqlens_q)
    r_max = Dim(num_keys) // block_size + B
    nent = T * topk
    n_win = V.work_windows(T, q_budget)
    w_max = V.work_capacity(Hkv, T, topk, r_max, q_budget)
    i32 = DType.int32
    outs = ops.custom(
        "msa_invert",
        device=dev,
        values=[block_ids, cu_seqlens_q, cu_seqlens_k],
        out_types=[
            TensorType(i32, [B + 1], device=dev),
            TensorType(i32, [Hkv, r_max + 1], device=dev),
            TensorType(i32, [Hkv, nent], device=dev),
            TensorType(i32, [w_max, 4], device=dev),
            TensorType(i32, [1], device=dev),
            TensorType(i32, [Hkv * ((2 * n_win + 1) * r_max + nent + 1)], device=dev),  # scratch
        ],
        parameters={"topk": topk, "block_size": block_size, "q_budget": q_budget, "init_blocks": init_blocks,
                    "local_blocks": local_blocks},
    )
    return Inversion(*(o.tensor for o in outs[:5]))


def _attention_operands(q: TensorValue, k: TensorValue, v: TensorValue):
    """Checks q, k, v for an attention stage. Returns T (maybe symbolic) and
    the static Hq, Hkv, D."""
    T, S, Hq, Hkv, D = V.attention_dims(_shape(q), _shape(k), _shape(v))
    V.check_same_dtype([("q", _dtype_name("q", q)), ("k", _dtype_name("k", k)), ("v", _dtype_name("v", v))])
    return T, _static("q heads Hq", Hq), _static("k heads Hkv", Hkv), _static("q head dim D", D)


def block_attention(
    q: TensorValue,
    k: TensorValue,
    v: TensorValue,
    inversion: Inversion,
    cu_seqlens_q: TensorValue,
    cu_seqlens_k: TensorValue,
    *,
    topk: int = 16,
    block_size: int = 128,
    scale=None,
    use_mma: bool = True,
):
    """Step 5. Returns o_partial [T, Hq, topk, D] and lse_partial [T, Hq, topk] (fp32)."""
    T, Hq, Hkv, D = _attention_operands(q, k, v)
    V.Config(topk, block_size).check()
    dev = q.device
    _check_gpu_fit("block_attention", dev, q.dtype, topk=topk, block_size=block_size, dim=D)
    sc = _scale_value(scale, 1.0 / math.sqrt(D), dev)
    inv = inversion
    o_p, lse_p = ops.custom(
        "msa_block_attention",
        device=dev,
        values=[q, k, v, inv.row_offsets, inv.entries, inv.work, inv.num_work, cu_seqlens_q, cu_seqlens_k, sc],
        out_types=[
            TensorType(partial_dtype_for(q.dtype), [q.shape[0], Hq, topk, D], device=dev),
            TensorType(DType.float32, [q.shape[0], Hq, topk], device=dev),
        ],
        parameters={"topk": topk, "block_size": block_size, "group": Hq // Hkv, "num_groups": Hkv,
                    "head_dim": D, "use_mma": use_mma},
    )
    return o_p.tensor, lse_p.tensor


def decode_attention(
    q: TensorValue,
    k: TensorValue,
    v: TensorValue,
    block_ids: TensorValue,
    cu_seqlens_q: TensorValue,
    cu_seqlens_k: TensorValue,
    *,
    block_size: int = 128,
    scale=None,
):
    """Steps 5-6 query-major with the merge fused (decode): each query's
    selected blocks are the splits of a split-K, merged in the same kernel;
    no inversion, no partials. Returns out [T, Hq, D] (q's dtype) and
    lse [T, Hq] fp32, as sparse_attention. On the GPU: 16-bit inputs,
    D a multiple of 16 <= 128, block_size a multiple of 16 <= 128."""
    T, Hq, Hkv, D = _attention_operands(q, k, v)
    _check_int32("block_ids", block_ids)
    V.check_block_ids_shape(_shape(block_ids), Hkv, T)
    topk = _static("block_ids topk", _shape(block_ids)[2])
    V.Config(topk, block_size).check()
    dev = q.device
    use_decode(True, T, None, q.dtype, dev, stage="attention", dim=D, block_size=block_size)  # GPU shape check
    sc = _scale_value(scale, 1.0 / math.sqrt(D), dev)
    out, lse = ops.custom(
        "msa_decode_attention",
        device=dev,
        values=[q, k, v, block_ids, cu_seqlens_q, cu_seqlens_k, sc],
        out_types=[
            TensorType(q.dtype, [q.shape[0], Hq, D], device=dev),
            TensorType(DType.float32, [q.shape[0], Hq], device=dev),
        ],
        parameters={"block_size": block_size, "group": Hq // Hkv, "num_groups": Hkv, "head_dim": D, "topk": topk},
    )
    return out.tensor, lse.tensor


def combine(o_partial: TensorValue, lse_partial: TensorValue, *, out_dtype: DType | None = None):
    """Step 6. Returns out [T, Hq, D] (out_dtype, default o_partial's) and lse [T, Hq] fp32."""
    osh, lsh = _shape(o_partial), _shape(lse_partial)
    V.check_rank("o_partial", osh, 4, "[T, Hq, topk, D]")
    V.check_rank("lse_partial", lsh, 3, "[T, Hq, topk]")
    if lse_partial.dtype != DType.float32:
        raise ValueError(f"lse_partial must be float32, got {lse_partial.dtype}")
    _dtype_name("o_partial", o_partial)
    topk = _static("o_partial topk", osh[2])
    D = _static("o_partial head dim", osh[3])
    if not (V._eq(lsh[1], osh[1]) and V._eq(lsh[2], osh[2])):
        raise ValueError(f"lse_partial must have shape [T, Hq, topk] matching o_partial {osh}, got {lsh}")
    dev = o_partial.device
    out_dtype = out_dtype or o_partial.dtype
    out, lse = ops.custom(
        "msa_combine",
        device=dev,
        values=[o_partial, lse_partial],
        out_types=[
            TensorType(out_dtype, [o_partial.shape[0], o_partial.shape[1], D], device=dev),
            TensorType(DType.float32, [o_partial.shape[0], o_partial.shape[1]], device=dev),
        ],
        parameters={"topk": topk, "head_dim": D},
    )
    return out.tensor, lse.tensor


def forced_pass_fits(dtype: DType, device: DeviceRef, *, head_dim: int, block_size: int, topk: int,
                     init_blocks: int, local_blocks: int) -> bool:
    """Whether the layer runs the forced pass: the selection always holds each
    query's forced blocks (topk >= init_blocks + local_blocks > 0) and, on the
    GPU, the tensor-core kernel takes the shapes (16-bit inputs, D and
    block_size multiples of 16 up to 128)."""
    if not V.Config(topk, block_size, init_blocks, local_blocks).forced_pass_applies():
        return False
    if str(device.device_type) == "cpu":
        return True
    return forced_gpu_fits(dtype in (DType.bfloat16, DType.float16), head_dim, block_size, topk)


def forced_gpu_fits(sixteen_bit: bool, head_dim: int, block_size: int, topk: int) -> bool:
    """The GPU forced pass's shapes: the tensor-core tiles', and its shared
    memory (forced.mojo): K, V and 64 Q rows (16-bit, padded rows) dynamic,
    the tile's lse_partial (64 x topk fp32) static, under the 48 KB static
    limit."""
    dynamic = (2 * block_size + 64) * (head_dim + 8) * 2
    static = 64 * topk * 4 + 1024  # lse_partial, plus the small per-tile arrays
    return (mma_attention_fits(sixteen_bit, head_dim, block_size) and static <= _STATIC_SMEM_LIMIT
            and dynamic + static <= _SMEM_LIMIT)


def forced_combine(
    q: TensorValue,
    k: TensorValue,
    v: TensorValue,
    o_partial: TensorValue,
    lse_partial: TensorValue,
    cu_seqlens_q: TensorValue,
    cu_seqlens_k: TensorValue,
    *,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale=None,
):
    """The layer's forced pass (steps 5-6 for each query's sinks and local
    blocks, fused with the merge): attends to the forced blocks and merges
    them with o_partial / lse_partial, the block attention's partials of the
    other slots (an inversion made with the same init_blocks / local_blocks).
    Returns out [T, Hq, D] (q's dtype) and lse [T, Hq] fp32."""
    T, Hq, Hkv, D = _attention_operands(q, k, v)
    osh, lsh = _shape(o_partial), _shape(lse_partial)
    V.check_rank("o_partial", osh, 4, "[T, Hq, topk, D]")
    V.check_rank("lse_partial", lsh, 3, "[T, Hq, topk]")
    topk = _static("o_partial topk", osh[2])
    if not (V._eq(osh[0], T) and V._eq(osh[1], Hq) and V._eq(osh[3], D)):
        raise ValueError(f"o_partial must be [T, Hq, topk, D] = [{T}, {Hq}, topk, {D}], got {osh}")
    if not (V._eq(lsh[0], T) and V._eq(lsh[1], Hq) and V._eq(lsh[2], topk)) or lse_partial.dtype != DType.float32:
        raise ValueError(f"lse_partial must be float32 [T, Hq, topk] matching o_partial, got {lse_partial.type}")
    if o_partial.dtype != partial_dtype_for(q.dtype):
        raise ValueError(f"o_partial must be {partial_dtype_for(q.dtype)} for {q.dtype} inputs, got {o_partial.dtype}")
    V.Config(topk, block_size, init_blocks, local_blocks).check().check_forced_pass()
    dev = q.device
    if not forced_pass_fits(q.dtype, dev, head_dim=D, block_size=block_size, topk=topk, init_blocks=init_blocks,
                            local_blocks=local_blocks):
        raise ValueError(f"forced_combine on the GPU needs 16-bit inputs with D and block_size multiples of 16 up "
                         f"to 128 and topk small enough for the shared memory (forced_gpu_fits); got topk={topk}, "
                         f"D={D}, block_size={block_size}, {q.dtype}")
    sc = _scale_value(scale, 1.0 / math.sqrt(D), dev)
    out, lse = ops.custom(
        "msa_forced_combine",
        device=dev,
        values=[q, k, v, o_partial, lse_partial, cu_seqlens_q, cu_seqlens_k, sc],
        out_types=[
            TensorType(q.dtype, [q.shape[0], Hq, D], device=dev),
            TensorType(DType.float32, [q.shape[0], Hq], device=dev),
        ],
        parameters={"topk": topk, "block_size": block_size, "group": Hq // Hkv, "num_groups": Hkv,
                    "head_dim": D, "init_blocks": init_blocks, "local_blocks": local_blocks},
    )
    return out.tensor, lse.tensor


# --------------------------------------------------------------------------- pipelines
def sparse_attention(
    q: TensorValue,
    k: TensorValue,
    v: TensorValue,
    block_ids: TensorValue,
    cu_seqlens_q: TensorValue | None = None,
    cu_seqlens_k: TensorValue | None = None,
    *,
    block_size: int = 128,
    scale=None,
    q_budget: int = 64,
    use_mma: bool = True,
    decode: bool | None = None,
):
    """Invert, block attention, combine. Returns out [T, Hq, D], lse [T, Hq].

    decode: None takes the decode path (query-major, merge fused, no
    inversion: decode_attention) when T <= DECODE_MAX_Q * B with static T
    and B (on the GPU: 16-bit inputs, D and block_size multiples of 16 <= 128);
    True/False force it.
    """
    T, S, Hq, Hkv, D = V.attention_dims(_shape(q), _shape(k), _shape(v))
    _check_int32("block_ids", block_ids)
    V.check_block_ids_shape(_shape(block_ids), Hkv, T)
    topk = _static("block_ids topk", _shape(block_ids)[2])
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], q.device)
    if use_decode(decode, T, _shape(cu_q)[0], q.dtype, q.device, stage="attention", dim=_static("q head dim D", D),
                  block_size=block_size):
        return decode_attention(q, k, v, block_ids, cu_q, cu_k, block_size=block_size, scale=scale)
    inv = invert(block_ids, cu_q, cu_k, num_keys=k.shape[0], block_size=block_size, q_budget=q_budget)
    o_p, lse_p = block_attention(
        q, k, v, inv, cu_q, cu_k, topk=topk, block_size=block_size, scale=scale, use_mma=use_mma
    )
    return combine(o_p, lse_p, out_dtype=q.dtype)


def msa_attention(
    q: TensorValue,
    k: TensorValue,
    v: TensorValue,
    q_idx: TensorValue,
    k_idx: TensorValue,
    cu_seqlens_q: TensorValue | None = None,
    cu_seqlens_k: TensorValue | None = None,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale=None,
    idx_scale=None,
    q_budget: int = 64,
    use_mma: bool = True,
    decode: bool | None = None,
    forced_pass: bool = True,
    max_workspace_bytes: int | None = None,
):
    """Selection then sparse attention. Returns out [T, Hq, D], lse [T, Hq].

    max_workspace_bytes (one sequence, cu_seqlens None, a static T): when the
    call's partials and work list would take more, the graph runs the call as
    slices of queries over their key prefix (_validate.split_queries), the
    same answer. With symbolic shapes or packed batches the graph cannot
    know the lengths: the torch layer (msa_py.msa_attention) splits any batch.

    decode: None takes the decode kernels (indexer split over keys,
    query-major attention with the merge fused) when T <= DECODE_MAX_Q * B
    with static T and B, each stage where its shapes fit on the GPU.
    forced_pass: off the decode path, each query's forced blocks (sinks and
    local, which every selection holds) skip the inversion and the block
    attention and are attended to query-major in the merge
    (`forced_combine`), where `forced_pass_fits`; False: the plain
    invert / block attention / combine pipeline. use_mma picks the block
    attention's GPU path (False: SIMT, for testing); the forced pass always
    runs on tensor cores.
    """
    V.check_workspace(max_workspace_bytes)
    if max_workspace_bytes is not None:
        pieces = _static_pieces(q, k, cu_seqlens_q, topk=topk, block_size=block_size, q_budget=q_budget,
                                max_workspace_bytes=max_workspace_bytes)
        if len(pieces) > 1:
            # slices stay on the prefill kernels (decode None would send a one-query slice to the decode
            # kernels, another summation order): the one-call answer, bit for bit
            kw = dict(topk=topk, block_size=block_size, init_blocks=init_blocks, local_blocks=local_blocks,
                      scale=scale, idx_scale=idx_scale, q_budget=q_budget, use_mma=use_mma,
                      decode=False if decode is None else decode, forced_pass=forced_pass)
            outs = [msa_attention(q[i0:i1], k[:k1], v[:k1], q_idx[i0:i1], k_idx[:k1], **kw) for i0, i1, k1 in pieces]
            return ops.concat([o for o, _ in outs], 0), ops.concat([l for _, l in outs], 0)
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], q.device)
    bid = select_blocks(
        q_idx, k_idx, cu_q, cu_k, topk=topk, block_size=block_size,
        init_blocks=init_blocks, local_blocks=local_blocks, idx_scale=idx_scale, decode=decode,
    )
    return layer_attention(q, k, v, bid, cu_q, cu_k, block_size=block_size, init_blocks=init_blocks,
                           local_blocks=local_blocks, scale=scale, q_budget=q_budget, use_mma=use_mma, decode=decode,
                           forced_pass=forced_pass)


def _static_pieces(q, k, cu_seqlens_q, *, topk, block_size, q_budget, max_workspace_bytes) -> list:
    """(i0, i1, k1) slices of one sequence's queries and their key prefix under
    the workspace budget (msa_attention's max_workspace_bytes)."""
    T, S, Hq, Hkv, D = V.attention_dims(_shape(q), _shape(k), _shape(k))
    if cu_seqlens_q is not None or not (isinstance(T, int) and isinstance(S, int)):
        raise ValueError("max_workspace_bytes in a MAX graph needs one sequence (cu_seqlens None) with static T and "
                         "S; msa_py.msa_attention (torch) splits any batch")
    elem = 4 if q.dtype == DType.float32 else 2
    per_q = V.workspace_bytes_per_query(Hq, Hkv, D, topk, elem, S, block_size, q_budget)
    pieces = V.split_queries([T], [S], max(1, max_workspace_bytes // per_q))
    return [(i0, i1, S - T + i1) for _, _, (i0, i1) in pieces] if pieces[0][2] is not None else [(0, T, S)]


def layer_attention(
    q: TensorValue,
    k: TensorValue,
    v: TensorValue,
    block_ids: TensorValue,
    cu_seqlens_q: TensorValue,
    cu_seqlens_k: TensorValue,
    *,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale=None,
    q_budget: int = 64,
    use_mma: bool = True,
    decode: bool | None = None,
    forced_pass: bool = True,
):
    """msa_attention's attention over a selection from select_blocks (which
    holds every query's forced blocks): the decode kernels, the forced pass
    or the plain pipeline, as msa_attention picks them. Returns out, lse."""
    _, _, _, _, D = V.attention_dims(_shape(q), _shape(k), _shape(v))
    D = _static("q head dim D", D)
    topk = _static("block_ids topk", _shape(block_ids)[2])
    if forced_pass and not use_decode(decode, _shape(q)[0], _shape(cu_seqlens_q)[0], q.dtype, q.device,
                                      stage="attention", dim=D, block_size=block_size) and forced_pass_fits(
            q.dtype, q.device, head_dim=D, block_size=block_size, topk=topk, init_blocks=init_blocks,
            local_blocks=local_blocks):
        return forced_layer(q, k, v, block_ids, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                            init_blocks=init_blocks, local_blocks=local_blocks, scale=scale, q_budget=q_budget,
                            use_mma=use_mma)[-2:]
    return sparse_attention(
        q, k, v, block_ids, cu_seqlens_q, cu_seqlens_k, block_size=block_size, scale=scale, q_budget=q_budget,
        use_mma=use_mma, decode=decode,
    )


# --------------------------------------------------------------------------- backward
def backward_gpu_fits(sixteen_bit: bool, head_dim: int, block_size: int) -> bool:
    """Shapes the GPU backward takes: the tensor-core tiles' (16-bit inputs, D
    and block_size multiples of 16 up to 128)."""
    return mma_attention_fits(sixteen_bit, head_dim, block_size)


def sparse_attention_backward(
    q: TensorValue,
    k: TensorValue,
    v: TensorValue,
    block_ids: TensorValue,
    out: TensorValue,
    lse: TensorValue,
    dout: TensorValue,
    cu_seqlens_q: TensorValue | None = None,
    cu_seqlens_k: TensorValue | None = None,
    *,
    dlse: TensorValue | None = None,
    block_size: int = 128,
    scale=None,
    q_budget: int = 64,
):
    """Gradients of sparse_attention (or msa_attention) for a fixed selection:
    out / lse the forward's outputs, dout [T, Hq, D] (q's dtype) and dlse
    [T, Hq] fp32 (None: 0) the gradients reaching them. Returns dq [T, Hq, D],
    dk, dv [S, Hkv, D] in q's dtype (see msa_py.reference.sparse_attention_backward).
    On the GPU: 16-bit inputs, D and block_size multiples of 16 up to 128."""
    T, Hq, Hkv, D = _attention_operands(q, k, v)
    _check_int32("block_ids", block_ids)
    V.check_block_ids_shape(_shape(block_ids), Hkv, T)
    topk = _static("block_ids topk", _shape(block_ids)[2])
    V.Config(topk, block_size, q_budget=q_budget).check()
    for name, x in (("out", out), ("dout", dout)):
        if x.dtype != q.dtype or not all(V._eq(a, b) for a, b in zip(_shape(x), _shape(q))):
            raise ValueError(f"{name} must have q's dtype and shape {_shape(q)}, got {x.type}")
    if lse.dtype != DType.float32 or len(lse.shape) != 2:
        raise ValueError(f"lse must be float32 [T, Hq], got {lse.type}")
    dev = q.device
    if str(dev.device_type) != "cpu" and not backward_gpu_fits(q.dtype in (DType.bfloat16, DType.float16), D,
                                                               block_size):
        raise ValueError(f"the GPU backward needs bfloat16 or float16 inputs with D and block_size multiples of 16 "
                         f"up to 128; got {q.dtype}, D={D}, block_size={block_size}")
    cu_q, cu_k = _seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], dev)
    if dlse is None:
        dlse = ops.broadcast_to(ops.constant(np.zeros((1, 1), np.float32), DType.float32, device=dev), lse.shape)
    sc = _scale_value(scale, 1.0 / math.sqrt(D), dev)
    inv = invert(block_ids, cu_q, cu_k, num_keys=k.shape[0], block_size=block_size, q_budget=q_budget)
    Tq, S = q.shape[0], k.shape[0]
    outs = ops.custom(
        "msa_sparse_backward",
        device=dev,
        values=[q, k, v, out, dout, lse, dlse, block_ids, inv.row_offsets, inv.row_ptr, inv.entries, inv.work,
                inv.num_work, cu_q, cu_k, sc],
        out_types=[
            TensorType(q.dtype, [Tq, Hq, D], device=dev),
            TensorType(k.dtype, [S, Hkv, D], device=dev),
            TensorType(k.dtype, [S, Hkv, D], device=dev),
            TensorType(partial_dtype_for(q.dtype), [Tq, Hq, topk, D], device=dev),  # dq partials
            TensorType(DType.float32, [S * (2 * Hkv * D) + Tq * Hq], device=dev),  # dk, dv accumulators, Dr
        ],
        parameters={"topk": topk, "block_size": block_size, "group": Hq // Hkv, "num_groups": Hkv, "head_dim": D},
    )
    return outs[0].tensor, outs[1].tensor, outs[2].tensor


def forced_layer(q, k, v, block_ids, cu_seqlens_q, cu_seqlens_k, *, block_size: int, init_blocks: int,
                 local_blocks: int, scale, q_budget: int, use_mma: bool = True):
    """Steps 4-6 with the forced pass, on a selection's block_ids: the
    inversion without the forced blocks, the block attention of the other
    slots, then forced_combine. Returns (Inversion, o_partial, lse_partial,
    out, lse)."""
    topk = _static("block_ids topk", _shape(block_ids)[2])
    inv = invert(block_ids, cu_seqlens_q, cu_seqlens_k, num_keys=k.shape[0], block_size=block_size,
                 q_budget=q_budget, init_blocks=init_blocks, local_blocks=local_blocks)
    o_p, lse_p = block_attention(q, k, v, inv, cu_seqlens_q, cu_seqlens_k, topk=topk, block_size=block_size,
                                 scale=scale, use_mma=use_mma)
    out, lse = forced_combine(q, k, v, o_p, lse_p, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                              init_blocks=init_blocks, local_blocks=local_blocks, scale=scale)
    return inv, o_p, lse_p, out, lse


# --------------------------------------------------------------------------- paged caches
class PagedCache(NamedTuple):
    """Paged caches as the kernels read them: the flat storage of K, V
    ([num_pages, block_size, Hkv, D]) and of the index keys ([num_pages,
    block_size, Di]), and the geometry vector (int64 [6]: max_pages, kv page,
    kv key, kv group, index page, index key strides in elements). From
    shaped, contiguous caches: `paged_cache`; the torch layer passes any
    strides this way.

    K / V and the index keys may be e4m3 (each pair in q's dtype or e4m3),
    as float8_e4m3fn tensors or their bytes as uint8 (MAX's CPU device has
    no float8 tensors): the dequantized values are cache * k_scale, v_scale,
    k_idx_scale (per-tensor, floats or float32 [1] tensors; None is 1).
    The decode kernels read e4m3 directly; a prefill-sized call first widens
    the pages its sequences use to q's dtype (`msa_widen_pages`)."""

    k: TensorValue
    v: TensorValue
    k_idx: TensorValue
    geometry: TensorValue
    k_scale: object = None
    v_scale: object = None
    k_idx_scale: object = None


def paged_cache(k_cache: TensorValue, v_cache: TensorValue, k_idx_cache: TensorValue, page_table: TensorValue,
                *, block_size: int = 128, k_scale=None, v_scale=None, k_idx_scale=None) -> PagedCache:
    """PagedCache of contiguous shaped caches: k_cache, v_cache [num_pages,
    block_size, Hkv, D], k_idx_cache [num_pages, block_size, Di]; the scales
    of e4m3 caches (see PagedCache)."""
    _, Hkv, D, Di, _, max_pages = V.paged_dims(_shape(k_cache), _shape(v_cache), _shape(k_idx_cache),
                                               _shape(page_table), (page_table.shape[0],), block_size)
    Hkv, D, Di = _static("k_cache Hkv", Hkv), _static("k_cache D", D), _static("k_idx_cache Di", Di)
    mp = _static("page_table max_pages", max_pages)
    geom = V.cache_geometry((block_size * Hkv * D, Hkv * D, D, 1), (block_size * Di, Di, 1), mp)
    g = ops.constant(np.array(geom, np.int64), DType.int64, device=k_cache.device)
    flat = lambda x: ops.reshape(x, [-1])  # noqa: E731
    return PagedCache(flat(k_cache), flat(v_cache), flat(k_idx_cache), g, k_scale, v_scale, k_idx_scale)


def _is_e4m3(cache: TensorValue) -> bool:
    return cache.dtype in (DType.float8_e4m3fn, DType.uint8)


def _cache_scale(name: str, cache: TensorValue, scale, dtype: DType):
    """The scale of an e4m3 cache `name` (None: 1); an error for a scale on a cache in q's dtype."""
    if _is_e4m3(cache):
        return scale
    if cache.dtype != dtype:
        raise ValueError(f"{name}_cache must be in its queries' dtype {dtype} or e4m3 (float8_e4m3fn, or uint8 "
                         f"bytes), got {cache.dtype}")
    if scale is not None:
        raise ValueError(f"{name}_scale applies to a float8_e4m3fn {name}_cache; this one is {cache.dtype}")
    return None


def _widen_pages(cache: TensorValue, page_table: TensorValue, seq_lens: TensorValue, geometry: TensorValue,
                 dtype: DType, scale, *, which: int, block_size: int, groups: int, width: int):
    """The prefill kernels read caches in q's dtype: the pages of an e4m3 cache
    the sequences use, widened (times scale) into a compact cache
    [B * max_pages, block_size, groups, width], with its page table and a
    geometry vector whose K / V (which 0) or index-key (which 1) strides
    are the compact cache's (widen.mojo)."""
    dev = cache.device
    n = Dim(page_table.shape[0]) * Dim(page_table.shape[1]) * (block_size * groups * width)
    wide, table = ops.custom(
        "msa_widen_pages", device=dev,
        values=[cache, page_table, seq_lens, geometry, _scale_value(scale, 1.0, dev)],
        out_types=[TensorType(dtype, [n], device=dev), TensorType(DType.int32, page_table.shape, device=dev)],
        parameters={"block_size": block_size, "groups": groups, "width": width, "which": which})
    strides = [block_size * groups * width, groups * width, width][: 3 if which == 0 else 2]
    const = ops.constant(np.array(strides, np.int64), DType.int64, device=dev)
    parts = [geometry[0:1], const, geometry[4:6]] if which == 0 else [geometry[0:4], const]
    return wide.tensor, table.tensor, ops.concat(parts)


def _times(scale: TensorValue, factor, device: DeviceRef) -> TensorValue:
    """scale [1] times a cache's scale (a float or a float32 [1] tensor); scale itself for None."""
    return scale if factor is None else ops.mul(scale, _scale_value(factor, 1.0, device))


def seq_offsets(seq_lens: TensorValue) -> TensorValue:
    """cu_seqlens_k [B+1] of the paged sequences' lengths seq_lens [B] int32."""
    _check_int32("seq_lens", seq_lens)
    return ops.custom("msa_seq_offsets", device=seq_lens.device, values=[seq_lens],
                      out_types=[TensorType(DType.int32, [seq_lens.shape[0] + 1], device=seq_lens.device)])[0].tensor


def paged_select_blocks(
    q_idx: TensorValue,
    cache: PagedCache,
    page_table: TensorValue,
    seq_lens: TensorValue,
    cu_seqlens_q: TensorValue,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    idx_scale=None,
    decode: bool | None = None,
    decode_queries: int | None = None,
) -> TensorValue:
    """select_blocks over a paged index-key cache. Returns logical block_ids [Hkv, T, topk].

    decode_queries: the most new tokens a sequence has (a decode plan's
    n_new), which sizes the decode indexer's query tile; more are right, only
    slower.

    The FP8 indexer: q_idx as uint8 e4m3 bytes (rows quantized, e.g. by
    msa_py.torch_ops.quantize_rows) over an e4m3 index-key cache: e4m3
    products on tensor cores, the cache read as stored (decode-sized calls:
    the decode indexer's e4m3 score pass; others the general indexer)."""
    T, Hkv, Di = _shape(q_idx)
    Di, Hkv = _static("q_idx Di", Di), _static("q_idx Hkv", Hkv)
    _check_int32("page_table", page_table)
    V.Config(topk, block_size, init_blocks, local_blocks).check()
    dev = q_idx.device
    cu_k = seq_offsets(seq_lens)
    params = {"topk": topk, "block_size": block_size, "init_blocks": init_blocks, "local_blocks": local_blocks,
              "num_groups": Hkv, "idx_dim": Di}
    out_bid = TensorType(DType.int32, [q_idx.shape[1], q_idx.shape[0], topk], device=dev)
    if q_idx.dtype in (DType.uint8, DType.float8_e4m3fn):
        if not _is_e4m3(cache.k_idx):
            raise ValueError(f"e4m3 q_idx (the FP8 indexer) reads an e4m3 index-key cache, got {cache.k_idx.dtype}")
        _check_fp8_index_dim(dev, Di)
        scale = _times(_scale_value(idx_scale, 1.0 / math.sqrt(Di), dev), cache.k_idx_scale, dev)
        as_bytes = lambda x: x if x.dtype == DType.uint8 else ops.bitcast(x, DType.uint8)  # noqa: E731
        values = [as_bytes(q_idx), as_bytes(cache.k_idx), cu_seqlens_q, cu_k, page_table, cache.geometry, scale]
        use_dec = use_decode(decode, T, _shape(cu_seqlens_q)[0], DType.uint8, dev, stage="select", dim=Di,
                             block_size=block_size, topk=topk)
    else:
        _check_gpu_fit("select", dev, q_idx.dtype, topk=topk, block_size=block_size, dim=Di, num_groups=Hkv)
        k_idx_scale = _cache_scale("k_idx", cache.k_idx, cache.k_idx_scale, q_idx.dtype)
        scale = _times(_scale_value(idx_scale, 1.0 / math.sqrt(Di), dev), k_idx_scale, dev)
        values = [q_idx, cache.k_idx, cu_seqlens_q, cu_k, page_table, cache.geometry, scale]
        use_dec = use_decode(decode, T, _shape(cu_seqlens_q)[0], q_idx.dtype, dev, stage="select", dim=Di,
                             block_size=block_size, topk=topk)
        if _is_e4m3(cache.k_idx) and not use_dec:  # the prefill indexer reads q's dtype
            k_idx, page_table, geometry = _widen_pages(cache.k_idx, page_table, seq_lens, cache.geometry,
                                                       q_idx.dtype, None, which=1, block_size=block_size, groups=1,
                                                       width=Di)
            values = [q_idx, k_idx, cu_seqlens_q, cu_k, page_table, geometry, scale]
    if use_dec:
        B = _num_seqs(cu_seqlens_q)
        max_q = _decode_max_q(Hkv, decode_queries)
        r_max = B * page_table.shape[1]
        return ops.custom("msa_select_decode_paged", device=dev, values=values,
                          out_types=[out_bid, TensorType(DType.float32, [Hkv * max_q * r_max], device=dev),
                                     TensorType(DType.int32, [B + 1], device=dev)],
                          parameters=dict(params, max_q=max_q))[0].tensor
    return ops.custom("msa_select_paged", device=dev, values=values, out_types=[out_bid], parameters=params)[0].tensor


def paged_sparse_attention(
    q: TensorValue,
    cache: PagedCache,
    block_ids: TensorValue,
    page_table: TensorValue,
    seq_lens: TensorValue,
    cu_seqlens_q: TensorValue,
    *,
    block_size: int = 128,
    init_blocks: int = 0,
    local_blocks: int = 0,
    scale=None,
    q_budget: int = 64,
    decode: bool | None = None,
):
    """Attention over a selection, K / V read through the page table. With
    init_blocks / local_blocks (a selection from paged_select_blocks, which
    holds every query's forced blocks) the layer's forced pass merges them;
    else the plain pipeline. Returns out [T, Hq, D], lse [T, Hq]."""
    T, Hq, D = _shape(q)
    Hq, D = _static("q Hq", Hq), _static("q D", D)
    Hkv = _static("block_ids Hkv", _shape(block_ids)[0])
    topk = _static("block_ids topk", _shape(block_ids)[2])
    V.check_heads(Hq, Hkv, "q")
    dev = q.device
    k_scale = _cache_scale("k", cache.k, cache.k_scale, q.dtype)
    v_scale = _cache_scale("v", cache.v, cache.v_scale, q.dtype)
    if cache.v.dtype != cache.k.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {cache.k.dtype} and {cache.v.dtype}")
    sc = _times(_scale_value(scale, 1.0 / math.sqrt(D), dev), k_scale, dev)
    cu_k = seq_offsets(seq_lens)
    heads = {"group": Hq // Hkv, "num_groups": Hkv, "head_dim": D}
    use_dec = use_decode(decode, T, _shape(cu_seqlens_q)[0], q.dtype, dev, stage="attention", dim=D,
                         block_size=block_size)
    if _is_e4m3(cache.k) and not use_dec:  # the prefill kernels read q's dtype: widen the pages in use
        wide = dict(which=0, block_size=block_size, groups=Hkv, width=D)
        v, _, _ = _widen_pages(cache.v, page_table, seq_lens, cache.geometry, q.dtype, v_scale, **wide)
        k, page_table, geometry = _widen_pages(cache.k, page_table, seq_lens, cache.geometry, q.dtype, None, **wide)
        cache = cache._replace(k=k, v=v, geometry=geometry, k_scale=None, v_scale=None)
    if use_dec:
        if _is_e4m3(cache.k):  # the kernel reads [softmax scale * k_scale, v_scale]
            sc = ops.concat([sc, _scale_value(v_scale, 1.0, dev)])
        out, lse = ops.custom(
            "msa_decode_attention_paged", device=dev,
            values=[q, cache.k, cache.v, block_ids, cu_seqlens_q, cu_k, page_table, cache.geometry, sc],
            out_types=[TensorType(q.dtype, [q.shape[0], Hq, D], device=dev),
                       TensorType(DType.float32, [q.shape[0], Hq], device=dev)],
            parameters=dict(heads, block_size=block_size, topk=topk))
        return out.tensor, lse.tensor
    forced = init_blocks + local_blocks > 0 and forced_pass_fits(q.dtype, dev, head_dim=D, block_size=block_size,
                                                                 topk=topk, init_blocks=init_blocks,
                                                                 local_blocks=local_blocks)
    skip = dict(init_blocks=init_blocks, local_blocks=local_blocks) if forced else {}
    num_keys = Dim(_num_seqs(cu_seqlens_q)) * Dim(page_table.shape[1]) * block_size
    inv = invert(block_ids, cu_seqlens_q, cu_k, num_keys=num_keys, block_size=block_size, q_budget=q_budget, **skip)
    _check_gpu_fit("block_attention", dev, q.dtype, topk=topk, block_size=block_size, dim=D)
    o_p, lse_p = ops.custom(
        "msa_block_attention_paged", device=dev,
        values=[q, cache.k, cache.v, inv.row_offsets, inv.entries, inv.work, inv.num_work, cu_seqlens_q, cu_k,
                page_table, cache.geometry, sc],
        out_types=[TensorType(partial_dtype_for(q.dtype), [q.shape[0], Hq, topk, D], device=dev),
                   TensorType(DType.float32, [q.shape[0], Hq, topk], device=dev)],
        parameters=dict(heads, topk=topk, block_size=block_size))
    if not forced:
        return combine(o_p.tensor, lse_p.tensor, out_dtype=q.dtype)
    out, lse = ops.custom(
        "msa_forced_combine_paged", device=dev,
        values=[q, cache.k, cache.v, o_p.tensor, lse_p.tensor, cu_seqlens_q, cu_k, page_table, cache.geometry, sc],
        out_types=[TensorType(q.dtype, [q.shape[0], Hq, D], device=dev),
                   TensorType(DType.float32, [q.shape[0], Hq], device=dev)],
        parameters=dict(heads, topk=topk, block_size=block_size, init_blocks=init_blocks, local_blocks=local_blocks))
    return out.tensor, lse.tensor


def paged_msa_attention(
    q: TensorValue,
    cache: PagedCache,
    q_idx: TensorValue,
    page_table: TensorValue,
    seq_lens: TensorValue,
    cu_seqlens_q: TensorValue,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale=None,
    idx_scale=None,
    q_budget: int = 64,
    decode: bool | None = None,
):
    """msa_attention over paged caches (PagedCache; `paged_cache` builds one
    from shaped caches): q [T, Hq, D] and q_idx [T, Hkv, Di] the new tokens
    of each sequence, page_table [B, max_pages], seq_lens [B] (new tokens
    included). Returns out [T, Hq, D], lse [T, Hq]."""
    bid = paged_select_blocks(q_idx, cache, page_table, seq_lens, cu_seqlens_q, topk=topk, block_size=block_size,
                              init_blocks=init_blocks, local_blocks=local_blocks, idx_scale=idx_scale, decode=decode)
    return paged_sparse_attention(q, cache, bid, page_table, seq_lens, cu_seqlens_q, block_size=block_size,
                                  init_blocks=init_blocks, local_blocks=local_blocks, scale=scale, q_budget=q_budget,
                                  decode=decode)
