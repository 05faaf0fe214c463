"""MSA on several devices over torch.distributed (NCCL on GPUs, gloo on CPUs).

Tensor parallel (heads split): each rank holds Hkv / n KV groups, their
G query heads each and their index-query heads; the shared index-key head
is replicated. The selection is made per KV group and the attention of a
group reads only that group's K/V, so `msa_attention` runs per rank on its
shard with no cross-rank traffic:

    sl = tp_shard(rank, world, Hq, Hkv)              # query heads and KV groups of this rank
    out_local, lse_local = msa_py.msa_attention(q[:, sl.q], k[:, sl.kv], v[:, sl.kv], q_idx[:, sl.kv], k_idx, ...)

Context parallel (one long sequence split along its tokens): the sequence
is cut into 2n chunks and rank r holds chunks r and 2n - 1 - r (the zigzag
split: every rank gets the same causal work). Each rank needs the index
keys of every earlier position, and the K/V blocks its queries select.
`cp_msa_attention` all-gathers K, V and the index keys (torch's functional all_gather,
whose backward sends each rank the gradient of its own tokens) and runs each of its two chunks as the last queries of
the sequence's prefix, so its answer is the single-device answer bit for
bit. `zigzag_chunks` gives the token ranges, `zigzag_split` / `zigzag_merge`
move whole-sequence tensors to and from that order (for tests and
benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import torch_ops


@dataclass(frozen=True)
class HeadShard:
    """A rank's slices of the head axes: q (query heads) and kv (KV groups)."""

    q: slice
    kv: slice


def tp_shard(rank: int, world: int, num_heads: int, num_kv_heads: int) -> HeadShard:
    """The query heads and KV groups rank `rank` of `world` holds in tensor
    parallel: Hkv / world consecutive KV groups and their G query heads each."""
    if num_kv_heads % world:
        raise ValueError(f"tensor parallel needs Hkv={num_kv_heads} divisible by the world size {world}")
    per = num_kv_heads // world
    G = num_heads // num_kv_heads
    return HeadShard(q=slice(rank * per * G, (rank + 1) * per * G), kv=slice(rank * per, (rank + 1) * per))


def zigzag_chunks(T: int, rank: int, world: int) -> list[tuple[int, int]]:
    """Token ranges [c0, c1) of one sequence of T tokens that `rank` holds:
    chunks rank and 2 world - 1 - rank of 2 world equal chunks (the last
    ones absorb the remainder), ascending."""
    n = 2 * world
    bounds = [T * i // n for i in range(n + 1)]
    return [(bounds[c], bounds[c + 1]) for c in (rank, n - 1 - rank)]


def zigzag_split(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """A rank's tokens of a whole-sequence tensor (token axis first), its two chunks concatenated."""
    return torch.cat([x[c0:c1] for c0, c1 in zigzag_chunks(x.shape[0], rank, world)])


def zigzag_merge(parts: list[torch.Tensor], T: int) -> torch.Tensor:
    """Inverse of zigzag_split over all ranks' parts (rank order)."""
    world = len(parts)
    out = parts[0].new_empty((T,) + tuple(parts[0].shape[1:]))
    for r, p in enumerate(parts):
        i = 0
        for c0, c1 in zigzag_chunks(T, r, world):
            out[c0:c1] = p[i : i + c1 - c0]
            i += c1 - c0
    return out


def _all_gather_tokens(x: torch.Tensor, T: int, group) -> torch.Tensor:
    """The whole sequence of a zigzag-split tensor on every rank; differentiable
    (torch.distributed.nn's all_gather sends the gradient back to its owner)."""
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    world = dist.get_world_size(group)
    sizes = [sum(c1 - c0 for c0, c1 in zigzag_chunks(T, r, world)) for r in range(world)]
    pad = max(sizes)
    local = x if x.shape[0] == pad else torch.cat([x, x.new_zeros((pad - x.shape[0],) + tuple(x.shape[1:]))])
    gathered = all_gather_tensor_autograd(local.contiguous(), 0, group or dist.group.WORLD)
    return zigzag_merge([gathered[r * pad : r * pad + n] for r, n in enumerate(sizes)], T)


def cp_msa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    *,
    seq_len: int,
    group=None,
    topk: int = 16,
    block_size: int = 128,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: Optional[float] = None,
    idx_scale: Optional[float] = None,
    max_workspace_bytes: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel MSA prefill of one sequence of `seq_len` tokens: this
    rank's tokens in zigzag order (q [n, Hq, D], k, v [n, Hkv, D], q_idx
    [n, Hkv, Di], k_idx [n, Di], n = the tokens of its two chunks). K, V and
    the index keys are all-gathered; each chunk attends as the last queries
    of the prefix that ends with it. Returns out [n, Hq, D], lse [n, Hq] for
    this rank's tokens, equal to the single-device answer."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    chunks = zigzag_chunks(seq_len, rank, world)
    n = sum(c1 - c0 for c0, c1 in chunks)
    for name, x in (("q", q), ("k", k), ("v", v), ("q_idx", q_idx), ("k_idx", k_idx)):
        if x.shape[0] != n:
            raise ValueError(f"{name} must hold this rank's {n} tokens (zigzag_chunks), got {x.shape[0]}")
    k_all, v_all, ki_all = (_all_gather_tokens(x, seq_len, group) for x in (k, v, k_idx))
    kw = dict(topk=topk, block_size=block_size, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale,
              idx_scale=idx_scale, max_workspace_bytes=max_workspace_bytes)
    outs, lses, i = [], [], 0
    for c0, c1 in chunks:
        o, l = torch_ops.msa_attention(q[i : i + c1 - c0], k_all[:c1], v_all[:c1], q_idx[i : i + c1 - c0],
                                       ki_all[:c1], **kw)
        outs.append(o)
        lses.append(l)
        i += c1 - c0
    return torch.cat(outs), torch.cat(lses)
