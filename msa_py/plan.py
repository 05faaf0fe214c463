"""Plan / run for a serving engine's decode step over paged caches.

    plan = msa_py.PagedDecodePlan(k_cache, v_cache, k_idx_cache, max_batch=32, max_pages=1024,
                                  num_heads=64, n_new=1, topk=16)
    # every step: write the batch into the plan's inputs, then
    plan.q[:B * n_new].copy_(q); plan.q_idx[:B * n_new].copy_(q_idx)
    plan.page_table[:B].copy_(page_table); plan.seq_lens[:B].copy_(seq_lens)
    out, lse = plan.run()            # plan.out / plan.lse, rows of the first B sequences

FP8 caches: pass dtype= (the queries') and the caches' k_scale, v_scale,
k_idx_scale, as for paged_msa_attention. index_dtype=torch.float8_e4m3fn
(with an e4m3 k_idx_cache): the FP8 indexer; plan.q_idx is then e4m3 and
the engine writes its rows quantized, `plan.q_idx[:n].copy_(
msa_py.quantize_rows(q_idx)[0])` (a row's scale does not change its
ranking, so none is passed).

`plan` (once) checks the configuration, allocates every input and output
at the planned size, views them as MAX buffers, compiles the layer, and
fills the rows past any batch with a harmless sequence (n_new keys on page
0). `run` launches the paged layer (indexer and attention, decode kernels)
on those buffers and nothing else: no host sync, no allocation, no
validation (the engine validates the batch it writes, or calls
`check_batch()` outside the captured region). So one CUDA graph captured
around `run` replays for any batch up to max_batch and any context up to
max_pages pages: the batch and the context live in the buffers, not in
the shapes. Rows of sequences past the batch must keep the harmless
values: `reset_rows(B)` writes them (device-side, capturable).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _validate as V
from . import engine as E
from . import paged as P
from . import torch_ops as O
from .graph import DECODE_MAX_Q


class PagedDecodePlan:
    def __init__(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k_idx_cache: torch.Tensor,
        *,
        max_batch: int,
        max_pages: int,
        num_heads: int,
        n_new: int = 1,
        topk: int = 16,
        block_size: int = 128,
        init_blocks: int = 1,
        local_blocks: int = 2,
        scale: Optional[float] = None,
        idx_scale: Optional[float] = None,
        dtype: Optional[torch.dtype] = None,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        k_idx_scale: Optional[float] = None,
        index_dtype: Optional[torch.dtype] = None,
    ):
        O._check_tensors(k_cache=k_cache, v_cache=v_cache, k_idx_cache=k_idx_cache)
        dev = k_cache.device
        pt_shape, sl_shape = (max_batch, max_pages), (max_batch,)
        num_pages, Hkv, D, Di, _, _ = V.paged_dims(tuple(k_cache.shape), tuple(v_cache.shape),
                                                   tuple(k_idx_cache.shape), pt_shape, sl_shape, block_size)
        if v_cache.stride() != k_cache.stride():
            raise ValueError(f"v_cache must have k_cache's strides {k_cache.stride()}, got {v_cache.stride()}")
        V.check_heads(num_heads, Hkv, "num_heads")
        V.Config(topk, block_size, init_blocks, local_blocks).check()
        if not 1 <= n_new <= DECODE_MAX_Q:
            raise ValueError(f"n_new must be 1 .. {DECODE_MAX_Q} new tokens a sequence (the decode kernels), got {n_new}")
        if max_batch < 1 or max_pages < 1:
            raise ValueError(f"max_batch and max_pages must be >= 1, got {max_batch}, {max_pages}")
        V.check_scale("scale", scale)
        V.check_scale("idx_scale", idx_scale)
        dt = dtype or k_cache.dtype  # the queries'; e4m3 caches need it given
        if dt not in O._DTYPES:
            raise ValueError(f"dtype, the queries' dtype, must be one of {list(O._DTYPES)} (given for "
                             f"float8_e4m3fn caches), got {dt}")
        fmt = P.cache_format(dt, k_cache, v_cache, k_idx_cache, k_scale=k_scale, v_scale=v_scale,
                             k_idx_scale=k_idx_scale)
        O.check_index_dtype(index_dtype)
        if index_dtype is not None:
            if k_idx_cache.dtype != O.FP8:
                raise ValueError(f"index_dtype=torch.float8_e4m3fn reads an e4m3 k_idx_cache, got {k_idx_cache.dtype}")
            O.check_fp8_index_dim(k_idx_cache)
        self.max_batch, self.n_new, self.num_pages = max_batch, n_new, num_pages
        T = max_batch * n_new
        self.q = torch.zeros((T, num_heads, D), dtype=dt, device=dev)
        self.q_idx = torch.zeros((T, Hkv, Di), dtype=index_dtype or dt, device=dev)
        self.page_table = torch.zeros(pt_shape, dtype=torch.int32, device=dev)
        self.seq_lens = torch.full(sl_shape, n_new, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(0, T + 1, n_new, dtype=torch.int32, device=dev)
        self.out = torch.empty_like(self.q)
        self.lse = torch.empty((T, num_heads), dtype=torch.float32, device=dev)
        self.block_ids = torch.empty((Hkv, T, topk), dtype=torch.int32, device=dev)
        self._keep = (k_cache, v_cache, k_idx_cache)
        geom = P._geometry(k_cache, k_idx_cache, max_pages)
        self.spec = O._spec(O._DTYPES[dt], num_heads, Hkv, D, Di, topk=topk, block_size=block_size,
                            init_blocks=init_blocks, local_blocks=local_blocks, decode=True, **fmt.spec_fields(),
                            idx_dtype="float8_e4m3fn" if index_dtype is not None else "",
                            # the GPU indexer's query tile sized to n_new (registers); the CPU path does not
                            # care, so it shares paged_msa_attention's compiled model
                            decode_queries=n_new if k_cache.is_cuda else 0)
        self.device = O._device_key(k_cache)
        sc = O._scale_tensor((1.0 / math.sqrt(D) if scale is None else float(scale)) * fmt.k_scale, k_cache)
        isc = O._scale_tensor((1.0 / math.sqrt(Di) if idx_scale is None else float(idx_scale)) * fmt.k_idx_scale,
                              k_cache)
        tensors = dict(q=self.q, k_cache=P._flat_storage("k_cache", k_cache), v_cache=P._flat_storage("v_cache", v_cache),
                       q_idx=self.q_idx, k_idx_cache=P._flat_storage("k_idx_cache", k_idx_cache),
                       page_table=self.page_table, seq_lens=self.seq_lens, cu_q=self.cu_seqlens_q, geometry=geom,
                       scale=sc, idx_scale=isc, v_scale=O._scale_tensor(fmt.v_scale, k_cache))
        tensors = P._inputs("paged_msa", self.spec, tensors)
        self._tensors = tensors
        self._ins = {n: O._buf(t) for n, t in tensors.items()}
        self._outs = [O._buf(t) for t in (self.out, self.lse, self.block_ids)]
        E.model("paged_msa", self.spec, self.device)  # compile now, not in the first run
        self.run()  # and warm it up

    def check_batch(self) -> None:
        """The values in the plan's buffers (one device sync): every row's page
        ids and length (the rows past a batch hold the harmless sequence)."""
        V.check_paged_values(self.page_table.cpu().numpy(), self.seq_lens.cpu().numpy(),
                             self.cu_seqlens_q.cpu().numpy(), self.num_pages, self.spec.block_size, self.q.shape[0])

    def reset_rows(self, batch: int) -> None:
        """Rows past the first `batch` sequences back to the harmless sequence
        (n_new keys on page 0): device-side, capturable."""
        self.seq_lens[batch:].fill_(self.n_new)
        self.page_table[batch:].zero_()

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step on the plan's buffers: out [max_batch * n_new, Hq, D],
        lse [max_batch * n_new, Hq] (the plan's own tensors, overwritten)."""
        if self.q.is_cuda:
            _, ext = O._max_stream(self.q.device)
            cur = torch.cuda.current_stream(self.q.device)
            ext.wait_stream(cur)
            E.run("paged_msa", self.spec, self.device, self._ins, outputs=self._outs)
            cur.wait_stream(ext)
        else:
            E.run("paged_msa", self.spec, self.device, self._ins, outputs=self._outs)
        return self.out, self.lse

