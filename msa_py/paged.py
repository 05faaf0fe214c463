"""Paged KV caches on torch tensors (msa_py.paged, exported as msa_py.*):
the layer and its stages reading K, V and the index keys through a page
table (page size == block_size, any strides with the last dimension
contiguous), and the cache append. Conventions in docs/api.md.

FP8 caches: K / V and the index keys may each be torch.float8_e4m3fn with a
per-tensor scale (dequantized value = cache * k_scale, v_scale,
k_idx_scale). The decode kernels read them directly (k_scale and
k_idx_scale fold into the softmax and index scales, v_scale scales the
output in the kernel); a prefill-sized call first widens the pages its
sequences use to q's dtype (msa_py.graph, `msa_widen_pages`)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from . import _validate as V
from . import engine as E
from .torch_ops import (
    _DTYPES, FP8, _check_tensors, _consts, _decode, _device_key, _dtype_name, _msa_outputs, _msa_spec, _run,
    _scale_tensor, _spec, _value_checks_off, check_fp8_index_dim, check_index_dtype, quantize_rows, to_e4m3,
)



class CacheFormat(NamedTuple):
    """The caches' dtypes as Spec fields ("" = the queries' dtype) and their
    scales (1.0 for caches in the queries' dtype)."""

    kv_dtype: str
    idx_dtype: str
    k_scale: float
    v_scale: float
    k_idx_scale: float

    def spec_fields(self) -> dict:
        return dict(kv_cache_dtype=self.kv_dtype, idx_cache_dtype=self.idx_dtype)


def _cache_dtype(name: str, cache: Optional[torch.Tensor], dtype: torch.dtype) -> str:
    if cache is None or cache.dtype == dtype:
        return ""
    if cache.dtype == FP8:
        return "float8_e4m3fn"
    raise ValueError(f"{name} must be in its queries' dtype {dtype} or torch.float8_e4m3fn, got {cache.dtype}")


def _cache_scale(name: str, value, fp8: bool) -> float:
    if value is None:
        return 1.0
    if not fp8:
        raise ValueError(f"{name} applies to a float8_e4m3fn cache; this cache is in its queries' dtype")
    V.check_scale(name, value)
    return float(value)


def cache_format(dtype: torch.dtype, k_cache=None, v_cache=None, k_idx_cache=None, *, k_scale=None, v_scale=None,
                 k_idx_scale=None) -> CacheFormat:
    """Checks the caches' dtypes against the queries' `dtype` (each pair in
    it or e4m3, K and V alike) and their scales (only for e4m3 caches)."""
    kv = _cache_dtype("k_cache", k_cache, dtype)
    if v_cache is not None and k_cache is not None and v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    idx = _cache_dtype("k_idx_cache", k_idx_cache, dtype)
    return CacheFormat(kv, idx, _cache_scale("k_scale", k_scale, bool(kv)), _cache_scale("v_scale", v_scale, bool(kv)),
                       _cache_scale("k_idx_scale", k_idx_scale, bool(idx)))


def _fp8_queries(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, index_dtype) -> torch.Tensor:
    """index_dtype=torch.float8_e4m3fn: q_idx quantized per (token, group) row
    (quantize_rows), so the indexer multiplies e4m3 queries by the e4m3
    index-key cache on FP8 tensor cores (no widening of the cache). A row's
    scale does not change its ranking: the selection is the reference's on
    the dequantized queries and keys."""
    check_index_dtype(index_dtype)
    if index_dtype is None:
        return q_idx
    if k_idx_cache.dtype != FP8:
        raise ValueError(f"index_dtype=torch.float8_e4m3fn reads an e4m3 k_idx_cache, got {k_idx_cache.dtype}")
    check_fp8_index_dim(q_idx)
    return quantize_rows(q_idx)[0]


def _inputs(kind: str, spec, tensors: dict) -> dict:
    """The graph inputs of `kind` for this spec (v_scale only for an e4m3 V
    cache), e4m3 caches viewed as their bytes (the graphs take uint8)."""
    return {n: tensors[n].view(torch.uint8) if tensors[n].dtype == FP8 else tensors[n]
            for n in E.input_names(kind, spec)}


def _flat_storage(name: str, x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the storage a strided cache spans (no copy): the kernels
    address it through the geometry vector."""
    if x.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension, got strides {x.stride()}")
    extent = 0 if x.numel() == 0 else 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
    return torch.as_strided(x, (extent,), (1,), x.storage_offset())


def _geometry(k_cache: torch.Tensor, k_idx_cache: Optional[torch.Tensor], max_pages: int) -> torch.Tensor:
    g = tuple(V.cache_geometry(k_cache.stride(), None if k_idx_cache is None else k_idx_cache.stride(), max_pages))
    key = ("geom", g, k_cache.device)
    t = _consts.get(key)
    if t is None:
        t = torch.tensor(g, dtype=torch.int64, device=k_cache.device)
        _consts[key] = t
    return t


def _paged_checks(q, k_cache, v_cache, k_idx_cache, page_table, seq_lens, cu_seqlens_q, block_size):
    """Shapes and dtypes of the paged entry points, then (one device sync,
    skipped like the other value checks) the page table and lengths."""
    for name, t in (("page_table", page_table), ("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 tensor")
    num_pages, Hkv, D, Di, B, max_pages = V.paged_dims(
        tuple(k_cache.shape), tuple((v_cache if v_cache is not None else k_cache).shape),
        None if k_idx_cache is None else tuple(k_idx_cache.shape), tuple(page_table.shape), tuple(seq_lens.shape),
        block_size)
    if v_cache is not None and v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache must have k_cache's strides {k_cache.stride()}, got {v_cache.stride()}")
    V.check_cu_seqlens_shapes(tuple(cu_seqlens_q.shape), (B + 1,))
    if not page_table.is_contiguous() or not seq_lens.is_contiguous():
        raise ValueError("page_table and seq_lens must be contiguous")
    if not _value_checks_off(page_table):
        V.check_paged_values(page_table.cpu().numpy(), seq_lens.cpu().numpy(), cu_seqlens_q.cpu().numpy(),
                             num_pages, block_size, q.shape[0])
    return num_pages, Hkv, D, Di, B, max_pages


@torch.library.custom_op("msa::paged_msa_attention", mutates_args=())
def _paged_msa_op(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, q_idx: torch.Tensor, k_idx_flat: torch.Tensor,
    page_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, geometry: torch.Tensor, Hkv: int,
    topk: int, block_size: int, init_blocks: int, local_blocks: int, scale: float, idx_scale: float, v_scale: float,
    q_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, block_ids = _msa_outputs(q, Hkv, topk)
    if q.shape[0] == 0:
        return out, lse, block_ids
    fmt = cache_format(q.dtype, k_flat, v_flat, k_idx_flat)
    spec = _msa_spec(q, q_idx, Hkv, cu_seqlens_q, topk, block_size, init_blocks, local_blocks, q_budget,
                     **fmt.spec_fields())
    ins = dict(q=q, k_cache=k_flat, v_cache=v_flat, q_idx=q_idx, k_idx_cache=k_idx_flat, page_table=page_table,
               seq_lens=seq_lens, cu_q=cu_seqlens_q, geometry=geometry, scale=_scale_tensor(scale, q),
               idx_scale=_scale_tensor(idx_scale, q), v_scale=_scale_tensor(v_scale, q))
    _run("paged_msa", spec, _device_key(q), _inputs("paged_msa", spec, ins), [out, lse, block_ids])
    return out, lse, block_ids


@_paged_msa_op.register_fake
def _(q, k_flat, v_flat, q_idx, k_idx_flat, page_table, seq_lens, cu_seqlens_q, geometry, Hkv, topk, block_size,
      init_blocks, local_blocks, scale, idx_scale, v_scale, q_budget):
    return (torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32),
            q.new_empty((Hkv, q.shape[0], topk), dtype=torch.int32))


def paged_msa_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: Optional[float] = None,
    idx_scale: Optional[float] = None,
    q_budget: int = 64,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    k_idx_scale: Optional[float] = None,
    index_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """msa_attention over paged caches (page size == block_size).

    q [T, Hq, D] and q_idx [T, Hkv, Di]: the new tokens, sequence b's last
    cu_seqlens_q[b+1] - cu_seqlens_q[b] of its seq_lens[b] keys (prefill of
    a chunk over a cache that already holds it, decode, speculative decode).
    k_cache, v_cache [num_pages, block_size, Hkv, D] and k_idx_cache
    [num_pages, block_size, Di] in q's dtype, any strides with the last
    dimension contiguous (a FlashInfer cache [num_pages, Hkv, block_size, D]
    as `.transpose(1, 2)`, K and V interleaved in one allocation as two
    slices; K and V must share strides). page_table [B, max_pages] int32:
    logical block j of sequence b is page page_table[b, j]; seq_lens [B]
    int32. block_ids stay logical. Returns out [T, Hq, D], lse [T, Hq] fp32.

    K / V and the index keys may be torch.float8_e4m3fn, dequantized as
    cache * k_scale, v_scale, k_idx_scale (floats; only for e4m3 caches):
    read directly by the decode kernels, widened page by page for prefill.
    index_dtype=torch.float8_e4m3fn (with an e4m3 k_idx_cache): the FP8
    indexer, q_idx quantized per row, the cache read as stored (decode-sized
    calls: e4m3 mma.sync straight from global memory; others the general
    indexer's wgmma).
    """
    return paged_layer(q, k_cache, v_cache, q_idx, k_idx_cache, page_table, seq_lens, cu_seqlens_q, topk=topk,
                       block_size=block_size, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale,
                       idx_scale=idx_scale, q_budget=q_budget, k_scale=k_scale, v_scale=v_scale,
                       k_idx_scale=k_idx_scale, index_dtype=index_dtype)[:2]


def paged_layer(q, k_cache, v_cache, q_idx, k_idx_cache, page_table, seq_lens, cu_seqlens_q, *, topk=16,
                block_size=128, init_blocks=1, local_blocks=2, scale=None, idx_scale=None, q_budget=64,
                k_scale=None, v_scale=None, k_idx_scale=None, index_dtype=None):
    """paged_msa_attention with the layer's own selection: (out, lse,
    block_ids [Hkv, T, topk]), for checks and tests that compare both with
    the reference (msa_py.check); the same arguments and defaults."""
    _check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, q_idx=q_idx, k_idx_cache=k_idx_cache)
    num_pages, Hkv, D, Di, B, max_pages = _paged_checks(q, k_cache, v_cache, k_idx_cache, page_table, seq_lens,
                                                        cu_seqlens_q, block_size)
    T, Hq, Dq = q.shape
    if Dq != D or q_idx.shape[0] != T or q_idx.shape[1] != Hkv or q_idx.shape[2] != Di:
        raise ValueError(f"q must be [T, Hq, D={D}] and q_idx [T, Hkv={Hkv}, Di={Di}] for these caches, got "
                         f"{tuple(q.shape)} and {tuple(q_idx.shape)}")
    V.check_heads(Hq, Hkv, "q")
    V.check_same_dtype([("q", _dtype_name("q", q)), ("q_idx", _dtype_name("q_idx", q_idx))])
    fmt = cache_format(q.dtype, k_cache, v_cache, k_idx_cache, k_scale=k_scale, v_scale=v_scale,
                       k_idx_scale=k_idx_scale)
    V.Config(topk, block_size, init_blocks, local_blocks, q_budget).check()
    V.check_scale("scale", scale)
    V.check_scale("idx_scale", idx_scale)
    sc = (1.0 / math.sqrt(D) if scale is None else float(scale)) * fmt.k_scale
    isc = (1.0 / math.sqrt(Di) if idx_scale is None else float(idx_scale)) * fmt.k_idx_scale
    q_idx = _fp8_queries(q_idx, k_idx_cache, index_dtype)
    return torch.ops.msa.paged_msa_attention(
        q, _flat_storage("k_cache", k_cache), _flat_storage("v_cache", v_cache), q_idx,
        _flat_storage("k_idx_cache", k_idx_cache), page_table, seq_lens, cu_seqlens_q,
        _geometry(k_cache, k_idx_cache, max_pages), Hkv, topk, block_size, init_blocks, local_blocks, sc, isc,
        fmt.v_scale, q_budget)


@torch.library.custom_op("msa::paged_select_blocks", mutates_args=())
def _paged_select_op(
    q_idx: torch.Tensor, k_idx_flat: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor, geometry: torch.Tensor, topk: int, block_size: int, init_blocks: int,
    local_blocks: int, idx_scale: float,
) -> torch.Tensor:
    T, Hkv, Di = q_idx.shape
    out = torch.empty((Hkv, T, topk), dtype=torch.int32, device=q_idx.device)
    if T == 0:
        return out
    if q_idx.dtype == FP8:  # the FP8 indexer over an e4m3 cache (decode-sized: the decode indexer's e4m3 pass)
        spec = _spec("bfloat16", Hkv, Hkv, 16, Di, topk=topk, block_size=block_size, init_blocks=init_blocks,
                     local_blocks=local_blocks, idx_dtype="float8_e4m3fn", idx_cache_dtype="float8_e4m3fn",
                     decode=_decode(T, cu_seqlens_q, q_idx, block_size, Di=Di, topk=topk))
    else:
        spec = _spec(_DTYPES[q_idx.dtype], Hkv, Hkv, 16, Di, topk=topk, block_size=block_size,
                     init_blocks=init_blocks, local_blocks=local_blocks,
                     decode=_decode(T, cu_seqlens_q, q_idx, block_size, Di=Di, topk=topk),
                     **cache_format(q_idx.dtype, k_idx_cache=k_idx_flat).spec_fields())
    ins = dict(q_idx=q_idx, k_idx_cache=k_idx_flat, page_table=page_table, seq_lens=seq_lens, cu_q=cu_seqlens_q,
               geometry=geometry, idx_scale=_scale_tensor(idx_scale, q_idx))
    _run("paged_select", spec, _device_key(q_idx), _inputs("paged_select", spec, ins), [out])
    return out


@_paged_select_op.register_fake
def _(q_idx, k_idx_flat, page_table, seq_lens, cu_seqlens_q, geometry, topk, block_size, init_blocks, local_blocks,
      idx_scale):
    return q_idx.new_empty((q_idx.shape[1], q_idx.shape[0], topk), dtype=torch.int32)


def paged_select_blocks(
    q_idx: torch.Tensor,
    k_idx_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    idx_scale: Optional[float] = None,
    k_idx_scale: Optional[float] = None,
    index_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """select_blocks over a paged index-key cache k_idx_cache [num_pages,
    block_size, Di] (conventions of paged_msa_attention; e4m3 with
    k_idx_scale; index_dtype=torch.float8_e4m3fn: the FP8 indexer).
    Returns logical block_ids [Hkv, T, topk] int32."""
    _check_tensors(q_idx=q_idx, k_idx_cache=k_idx_cache)
    V.check_rank("k_idx_cache", tuple(k_idx_cache.shape), 3, "[num_pages, block_size, Di]")
    fake = k_idx_cache.new_empty((k_idx_cache.shape[0], block_size, 1, 1))
    _, _, _, Di, B, max_pages = _paged_checks(q_idx, fake, None, k_idx_cache, page_table, seq_lens, cu_seqlens_q,
                                              block_size)
    V.index_dims(tuple(q_idx.shape), (1, Di))
    _dtype_name("q_idx", q_idx)
    fmt = cache_format(q_idx.dtype, k_idx_cache=k_idx_cache, k_idx_scale=k_idx_scale)
    V.Config(topk, block_size, init_blocks, local_blocks).check()
    V.check_scale("idx_scale", idx_scale)
    isc = (1.0 / math.sqrt(Di) if idx_scale is None else float(idx_scale)) * fmt.k_idx_scale
    geom = _geometry(fake, k_idx_cache, max_pages)
    q_idx = _fp8_queries(q_idx, k_idx_cache, index_dtype)
    return torch.ops.msa.paged_select_blocks(q_idx, _flat_storage("k_idx_cache", k_idx_cache), page_table, seq_lens,
                                             cu_seqlens_q, geom, topk, block_size, init_blocks, local_blocks, isc)


@torch.library.custom_op("msa::paged_sparse_attention", mutates_args=())
def _paged_sparse_op(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, block_ids: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, geometry: torch.Tensor, block_size: int, scale: float,
    v_scale: float, q_budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, Hq, D = q.shape
    Hkv = block_ids.shape[0]
    out = torch.empty_like(q)
    lse = torch.empty((T, Hq), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    spec = _spec(_DTYPES[q.dtype], Hq, Hkv, D, 16, topk=block_ids.shape[2], block_size=block_size, q_budget=q_budget,
                 decode=_decode(T, cu_seqlens_q, q, block_size, D=D),
                 **cache_format(q.dtype, k_flat, v_flat).spec_fields())
    ins = dict(q=q, k_cache=k_flat, v_cache=v_flat, block_ids=block_ids, page_table=page_table, seq_lens=seq_lens,
               cu_q=cu_seqlens_q, geometry=geometry, scale=_scale_tensor(scale, q), v_scale=_scale_tensor(v_scale, q))
    _run("paged_sparse", spec, _device_key(q), _inputs("paged_sparse", spec, ins), [out, lse])
    return out, lse


@_paged_sparse_op.register_fake
def _(q, k_flat, v_flat, block_ids, page_table, seq_lens, cu_seqlens_q, geometry, block_size, scale, v_scale,
      q_budget):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def paged_sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    block_size: int = 128,
    scale: Optional[float] = None,
    q_budget: int = 64,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_attention over paged K / V caches (conventions of
    paged_msa_attention; e4m3 with k_scale / v_scale):
    block_ids [Hkv, T, topk] int32, logical, in [-1, the query's own block].
    Returns out [T, Hq, D], lse [T, Hq] fp32."""
    _check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, block_ids=block_ids)
    num_pages, Hkv, D, _, B, max_pages = _paged_checks(q, k_cache, v_cache, None, page_table, seq_lens, cu_seqlens_q,
                                                       block_size)
    if block_ids.dtype != torch.int32:
        raise ValueError(f"block_ids must be int32, got {block_ids.dtype}")
    V.check_block_ids_shape(tuple(block_ids.shape), Hkv, q.shape[0])
    if q.shape[2] != D:
        raise ValueError(f"q must be [T, Hq, D={D}] for these caches, got {tuple(q.shape)}")
    V.check_heads(q.shape[1], Hkv, "q")
    _dtype_name("q", q)
    fmt = cache_format(q.dtype, k_cache, v_cache, k_scale=k_scale, v_scale=v_scale)
    V.Config(block_ids.shape[2], block_size, q_budget=q_budget).check()
    V.check_scale("scale", scale)
    if not _value_checks_off(block_ids) and q.shape[0]:
        from .reference import _positions

        cu_q = cu_seqlens_q.cpu().numpy().astype(np.int64)
        cu_k = np.concatenate([[0], np.cumsum(seq_lens.cpu().numpy().astype(np.int64))])
        V.check_block_ids_values(block_ids.cpu().numpy(), _positions(cu_q, cu_k)[1] // block_size)
    sc = (1.0 / math.sqrt(D) if scale is None else float(scale)) * fmt.k_scale
    return torch.ops.msa.paged_sparse_attention(q, _flat_storage("k_cache", k_cache), _flat_storage("v_cache", v_cache),
                                                block_ids, page_table, seq_lens, cu_seqlens_q,
                                                _geometry(k_cache, None, max_pages), block_size, sc, fmt.v_scale,
                                                q_budget)


def paged_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_idx_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_idx: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_new: torch.Tensor,
    *,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    k_idx_scale: Optional[float] = None,
) -> None:
    """Writes new tokens into their pages, in place (engines'
    reshape_and_cache): k, v [N, Hkv, D] and k_idx [N, Di], sequence b's
    tokens cu_seqlens_new[b] .. cu_seqlens_new[b+1] - 1 being its keys
    seq_lens[b] - n_b .. seq_lens[b] - 1 (seq_lens counts them). An e4m3
    cache stores x / scale rounded to nearest, saturated at +-448 (its
    scale: k_scale, v_scale, k_idx_scale). Device-side indexing only: no
    host sync, so it can run inside a captured CUDA graph."""
    _check_tensors(k_cache=k_cache, v_cache=v_cache, k_idx_cache=k_idx_cache, k=k, v=v, k_idx=k_idx)
    block_size = k_cache.shape[1]
    num_pages, Hkv, D, Di, B, max_pages = _paged_checks(k, k_cache, v_cache, k_idx_cache, page_table, seq_lens,
                                                        cu_seqlens_new, block_size)
    N = k.shape[0]
    if tuple(k.shape) != (N, Hkv, D) or tuple(v.shape) != (N, Hkv, D) or tuple(k_idx.shape) != (N, Di):
        raise ValueError(f"k, v must be [N, Hkv={Hkv}, D={D}] and k_idx [N, Di={Di}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(k_idx.shape)}")
    scales = [_cache_scale(n, sc, c.dtype == FP8) for n, sc, c in
              (("k_scale", k_scale, k_cache), ("v_scale", v_scale, v_cache), ("k_idx_scale", k_idx_scale, k_idx_cache))]
    if N == 0:
        return
    counts = (cu_seqlens_new[1:] - cu_seqlens_new[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(B, device=k.device), counts, output_size=N)
    pos = seq_lens.long()[seq] - (cu_seqlens_new[1:].long()[seq] - torch.arange(N, device=k.device))
    page = page_table.long()[seq, pos // block_size]
    row = pos % block_size
    for cache, x, sc in zip((k_cache, v_cache, k_idx_cache), (k, v, k_idx), scales):
        cache[page, row] = quantize_cache(x, cache.dtype, sc)


def quantize_cache(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x as a cache of `dtype` stores it: e4m3 holds x / scale rounded to
    nearest and saturated at +-448 (e4m3 has no infinity); other dtypes x."""
    if dtype != FP8:
        return x.to(dtype)
    return to_e4m3(x, scale)
