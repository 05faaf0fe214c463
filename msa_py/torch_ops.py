"""PyTorch front door: the MSA ops as torch custom ops (namespace `msa`).

    import msa_py
    out, lse = msa_py.msa_attention(q, k, v, q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, topk=16)

Same names, arguments and defaults as `msa_py.reference`. CPU and CUDA
tensors; bfloat16, float16 and float32 (and e4m3 index inputs for the
FP8 indexer, `quantize_index`). Every op is a `torch.library`
custom op (`torch.ops.msa.msa_attention`, ...) with a fake implementation, so
`torch.compile(fullgraph=True)` traces through it. The first call of a static
configuration (dtype, heads, head dims, topk, block_size, ...) compiles one
MAX model; every later call with other sequence lengths or batch layouts
reuses it (token counts are symbolic in the graph).

Outputs of msa_attention, sparse_attention, select_blocks and combine are
allocated by torch on the inputs' device and written in place by MAX; invert
and block_attention return MAX-allocated device buffers shared with torch
through DLPack. No host copies on the GPU path.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import numpy as np
import torch

from . import _validate as V
from . import engine as E

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_STRIDED = ("k_cache", "v_cache", "k_idx_cache")  # paged caches: any strides, the last dimension contiguous


# --------------------------------------------------------------------------- helpers
def _dtype_name(name: str, x: torch.Tensor) -> str:
    n = _DTYPES.get(x.dtype)
    if n is None:
        raise ValueError(f"{name} must have a floating dtype in {V.FLOAT_DTYPES}, got {x.dtype}")
    return n


def _device_key(x: torch.Tensor) -> str:
    if x.device.type == "cpu":
        return "cpu"
    if x.device.type == "cuda":
        return f"gpu:{x.device.index or 0}"
    raise ValueError(f"tensors must be on CPU or CUDA, got {x.device}")


def _check_tensors(differentiable: tuple = (), **tensors) -> str:
    """One device for all; contiguous (but the paged caches, any strides);
    autograd only through the tensors named in `differentiable` (q, k, v of
    msa_attention and sparse_attention)."""
    dev = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.requires_grad and torch.is_grad_enabled() and name not in differentiable:
            raise ValueError(
                f"{name} requires grad, but this op has no gradient for it"
                + (" (the selection is a constant: train the indexer with index_block_scores and block_mass)"
                   if name in ("q_idx", "k_idx", "block_ids") else "")
                + ": call under torch.no_grad() or pass a detached tensor"
            )
        if not t.is_contiguous() and name not in _STRIDED:
            raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {first} is on {dev}: all inputs must share a device")
    return _device_key(tensors[first])


def _check_cu(name: str, cu: Optional[torch.Tensor]) -> None:
    if cu is not None and cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}")


def _value_checks_off(x: torch.Tensor) -> bool:
    """Value checks need the numbers on the host (a device sync): off with
    MSA_SKIP_VALUE_CHECKS and while a CUDA graph is being captured (the
    shapes were checked already)."""
    return bool(os.environ.get("MSA_SKIP_VALUE_CHECKS")) or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_cu_values(cu_q, cu_k, T: int, S: int):
    """V.check_cu_seqlens_values; returns the two prefix sums on the host (None
    without cu_seqlens or with the checks off) for the checks that follow."""
    if cu_q is None or _value_checks_off(cu_q):
        return None
    cu = (cu_q.cpu().numpy(), cu_k.cpu().numpy())
    V.check_cu_seqlens_values(*cu, T, S)
    return cu


def _check_block_ids_values(block_ids: torch.Tensor, cu, T: int, S: int, block_size: int) -> None:
    """V.check_block_ids_values on the device, one sync; cu: _check_cu_values'
    host prefix sums (None: one sequence). The numbers come to the host only
    to name a bad id."""
    if T == 0 or _value_checks_off(block_ids):
        return
    from .reference import _positions

    cu_q, cu_k = cu if cu is not None else (np.array([0, T]), np.array([0, S]))
    own_block = _positions(cu_q.astype(np.int64), cu_k.astype(np.int64))[1] // block_size
    jq = torch.from_numpy(own_block).to(device=block_ids.device, dtype=torch.int32)
    if bool((block_ids < -1).any() | (block_ids > jq[None, :, None]).any()):
        V.check_block_ids_values(block_ids.cpu().numpy(), own_block)


def _spec(dtype: str, Hq: int, Hkv: int, D: int, Di: int, **kw) -> E.Spec:
    return E.Spec(dtype=dtype, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, idx_dim=Di, **kw)


_consts: dict = {}


def _scale_tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    """[1] float32 on the device, cached (no host-to-device copy per call)."""
    key = ("scale", float(value), like.device)
    t = _consts.get(key)
    if t is None:
        t = torch.tensor([value], dtype=torch.float32, device=like.device)
        _consts[key] = t
    return t


def _default_cu(T: int, S: int, like: torch.Tensor):
    key = ("cu", T, S, like.device)
    t = _consts.get(key)
    if t is None:
        if T > S:
            raise ValueError(f"q has more tokens (T={T}) than k (S={S}) without cu_seqlens")
        t = (torch.tensor([0, T], dtype=torch.int32, device=like.device),
             torch.tensor([0, S], dtype=torch.int32, device=like.device))
        if len(_consts) > 4096:
            _consts.clear()
        _consts[key] = t
    return t


_streams: dict = {}


def _max_stream(device: torch.device):
    """MAX's queue on this GPU as a torch ExternalStream (MAX launches there)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    st = _streams.get(idx)
    if st is None:
        from max.driver import Accelerator

        acc = Accelerator(idx)
        st = (acc, torch.cuda.ExternalStream(acc.default_queue.native_stream_handle, device=torch.device("cuda", idx)))
        _streams[idx] = st
    return st


def _buf(t: torch.Tensor):
    """A MAX Buffer viewing a torch tensor (no copy)."""
    from max.driver import Buffer

    t = t.detach()  # no autograd here (checked up front); dlpack refuses grad tensors
    if t.is_cuda:
        acc, ext = _max_stream(t.device)
        # ordering with torch's stream is done once per call in _run (stream=-1: no sync here)
        return Buffer._from_dlpack(t.__dlpack__(stream=-1), acc, ext.cuda_stream)
    return Buffer.from_dlpack(t)


def _run(kind: str, spec: E.Spec, device: str, inputs: dict, outputs=None):
    """Runs a graph kind on torch tensors. On CUDA, MAX's queue first waits for
    torch's current stream and torch's stream then waits for MAX's queue, so
    the call is ordered like any torch op (and joins a CUDA-graph capture)."""
    cuda = device != "cpu"
    if cuda:
        first = next(iter(inputs.values()))
        _, ext = _max_stream(first.device)
        cur = torch.cuda.current_stream(first.device)
        ext.wait_stream(cur)
    ins = {n: _buf(t) for n, t in inputs.items()}
    outs = None if outputs is None else [_buf(o) for o in outputs]
    res = E.run(kind, spec, device, ins, outputs=outs)
    if cuda:
        cur.wait_stream(ext)
    if outputs is None:
        return [torch.from_dlpack(r) for r in res]
    return outputs


def _wants_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _num_seqs(cu_q) -> int:
    return 1 if cu_q is None else cu_q.shape[0] - 1


def _decode(T: int, cu_q, x: torch.Tensor, block_size: int, *, D: int | None = None, Di: int | None = None,
            topk: int = 16) -> bool:
    """Decode kernels when the batch has at most DECODE_MAX_Q queries per
    sequence on average and, on CUDA, the stages' shapes fit their tensor
    cores (shapes only: no device sync, capture-safe)."""
    from .graph import decode_fits, decode_operands_fit

    B, sixteen = _num_seqs(cu_q), x.dtype in (torch.bfloat16, torch.float16)
    dims = [("select", Di), ("attention", D)]
    return all(decode_fits(T, B, decode_operands_fit(sixteen, x.dtype == FP8, st, d), x.is_cuda, stage=st, dim=d,
                           block_size=block_size, topk=topk)
               for st, d in dims if d is not None)


# --------------------------------------------------------------------------- e4m3
def to_e4m3(x: torch.Tensor, scale) -> torch.Tensor:
    """x / scale rounded to nearest e4m3 and saturated at +-448 (e4m3 has no
    infinity); scale a float or a tensor broadcasting against x."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_index(q_idx: torch.Tensor, k_idx: torch.Tensor):
    """The FP8 indexer's inputs: (q_idx_e4m3, k_idx_e4m3, q_scale, k_scale).

    q_idx [T, Hkv, Di] gets one scale per (token, group) row, q_scale
    [T, Hkv, 1]; k_idx [S, Di] one per tensor, k_scale [1] (fp32, each the
    amax / 448, computed on the device: no sync). q_idx ~ q_idx_e4m3 *
    q_scale and k_idx ~ k_idx_e4m3 * k_scale. A positive scale per query row,
    or one for all keys, does not change a row's ranking of blocks, so the
    selection from the e4m3 values is the reference's on the dequantized
    ones, and the kernels never need the scales. Inputs should be finite
    (NaN counts as 0 in the amax)."""
    q8, qs = quantize_rows(q_idx)
    ks = k_idx.abs().amax().reshape(1).float().nan_to_num(0.0).clamp_min(1e-30) / E4M3_MAX
    return q8, to_e4m3(k_idx, ks), qs, ks


def quantize_rows(x: torch.Tensor):
    """x [..., W] as e4m3 with one scale per row (amax / 448, [..., 1] fp32):
    (x_e4m3, scale). The FP8 indexer's query rows."""
    s = x.abs().amax(-1, keepdim=True).float().nan_to_num(0.0).clamp_min(1e-30) / E4M3_MAX
    return to_e4m3(x, s), s


def _index_format(q_idx: torch.Tensor, k_idx: torch.Tensor, index_dtype, q: Optional[torch.Tensor] = None):
    """(q_idx, k_idx, fp8): e4m3 index inputs pass as they are; index_dtype
    torch.float8_e4m3fn quantizes 16-/32-bit ones (quantize_index); else
    the inputs' dtype must be q's. Checks the FP8 indexer's shape limit on
    CUDA (Di a multiple of 128) before any kernel."""
    check_index_dtype(index_dtype)
    fp8 = (q_idx.dtype == FP8, k_idx.dtype == FP8)
    if fp8[0] != fp8[1]:
        raise ValueError(f"q_idx and k_idx must both be torch.float8_e4m3fn or neither, got {q_idx.dtype} and "
                         f"{k_idx.dtype}")
    if not fp8[0] and index_dtype is None:
        return q_idx, k_idx, False
    check_fp8_index_dim(q_idx)
    if not fp8[0]:
        if q is not None:
            V.check_same_dtype([("q", _dtype_name("q", q)), ("q_idx", _dtype_name("q_idx", q_idx)),
                                ("k_idx", _dtype_name("k_idx", k_idx))])
        q_idx, k_idx = quantize_index(q_idx, k_idx)[:2]
    return q_idx, k_idx, True


def check_index_dtype(index_dtype) -> None:
    if index_dtype not in (None, FP8):
        raise ValueError(f"index_dtype must be None or torch.float8_e4m3fn, got {index_dtype}")


def check_fp8_index_dim(q_idx: torch.Tensor) -> None:
    """The FP8 indexer's CUDA kernel reads 128-byte rows (wgmma on SW128 panels)."""
    if q_idx.is_cuda and q_idx.shape[-1] % 128 != 0:
        raise ValueError(f"the FP8 indexer on CUDA needs Di a multiple of 128 (wgmma on 128-byte rows), got "
                         f"Di={q_idx.shape[-1]}")


def _idx_bytes(x: torch.Tensor) -> torch.Tensor:
    """e4m3 index inputs as the uint8 the graphs take."""
    return x.view(torch.uint8) if x.dtype == FP8 else x


# --------------------------------------------------------------------------- select_blocks
@torch.library.custom_op("msa::select_blocks", mutates_args=())
def _select_op(
    q_idx: torch.Tensor, k_idx: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor], topk: int, block_size: int, init_blocks: int,
    local_blocks: int, idx_scale: float,
) -> torch.Tensor:
    T, S, Hkv, Di = q_idx.shape[0], k_idx.shape[0], q_idx.shape[1], q_idx.shape[2]
    _check_cu_values(cu_seqlens_q, cu_seqlens_k, T, S)
    if cu_seqlens_q is None:
        cu_seqlens_q, cu_seqlens_k = _default_cu(T, S, q_idx)
    out = torch.empty((Hkv, T, topk), dtype=torch.int32, device=q_idx.device)
    if T == 0:
        return out
    fp8 = q_idx.dtype == FP8
    spec = _spec("bfloat16" if fp8 else _DTYPES[q_idx.dtype], Hkv, Hkv, 16, Di, topk=topk, block_size=block_size,
                 init_blocks=init_blocks, local_blocks=local_blocks, idx_dtype="float8_e4m3fn" if fp8 else "",
                 decode=_decode(T, cu_seqlens_q, q_idx, block_size, Di=Di, topk=topk))
    _run("select", spec, _device_key(q_idx),
         dict(q_idx=_idx_bytes(q_idx), k_idx=_idx_bytes(k_idx), cu_q=cu_seqlens_q, cu_k=cu_seqlens_k,
              idx_scale=_scale_tensor(idx_scale, q_idx)), [out])
    return out


@_select_op.register_fake
def _(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, topk, block_size, init_blocks, local_blocks, idx_scale):
    return q_idx.new_empty((q_idx.shape[1], q_idx.shape[0], topk), dtype=torch.int32)


def select_blocks(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    idx_scale: Optional[float] = None,
    index_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Steps 1-3: block_ids [Hkv, T, topk] int32, ascending, -1 padded.

    q_idx [T, Hkv, Di], k_idx [S, Di]; cu_seqlens [B+1] int32 (None: one
    sequence whose queries are the last T of its S keys).

    The FP8 indexer: q_idx and k_idx as torch.float8_e4m3fn (scales not
    needed: see quantize_index), or index_dtype=torch.float8_e4m3fn to
    quantize 16-/32-bit ones first. e4m3 products summed in fp32 (Hopper
    wgmma at twice the bf16 rate; Di a multiple of 128 on CUDA).
    """
    _check_tensors(q_idx=q_idx, k_idx=k_idx, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    T, S, Hkv, Di = V.index_dims(tuple(q_idx.shape), tuple(k_idx.shape))
    q_idx, k_idx, fp8 = _index_format(q_idx, k_idx, index_dtype)
    if not fp8:
        V.check_same_dtype([("q_idx", _dtype_name("q_idx", q_idx)), ("k_idx", _dtype_name("k_idx", k_idx))])
    V.Config(topk, block_size, init_blocks, local_blocks).check()
    V.check_cu_seqlens_shapes(None if cu_seqlens_q is None else tuple(cu_seqlens_q.shape),
                              None if cu_seqlens_k is None else tuple(cu_seqlens_k.shape))
    _check_cu("cu_seqlens_q", cu_seqlens_q)
    _check_cu("cu_seqlens_k", cu_seqlens_k)
    V.check_int32_range(T, S, topk, Hkv, Hkv)
    V.check_scale("idx_scale", idx_scale)
    sc = 1.0 / math.sqrt(Di) if idx_scale is None else float(idx_scale)
    return torch.ops.msa.select_blocks(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, topk, block_size,
                                       init_blocks, local_blocks, sc)


# --------------------------------------------------------------------------- sparse / msa attention
def _attention_checks(q, k, v, cu_q, cu_k):
    T, S, Hq, Hkv, D = V.attention_dims(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    dn = _dtype_name("q", q)
    V.check_same_dtype([("q", dn), ("k", _dtype_name("k", k)), ("v", _dtype_name("v", v))])
    V.check_cu_seqlens_shapes(None if cu_q is None else tuple(cu_q.shape), None if cu_k is None else tuple(cu_k.shape))
    _check_cu("cu_seqlens_q", cu_q)
    _check_cu("cu_seqlens_k", cu_k)
    return T, S, Hq, Hkv, D, dn


@torch.library.custom_op("msa::sparse_attention", mutates_args=())
def _sparse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    block_size: int, scale: float, q_budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, Hq, D = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    cu = _check_cu_values(cu_seqlens_q, cu_seqlens_k, T, S)
    _check_block_ids_values(block_ids, cu, T, S, block_size)
    if cu_seqlens_q is None:
        cu_seqlens_q, cu_seqlens_k = _default_cu(T, S, q)
    out = torch.empty_like(q)
    lse = torch.empty((T, Hq), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    spec = _spec(_DTYPES[q.dtype], Hq, Hkv, D, 16, topk=block_ids.shape[2], block_size=block_size, q_budget=q_budget,
                 decode=_decode(T, cu_seqlens_q, q, block_size, D=D))
    _run("sparse", spec, _device_key(q),
         dict(q=q, k=k, v=v, block_ids=block_ids, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k,
              scale=_scale_tensor(scale, q)), [out, lse])
    return out, lse


@_sparse_op.register_fake
def _(q, k, v, block_ids, cu_seqlens_q, cu_seqlens_k, block_size, scale, q_budget):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def _setup_sparse(ctx, inputs, output):
    q, k, v, block_ids, cu_q, cu_k, block_size, scale, q_budget = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, block_ids, out, lse, cu_q, cu_k)
    ctx.block_size, ctx.scale, ctx.q_budget, ctx.n_inputs = block_size, scale, q_budget, len(inputs)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    block_size: int = 128,
    scale: Optional[float] = None,
    q_budget: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over selected blocks: out [T, Hq, D] (q's dtype), lse [T, Hq] fp32.

    q [T, Hq, D], k/v [S, Hkv, D], block_ids [Hkv, T, topk] int32 (from
    select_blocks or your own selector: ids in [-1, the query's own block],
    -1 for an unused slot, any slot order; a block in two slots counts twice).
    """
    _check_tensors(("q", "k", "v"), q=q, k=k, v=v, block_ids=block_ids, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k)
    T, S, Hq, Hkv, D, _ = _attention_checks(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if block_ids.dtype != torch.int32:
        raise ValueError(f"block_ids must be int32, got {block_ids.dtype}")
    V.check_block_ids_shape(tuple(block_ids.shape), Hkv, T)
    V.Config(block_ids.shape[2], block_size, q_budget=q_budget).check()
    V.check_int32_range(T, S, block_ids.shape[2], Hq, Hkv)
    if _wants_grad(q, k, v):
        _check_backward_fits(q, D, block_size)
    V.check_scale("scale", scale)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return torch.ops.msa.sparse_attention(q, k, v, block_ids, cu_seqlens_q, cu_seqlens_k, block_size, sc, q_budget)


def _msa_outputs(q: torch.Tensor, Hkv: int, topk: int):
    """msa_attention's outputs: out like q, lse [T, Hq] fp32, block_ids [Hkv, T, topk] int32."""
    T, Hq = q.shape[0], q.shape[1]
    return (torch.empty_like(q), torch.empty((T, Hq), dtype=torch.float32, device=q.device),
            torch.empty((Hkv, T, topk), dtype=torch.int32, device=q.device))


def _msa_spec(q, q_idx, Hkv, cu_seqlens_q, topk, block_size, init_blocks, local_blocks, q_budget,
              decode_ok: bool = True, **fields) -> E.Spec:
    """The compiled-model key of the fused pipeline (contiguous or paged; fields: the paged caches' dtypes).
    decode_ok=False keeps a decode-sized call on the prefill kernels (a piece of a split prefill call)."""
    T, Hq, D = q.shape
    Di = q_idx.shape[2]
    if q_idx.dtype == FP8:
        fields = dict(fields, idx_dtype="float8_e4m3fn")
    return _spec(_DTYPES[q.dtype], Hq, Hkv, D, Di, topk=topk, block_size=block_size, init_blocks=init_blocks,
                 local_blocks=local_blocks, q_budget=q_budget,
                 decode=decode_ok and _decode(T, cu_seqlens_q, q, block_size, D=D, Di=Di, topk=topk), **fields)


@torch.library.custom_op("msa::msa_attention", mutates_args=())
def _msa_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], topk: int,
    block_size: int, init_blocks: int, local_blocks: int, scale: float, idx_scale: float, q_budget: int,
    decode_ok: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, Hq, D = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    _check_cu_values(cu_seqlens_q, cu_seqlens_k, T, S)
    if cu_seqlens_q is None:
        cu_seqlens_q, cu_seqlens_k = _default_cu(T, S, q)
    out, lse, block_ids = _msa_outputs(q, Hkv, topk)
    if T == 0:
        return out, lse, block_ids
    spec = _msa_spec(q, q_idx, Hkv, cu_seqlens_q, topk, block_size, init_blocks, local_blocks, q_budget, decode_ok)
    _run("msa", spec, _device_key(q),
         dict(q=q, k=k, v=v, q_idx=_idx_bytes(q_idx), k_idx=_idx_bytes(k_idx), cu_q=cu_seqlens_q, cu_k=cu_seqlens_k,
              scale=_scale_tensor(scale, q), idx_scale=_scale_tensor(idx_scale, q)), [out, lse, block_ids])
    return out, lse, block_ids


@_msa_op.register_fake
def _(q, k, v, q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, topk, block_size, init_blocks, local_blocks,
      scale, idx_scale, q_budget, decode_ok=True):
    return (torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32),
            q.new_empty((k.shape[1], q.shape[0], topk), dtype=torch.int32))


# --------------------------------------------------------------------------- backward
@torch.library.custom_op("msa::sparse_attention_backward", mutates_args=())
def _backward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor], block_size: int, scale: float, q_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, Hq, D = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    if cu_seqlens_q is None:
        cu_seqlens_q, cu_seqlens_k = _default_cu(T, S, q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if T == 0:
        return dq, dk.zero_(), dv.zero_()
    spec = _spec(_DTYPES[q.dtype], Hq, Hkv, D, 16, topk=block_ids.shape[2], block_size=block_size, q_budget=q_budget)
    _run("sparse_backward", spec, _device_key(q),
         dict(q=q, k=k, v=v, block_ids=block_ids, out=out, lse=lse, dout=dout, dlse=dlse, cu_q=cu_seqlens_q,
              cu_k=cu_seqlens_k, scale=_scale_tensor(scale, q)), [dq, dk, dv])
    return dq, dk, dv


@_backward_op.register_fake
def _(q, k, v, block_ids, out, lse, dout, dlse, cu_seqlens_q, cu_seqlens_k, block_size, scale, q_budget):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def sparse_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    dlse: Optional[torch.Tensor] = None,
    block_size: int = 128,
    scale: Optional[float] = None,
    q_budget: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sparse_attention / msa_attention for a fixed selection
    (what autograd calls; public for frameworks that run their own
    backward): out [T, Hq, D] and lse [T, Hq] fp32 from the forward, dout
    (q's dtype) and dlse (fp32, None: 0) the gradients reaching them.
    Returns dq [T, Hq, D], dk, dv [S, Hkv, D] in q's dtype. On CUDA: 16-bit
    inputs, D and block_size multiples of 16 up to 128."""
    _check_tensors(q=q, k=k, v=v, block_ids=block_ids, out=out, lse=lse, dout=dout, dlse=dlse,
                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    T, S, Hq, Hkv, D, dn = _attention_checks(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if block_ids.dtype != torch.int32:
        raise ValueError(f"block_ids must be int32, got {block_ids.dtype}")
    V.check_block_ids_shape(tuple(block_ids.shape), Hkv, T)
    for name, x in (("out", out), ("dout", dout)):
        if x.dtype != q.dtype or tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's dtype {q.dtype} and shape {tuple(q.shape)}, got {x.dtype} "
                             f"{tuple(x.shape)}")
    for name, x in (("lse", lse), ("dlse", dlse)):
        if x is not None and (x.dtype != torch.float32 or tuple(x.shape) != (T, Hq)):
            raise ValueError(f"{name} must be float32 of shape {(T, Hq)}, got {x.dtype} {tuple(x.shape)}")
    V.Config(block_ids.shape[2], block_size, q_budget=q_budget).check()
    _check_backward_fits(q, D, block_size)
    V.check_scale("scale", scale)
    cu = _check_cu_values(cu_seqlens_q, cu_seqlens_k, T, S)
    _check_block_ids_values(block_ids, cu, T, S, block_size)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    return torch.ops.msa.sparse_attention_backward(q, k, v, block_ids, out, lse, dout, dlse, cu_seqlens_q,
                                                   cu_seqlens_k, block_size, sc, q_budget)


def _check_backward_fits(q: torch.Tensor, D: int, block_size: int) -> None:
    from .graph import backward_gpu_fits

    if q.is_cuda and not backward_gpu_fits(q.dtype in (torch.bfloat16, torch.float16), D, block_size):
        raise ValueError(f"the CUDA backward needs bfloat16 or float16 inputs with D and block_size multiples of 16 "
                         f"up to 128; got {q.dtype}, D={D}, block_size={block_size}")


def _attention_backward(ctx, dout, dlse, *_):
    """Autograd of msa_attention and sparse_attention: dq, dk, dv from the
    saved forward (its out, lse and selection); no gradient for the rest."""
    q, k, v, block_ids, out, lse, cu_q, cu_k = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dlse = torch.zeros_like(lse) if dlse is None else dlse.contiguous()
    dq, dk, dv = torch.ops.msa.sparse_attention_backward(q, k, v, block_ids, out, lse, dout, dlse, cu_q, cu_k,
                                                         ctx.block_size, ctx.scale, ctx.q_budget)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


def _setup_msa(ctx, inputs, output):
    q, k, v, _, _, cu_q, cu_k, _, block_size, _, _, scale, _, q_budget = inputs[:14]
    out, lse, block_ids = output
    ctx.save_for_backward(q, k, v, block_ids, out, lse, cu_q, cu_k)
    ctx.block_size, ctx.scale, ctx.q_budget, ctx.n_inputs = block_size, scale, q_budget, len(inputs)


_msa_op.register_autograd(_attention_backward, setup_context=_setup_msa)
_sparse_op.register_autograd(_attention_backward, setup_context=_setup_sparse)


def msa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: Optional[float] = None,
    idx_scale: Optional[float] = None,
    q_budget: int = 64,
    max_workspace_bytes: Optional[int] = None,
    index_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSA: select blocks with the indexer, then attend over them.

    q [T, Hq, D], k/v [S, Hkv, D], q_idx [T, Hkv, Di], k_idx [S, Di], one dtype
    (bf16, fp16 or fp32); cu_seqlens_q/k [B+1] int32 prefix sums (None: one
    sequence whose queries are the last T of its S keys). Returns
    out [T, Hq, D] (q's dtype) and lse [T, Hq] (fp32, natural log).

    The FP8 indexer: index_dtype=torch.float8_e4m3fn quantizes q_idx (a
    scale per (token, group) row) and k_idx (one scale) to e4m3 and selects
    on FP8 tensor cores; or pass q_idx and k_idx already as e4m3
    (quantize_index). The selection is the reference's on the dequantized
    index inputs (ties the rounding creates aside).

    Any length that fits the inputs: the partials and the work list take
    `workspace_bytes_per_query` bytes a query (262 KB at Hq 64, D 128, topk
    16, bf16), so a call whose queries need more than max_workspace_bytes
    (None: on CUDA 40% of the free device memory, at most 8 GiB; on the CPU
    40% of the RAM) runs in
    pieces of whole sequences, and a sequence too long for one piece in
    slices of its queries over their key prefix (_validate.split_queries):
    the same answer as one call. With cu_seqlens, splitting reads them on
    the host (a device sync).
    """
    _check_tensors(("q", "k", "v"), q=q, k=k, v=v, q_idx=q_idx, k_idx=k_idx, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k)
    T, S, Hq, Hkv, D, dn = _attention_checks(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if _wants_grad(q, k, v):
        _check_backward_fits(q, D, block_size)
    Ti, Si, Hkv_i, Di = V.index_dims(tuple(q_idx.shape), tuple(k_idx.shape))
    if (Ti, Si, Hkv_i) != (T, S, Hkv):
        raise ValueError(f"q_idx/k_idx must have T={T}, S={S}, Hkv={Hkv} like q/k, got q_idx "
                         f"{tuple(q_idx.shape)}, k_idx {tuple(k_idx.shape)}")
    q_idx, k_idx, fp8 = _index_format(q_idx, k_idx, index_dtype, q)
    if not fp8:
        V.check_same_dtype([("q", dn), ("q_idx", _dtype_name("q_idx", q_idx)),
                            ("k_idx", _dtype_name("k_idx", k_idx))])
    V.Config(topk, block_size, init_blocks, local_blocks, q_budget).check()
    V.check_int32_range(T, S, topk, Hq, Hkv)
    V.check_scale("scale", scale)
    V.check_scale("idx_scale", idx_scale)
    V.check_workspace(max_workspace_bytes)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    isc = 1.0 / math.sqrt(Di) if idx_scale is None else float(idx_scale)

    def call(q, q_idx, k, v, k_idx, cu_q, cu_k, decode_ok=True):
        out, lse, _ = torch.ops.msa.msa_attention(q, k, v, q_idx, k_idx, cu_q, cu_k, topk, block_size, init_blocks,
                                                  local_blocks, sc, isc, q_budget, decode_ok)
        return out, lse

    per_query = V.workspace_bytes_per_query(Hq, Hkv, D, topk, q.element_size(), S, block_size, q_budget)
    max_queries = max(1, _workspace_budget(q, max_workspace_bytes) // per_query)
    if T <= max_queries or _decode(T, cu_seqlens_q, q, block_size, D=D, Di=Di, topk=topk):
        return call(q, q_idx, k, v, k_idx, cu_seqlens_q, cu_seqlens_k)
    # pieces stay on the prefill kernels, even one-query pieces: the one-call answer, bit for bit
    return _in_pieces(functools.partial(call, decode_ok=False), max_queries, (q, q_idx), (k, v, k_idx),
                      cu_seqlens_q, cu_seqlens_k, T, S)


_RAM_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The default device budget: MAX keeps its memory pool at its peak size, so
# after one call the workspace it holds no longer shows as free memory; a
# budget recomputed from the free memory alone shrank call after call (98
# pieces of 2.7K queries at 256K on an H100, 1.8x slower than 3 pieces).
# The budget granted before stays usable (it sits in MAX's pool); the cap
# keeps pieces large enough to fill the card (>= 30K queries at the model
# shape) and the pool small beside the inputs.
WORKSPACE_CAP_BYTES = 8 << 30
_granted: dict = {}


def _workspace_budget(x: torch.Tensor, max_workspace_bytes: Optional[int]) -> int:
    """max_workspace_bytes, or on CUDA min(40% of the free device memory, or
    what an earlier call was granted (MAX's pool holds it), 8 GiB); on the
    CPU 40% of the RAM. Under torch.compile's tracing the free memory is not
    known: one call unless a budget is given."""
    if max_workspace_bytes is not None:
        return int(max_workspace_bytes)
    if torch.compiler.is_compiling():
        return 1 << 62
    if x.is_cuda:
        free = int(0.4 * torch.cuda.mem_get_info(x.device)[0])
        budget = min(max(free, _granted.get(x.device, 0)), WORKSPACE_CAP_BYTES)
        _granted[x.device] = budget
        return budget
    return int(0.4 * _RAM_BYTES)


def _in_pieces(call, max_queries: int, per_query: tuple, per_key: tuple, cu_q, cu_k, T: int, S: int):
    """call(*per_query, *per_key, cu_q, cu_k) -> (out, lse) over the pieces of
    _validate.split_queries, written into one out / lse."""
    if cu_q is None:
        tq, tk, oq, ok_ = np.array([T]), np.array([S]), np.array([0, T]), np.array([0, S])
    else:
        oq, ok_ = cu_q.cpu().numpy().astype(np.int64), cu_k.cpu().numpy().astype(np.int64)
        V.check_cu_seqlens_values(oq, ok_, T, S)
        tq, tk = np.diff(oq), np.diff(ok_)
    out = lse = None
    for b0, b1, sl in V.split_queries(tq, tk, max_queries):
        if sl is None:  # whole sequences b0 .. b1 - 1, their prefix sums rebased
            r0, r1, k0, k1 = int(oq[b0]), int(oq[b1]), int(ok_[b0]), int(ok_[b1])
            cq = (cu_q[b0:b1 + 1] - cu_q[b0]).contiguous() if cu_q is not None else None
            ck = (cu_k[b0:b1 + 1] - cu_k[b0]).contiguous() if cu_k is not None else None
        else:  # queries i0 .. i1 - 1 of sequence b0 over its keys up to the last one's
            r0, r1 = int(oq[b0]) + sl[0], int(oq[b0]) + sl[1]
            k0, k1 = int(ok_[b0]), int(ok_[b0]) + int(tk[b0] - tq[b0]) + sl[1]
            cq = ck = None
        o, l = call(*(x[r0:r1] for x in per_query), *(x[k0:k1] for x in per_key), cq, ck)
        if out is None:
            out = o.new_empty((T,) + tuple(o.shape[1:]))
            lse = l.new_empty((T,) + tuple(l.shape[1:]))
        out[r0:r1] = o
        lse[r0:r1] = l
    return out, lse


# --------------------------------------------------------------------------- stage ops
@torch.library.custom_op("msa::combine", mutates_args=())
def _combine_op(o_partial: torch.Tensor, lse_partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, Hq, K, D = o_partial.shape
    out = o_partial.new_empty((T, Hq, D))
    lse = o_partial.new_empty((T, Hq), dtype=torch.float32)
    if T == 0:
        return out, lse
    spec = _spec(_DTYPES[o_partial.dtype], Hq, 1, D, 16, topk=K)
    _run("combine", spec, _device_key(o_partial), dict(o_partial=o_partial, lse_partial=lse_partial), [out, lse])
    return out, lse


@_combine_op.register_fake
def _(o_partial, lse_partial):
    T, Hq, K, D = o_partial.shape
    return o_partial.new_empty((T, Hq, D)), o_partial.new_empty((T, Hq), dtype=torch.float32)


def combine(o_partial: torch.Tensor, lse_partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6: merge partials [T, Hq, topk, D] / [T, Hq, topk] by LSE into out [T, Hq, D], lse [T, Hq]."""
    _check_tensors(o_partial=o_partial, lse_partial=lse_partial)
    V.check_rank("o_partial", tuple(o_partial.shape), 4, "[T, Hq, topk, D]")
    V.check_rank("lse_partial", tuple(lse_partial.shape), 3, "[T, Hq, topk]")
    _dtype_name("o_partial", o_partial)
    if lse_partial.dtype != torch.float32:
        raise ValueError(f"lse_partial must be float32, got {lse_partial.dtype}")
    if tuple(lse_partial.shape) != tuple(o_partial.shape[:3]):
        raise ValueError(f"lse_partial must have shape {tuple(o_partial.shape[:3])}, got {tuple(lse_partial.shape)}")
    return torch.ops.msa.combine(o_partial, lse_partial)


@torch.library.custom_op("msa::invert", mutates_args=())
def _invert_op(
    block_ids: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, num_keys: int,
    block_size: int, q_budget: int, init_blocks: int, local_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    Hkv, T, K = block_ids.shape
    cu = _check_cu_values(cu_seqlens_q, cu_seqlens_k, T, num_keys)
    _check_block_ids_values(block_ids, cu, T, num_keys, block_size)
    skip = init_blocks + local_blocks > 0
    spec = _spec("float32", Hkv, Hkv, 16, 16, topk=K, block_size=block_size, q_budget=q_budget,
                 **(dict(init_blocks=init_blocks, local_blocks=local_blocks) if skip else {}))
    keys = torch.empty((num_keys,), dtype=torch.int8, device=block_ids.device)  # carries S into the graph
    res = _run("invert_skip_forced" if skip else "invert", spec, _device_key(block_ids),
               dict(block_ids=block_ids, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, keys=keys))
    return tuple(res[:5])


@_invert_op.register_fake
def _(block_ids, cu_seqlens_q, cu_seqlens_k, num_keys, block_size, q_budget, init_blocks, local_blocks):
    Hkv, T, K = block_ids.shape
    B = cu_seqlens_q.shape[0] - 1
    r_max = num_keys // block_size + B
    i = dict(dtype=torch.int32)
    return (block_ids.new_empty((B + 1,), **i), block_ids.new_empty((Hkv, r_max + 1), **i),
            block_ids.new_empty((Hkv, T * K), **i), block_ids.new_empty((V.work_capacity(Hkv, T, K, r_max, q_budget), 4), **i),
            block_ids.new_empty((1,), **i))


def invert(
    block_ids: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    num_keys: Optional[int] = None,
    block_size: int = 128,
    q_budget: int = 64,
    init_blocks: int = 0,
    local_blocks: int = 0,
):
    """Step 4: block -> queries CSR and work list (see msa_py.reference.Inversion).

    Sizes are upper bounds fixed by num_keys (S; read from cu_seqlens_k[-1]
    when None, a device sync): row_ptr [Hkv, S//block_size + B + 1], work
    [W_max, 4] of which num_work[0] are valid, entries -1 past each nnz.
    init_blocks / local_blocks > 0 leave each query's forced blocks out (for
    `forced_combine`).
    """
    from .reference import Inversion

    _check_tensors(block_ids=block_ids, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if block_ids.dtype != torch.int32:
        raise ValueError(f"block_ids must be int32, got {block_ids.dtype}")
    V.check_rank("block_ids", tuple(block_ids.shape), 3, "[Hkv, T, topk]")
    V.Config(block_ids.shape[2], block_size, init_blocks, local_blocks, q_budget).check()
    V.check_cu_seqlens_shapes(tuple(cu_seqlens_q.shape), tuple(cu_seqlens_k.shape))
    _check_cu("cu_seqlens_q", cu_seqlens_q)
    _check_cu("cu_seqlens_k", cu_seqlens_k)
    if num_keys is None:
        num_keys = int(cu_seqlens_k[-1])
    return Inversion(*torch.ops.msa.invert(block_ids, cu_seqlens_q, cu_seqlens_k, num_keys, block_size, q_budget,
                                           init_blocks, local_blocks))


@torch.library.custom_op("msa::block_attention", mutates_args=())
def _block_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_offsets: torch.Tensor, entries: torch.Tensor,
    work: torch.Tensor, num_work: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    topk: int, block_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, Hq, D = q.shape
    spec = _spec(_DTYPES[q.dtype], Hq, k.shape[1], D, 16, topk=topk, block_size=block_size)
    res = _run("block_attention", spec, _device_key(q),
               dict(q=q, k=k, v=v, row_offsets=row_offsets, entries=entries, work=work, num_work=num_work,
                    cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, scale=_scale_tensor(scale, q)))
    return res[0], res[1]


@_block_attention_op.register_fake
def _(q, k, v, row_offsets, entries, work, num_work, cu_seqlens_q, cu_seqlens_k, topk, block_size, scale):
    T, Hq, D = q.shape
    pd = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return q.new_empty((T, Hq, topk, D), dtype=pd), q.new_empty((T, Hq, topk), dtype=torch.float32)


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inversion,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    topk: int = 16,
    block_size: int = 128,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5: o_partial [T, Hq, topk, D] (q's dtype if 16-bit, else fp32; unspecified
    where lse_partial is -inf) and lse_partial [T, Hq, topk] fp32."""
    _check_tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    T, S, Hq, Hkv, D, _ = _attention_checks(q, k, v, cu_seqlens_q, cu_seqlens_k)
    V.Config(topk, block_size).check()
    V.check_scale("scale", scale)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    inv = inversion
    return torch.ops.msa.block_attention(q, k, v, inv.row_offsets, inv.entries, inv.work, inv.num_work,
                                         cu_seqlens_q, cu_seqlens_k, topk, block_size, sc)


@torch.library.custom_op("msa::forced_combine", mutates_args=())
def _forced_combine_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_partial: torch.Tensor, lse_partial: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_size: int, init_blocks: int, local_blocks: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, Hq, D = q.shape
    out = q.new_empty((T, Hq, D))
    lse = q.new_empty((T, Hq), dtype=torch.float32)
    if T == 0:
        return out, lse
    spec = _spec(_DTYPES[q.dtype], Hq, k.shape[1], D, 16, topk=o_partial.shape[2], block_size=block_size,
                 init_blocks=init_blocks, local_blocks=local_blocks)
    _run("forced_combine", spec, _device_key(q),
         dict(q=q, k=k, v=v, o_partial=o_partial, lse_partial=lse_partial, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k,
              scale=_scale_tensor(scale, q)), [out, lse])
    return out, lse


@_forced_combine_op.register_fake
def _(q, k, v, o_partial, lse_partial, cu_seqlens_q, cu_seqlens_k, block_size, init_blocks, local_blocks, scale):
    T, Hq, D = q.shape
    return q.new_empty((T, Hq, D)), q.new_empty((T, Hq), dtype=torch.float32)


def forced_combine(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o_partial: torch.Tensor,
    lse_partial: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's forced pass: each query's forced blocks (sinks, local)
    attended to and merged with the partials of its other slots (block
    attention on `invert(..., init_blocks=, local_blocks=)`). Returns out
    [T, Hq, D] (q's dtype), lse [T, Hq] fp32."""
    _check_tensors(q=q, k=k, v=v, o_partial=o_partial, lse_partial=lse_partial, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k)
    T, S, Hq, Hkv, D, _ = _attention_checks(q, k, v, cu_seqlens_q, cu_seqlens_k)
    V.check_rank("o_partial", tuple(o_partial.shape), 4, "[T, Hq, topk, D]")
    topk = o_partial.shape[2]
    if tuple(o_partial.shape) != (T, Hq, topk, D):
        raise ValueError(f"o_partial must be [T, Hq, topk, D] = [{T}, {Hq}, topk, {D}], got {tuple(o_partial.shape)}")
    pd = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    if o_partial.dtype != pd:
        raise ValueError(f"o_partial must be {pd} for {q.dtype} inputs, got {o_partial.dtype}")
    if lse_partial.dtype != torch.float32 or tuple(lse_partial.shape) != (T, Hq, topk):
        raise ValueError(f"lse_partial must be float32 of shape {(T, Hq, topk)}, got {lse_partial.dtype} "
                         f"{tuple(lse_partial.shape)}")
    V.Config(topk, block_size, init_blocks, local_blocks).check().check_forced_pass()
    from .graph import forced_gpu_fits

    if q.is_cuda and not forced_gpu_fits(pd != torch.float32, D, block_size, topk):
        raise ValueError(f"forced_combine on CUDA needs bfloat16/float16 inputs with D and block_size multiples "
                         f"of 16 up to 128 and topk small enough for the shared memory; got {q.dtype}, D={D}, "
                         f"block_size={block_size}, topk={topk}")
    V.check_scale("scale", scale)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return torch.ops.msa.forced_combine(q, k, v, o_partial, lse_partial, cu_seqlens_q, cu_seqlens_k, block_size,
                                        init_blocks, local_blocks, sc)
