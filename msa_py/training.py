"""The indexer's training signal, on torch tensors (msa_py.training, exported
as msa_py.*): the attention's mass per selected block (the target), the
indexer's block scores of the selection (differentiable in q_idx and
k_idx), and the KL term between them. The attention's own backward is the
torch ops' autograd (torch_ops.py)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from . import _validate as V
from .torch_ops import _default_cu, block_attention, invert


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_ids: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    block_size: int = 128,
    scale: Optional[float] = None,
    q_budget: int = 64,
) -> torch.Tensor:
    """The attention mass of each selected block, the indexer's target:
    mass [Hkv, T, topk] fp32, the share of each (query, head)'s softmax that
    falls on the slot's block (exp(lse_partial - lse), from the block
    attention's per-block lse), averaged over the G heads of the group; each
    (g, t) row sums to 1 over its used slots, 0 in unused ones. No gradient
    (a target). q [T, Hq, D], k [S, Hkv, D], block_ids [Hkv, T, topk]."""
    with torch.no_grad():
        Hkv, T, topk = block_ids.shape
        if cu_seqlens_q is None:
            if T > k.shape[0]:
                raise ValueError(f"q has more tokens (T={T}) than k (S={k.shape[0]}) without cu_seqlens")
            cu_seqlens_q, cu_seqlens_k = _default_cu(T, k.shape[0], q)
        inv = invert(block_ids, cu_seqlens_q, cu_seqlens_k, num_keys=k.shape[0], block_size=block_size,
                     q_budget=q_budget)
        _, lse_p = block_attention(q, k, k, inv, cu_seqlens_q, cu_seqlens_k, topk=topk, block_size=block_size,
                                   scale=scale)
        lse = torch.logsumexp(lse_p, -1, keepdim=True)
        mass = torch.where(torch.isfinite(lse_p), torch.exp(lse_p - lse), torch.zeros_like(lse_p))
        return mass.view(T, Hkv, -1, topk).mean(2).permute(1, 0, 2).contiguous()


class _IndexBlockScores(torch.autograd.Function):
    """Block scores of the selected blocks, max over their visible keys, with
    the gradient of the max (to the arg-max key) for q_idx and k_idx."""

    @staticmethod
    def forward(ctx, q_idx, k_idx, block_ids, positions, key_start, block_size, idx_scale, chunk):
        Hkv, T, topk = block_ids.shape
        S = k_idx.shape[0]
        scores = torch.full((Hkv, T, topk), float("-inf"), dtype=torch.float32, device=q_idx.device)
        arg = torch.full((Hkv, T, topk), -1, dtype=torch.long, device=q_idx.device)
        offs = torch.arange(block_size, device=q_idx.device)
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            j = block_ids[:, c0:c1].long()  # [g, n, s]
            local = j.clamp(min=0)[..., None] * block_size + offs  # key positions [g, n, s, b]
            vis = (j >= 0)[..., None] & (local <= positions[None, c0:c1, None, None])
            keys = (key_start[None, c0:c1, None, None] + local).clamp(max=S - 1)
            kk = k_idx[keys].float()  # [g, n, s, b, Di]
            qq = q_idx[c0:c1].float().permute(1, 0, 2)  # [g, n, Di]
            sc = idx_scale * torch.einsum("gnd,gnsbd->gnsb", qq, kk)
            sc = sc.masked_fill(~vis | torch.isnan(sc), float("-inf"))
            m, a = sc.max(-1)
            scores[:, c0:c1] = m
            arg[:, c0:c1] = torch.where(torch.isfinite(m), torch.gather(keys, -1, a[..., None])[..., 0],
                                        torch.full_like(a, -1))
        ctx.save_for_backward(q_idx, k_idx, arg)
        ctx.idx_scale = idx_scale
        return scores

    @staticmethod
    def backward(ctx, grad):
        q_idx, k_idx, arg = ctx.saved_tensors
        g = torch.where(arg >= 0, grad, torch.zeros_like(grad)) * ctx.idx_scale  # [Hkv, T, topk]
        kk = k_idx[arg.clamp(min=0)].float()  # [Hkv, T, topk, Di]
        dq = torch.einsum("gts,gtsd->tgd", g, kk).to(q_idx.dtype)
        dk = torch.zeros(k_idx.shape, dtype=torch.float32, device=k_idx.device)
        qq = q_idx.float().permute(1, 0, 2)[:, :, None, :] * g[..., None]  # [Hkv, T, topk, Di]
        dk.index_add_(0, arg.clamp(min=0).reshape(-1), qq.reshape(-1, k_idx.shape[1]))
        return dq, dk.to(k_idx.dtype), None, None, None, None, None, None


def index_block_scores(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    block_ids: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    block_size: int = 128,
    idx_scale: Optional[float] = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """The indexer's block scores of the selected blocks, differentiable in
    q_idx and k_idx: scores [Hkv, T, topk] fp32, idx_scale times the max of
    <q_idx[t, g], k_idx[key]> over the block's visible keys (-inf in unused
    slots), the same scores select_blocks ranked. The gradient of the max
    goes to its arg-max key. Torch ops over chunks of `chunk` queries (the
    gathered keys of a chunk are chunk * Hkv * topk * block_size * Di)."""
    T, S, Hkv, Di = V.index_dims(tuple(q_idx.shape), tuple(k_idx.shape))
    V.check_block_ids_shape(tuple(block_ids.shape), Hkv, T)
    from .reference import _positions

    if cu_seqlens_q is None:
        cu = (np.array([0, T]), np.array([0, S]))
    else:
        cu = (cu_seqlens_q.cpu().numpy(), cu_seqlens_k.cpu().numpy())
        V.check_cu_seqlens_values(*cu, T, S)
    seq, p, _ = _positions(cu[0].astype(np.int64), cu[1].astype(np.int64))
    dev = q_idx.device
    positions = torch.from_numpy(p).to(dev)
    key_start = torch.from_numpy(cu[1].astype(np.int64)[seq]).to(dev)
    sc = 1.0 / math.sqrt(Di) if idx_scale is None else float(idx_scale)
    return _IndexBlockScores.apply(q_idx, k_idx, block_ids, positions, key_start, block_size, sc, chunk)


def indexer_kl_loss(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """KL(mass || softmax(scores)) over each (g, t) row's used slots (score
    -inf: unused), averaged over the rows: the term that trains the indexer
    toward the attention's mass per block (block_mass). scores and mass
    [Hkv, T, topk]."""
    used = torch.isfinite(scores)
    logp = torch.log_softmax(scores.masked_fill(~used, -1e30), -1)
    target = mass * used
    kl = torch.where(target > 0, target * (torch.log(target.clamp(min=1e-30)) - logp), torch.zeros_like(target))
    return kl.sum(-1).mean()
