"""msa_py.distributed with torch.distributed's gloo backend on the CPU,
several processes, against msa_py.reference: tensor parallel (heads
split, no cross-rank traffic) and context-parallel prefill (zigzag split,
K / V / index keys all-gathered), forward and backward."""
import os
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

HQ, HKV, D, DI, TOPK, BS = 8, 2, 64, 32, 3, 16


def _case(T):
    from cases import make_case

    return make_case(40, [(T, T)], HQ, HKV, D, DI)


def _run(fn, world, *args):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, os.path.join(d, "rendezvous"), fn, args), nprocs=world, join=True)


def _entry(rank, world, path, fn, args):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _tensor_parallel(rank, world, T):
    import msa_py
    from msa_py import reference as R
    from msa_py import verify as Vf
    from msa_py.distributed import tp_shard

    c = _case(T)
    sl = tp_shard(rank, world, HQ, HKV)
    t = {n: torch.from_numpy(getattr(c, n)) for n in ("q", "k", "v", "q_idx", "k_idx")}
    out, lse = msa_py.msa_attention(t["q"][:, sl.q].contiguous(), t["k"][:, sl.kv].contiguous(),
                                    t["v"][:, sl.kv].contiguous(), t["q_idx"][:, sl.kv].contiguous(), t["k_idx"],
                                    topk=TOPK, block_size=BS)
    ro, rl = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, topk=TOPK, block_size=BS)
    assert Vf.rel_err(out.double().numpy(), ro[:, sl.q]) < 1e-5
    assert Vf.rel_err(lse.double().numpy(), rl[:, sl.q]) < 1e-5


def _context_parallel(rank, world, T):
    import msa_py
    from msa_py import reference as R
    from msa_py import verify as Vf
    from msa_py.distributed import cp_msa_attention, zigzag_split

    c = _case(T)
    full = {n: torch.from_numpy(getattr(c, n)) for n in ("q", "k", "v", "q_idx", "k_idx")}
    mine = {n: zigzag_split(x, rank, world).contiguous() for n, x in full.items()}
    leaves = {n: mine[n].clone().requires_grad_(True) for n in ("q", "k", "v")}
    out, lse = cp_msa_attention(leaves["q"], leaves["k"], leaves["v"], mine["q_idx"], mine["k_idx"], seq_len=T,
                                topk=TOPK, block_size=BS)
    # the single-device kernels' answer, bit for bit
    one, one_lse = msa_py.msa_attention(full["q"], full["k"], full["v"], full["q_idx"], full["k_idx"], topk=TOPK,
                                        block_size=BS)
    assert torch.equal(out.detach(), zigzag_split(one, rank, world))
    assert torch.equal(lse.detach(), zigzag_split(one_lse, rank, world))
    ro, rl = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, topk=TOPK, block_size=BS)
    assert Vf.rel_err(out.detach().double().numpy(), zigzag_split(torch.from_numpy(ro), rank, world).numpy()) < 1e-5
    # backward: the gradient of sum(out * dout) over every rank reaches each rank's own tokens
    dout = torch.from_numpy(np.random.default_rng(41).standard_normal(c.q.shape).astype(np.float32))
    (out * zigzag_split(dout, rank, world)).sum().backward()
    bid = R.select_blocks(c.q_idx, c.k_idx, topk=TOPK, block_size=BS)
    rq, rk, rv = R.sparse_attention_backward(c.q, c.k, c.v, bid, dout.numpy(), block_size=BS)
    for name, ref in (("q", rq), ("k", rk), ("v", rv)):
        want = zigzag_split(torch.from_numpy(ref), rank, world).numpy()
        assert Vf.rel_err(leaves[name].grad.double().numpy(), want) < 1e-5, name


def test_tensor_parallel_two_ranks():
    _run(_tensor_parallel, 2, 90)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_context_parallel_prefill(world):
    _run(_context_parallel, world, 150)


def test_zigzag_chunks_balance_and_cover():
    from msa_py.distributed import zigzag_chunks, zigzag_merge, zigzag_split

    for T, world in ((1000, 4), (37, 3), (8, 2)):
        seen = sorted(r for rank in range(world) for c0, c1 in zigzag_chunks(T, rank, world) for r in range(c0, c1))
        assert seen == list(range(T))
        work = [sum(c1 * (c1 + 1) - c0 * (c0 + 1) for c0, c1 in zigzag_chunks(T, rank, world)) for rank in range(world)]
        assert max(work) <= 1.1 * min(work) + 4 * T  # causal work within a chunk's rounding
        x = torch.arange(T)
        assert torch.equal(zigzag_merge([zigzag_split(x, r, world) for r in range(world)], T), x)
