"""The FP8 indexer: e4m3 index queries and keys (msa_py.quantize_index,
index_dtype=torch.float8_e4m3fn), against the reference run on the
dequantized inputs; the layer on its selection; splitting; errors; the
default workspace budget.

    pytest tests/test_fp8_index.py                  # CPU tensors (CI)
    pytest tests/test_fp8_index.py --device cuda    # CUDA tensors (GPU machine)
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import msa_py  # noqa: E402
from msa_py import paged  # noqa: E402
from msa_py import reference as R  # noqa: E402
from msa_py import torch_ops  # noqa: E402
from msa_py import verify as Vf  # noqa: E402
from msa_py.bench import selection_overlap  # noqa: E402

FP8 = torch.float8_e4m3fn
HQ, HKV, D, DI, TOPK, BS = 4, 2, 32, 128, 3, 32
SEQS = [(150, 150), (1, 1), (40, 260), (97, 97)]  # ragged: a prompt, one token, a chunk over a prefix, a short one


def _inputs(dev, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    T, S = sum(t for t, _ in SEQS), sum(s for _, s in SEQS)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dev, dtype)  # noqa: E731
    # index keys spread over a wide range (scale != 1), queries per row at different magnitudes
    qi = r(T, HKV, DI) * torch.linspace(0.05, 20, T, dtype=dtype).view(T, 1, 1).to(dev)
    cu = lambda i: torch.tensor(np.concatenate([[0], np.cumsum([s[i] for s in SEQS])]), dtype=torch.int32,  # noqa: E731
                                device=dev)
    return r(T, HQ, D), r(S, HKV, D), r(S, HKV, D), qi, r(S, DI, std=7.0), cu(0), cu(1)


def _np(x):
    return x.detach().cpu().double().numpy()


def test_quantize_index_scales_and_rounding(torch_device):
    *_, qi, ki, _, _ = _inputs(torch_device)
    q8, k8, qs, ks = msa_py.quantize_index(qi, ki)
    assert q8.dtype == FP8 and k8.dtype == FP8 and qs.shape == (qi.shape[0], HKV, 1) and ks.shape == (1,)
    # each row's largest magnitude maps to 448; every value within half an e4m3 step (3 mantissa bits)
    assert torch.allclose(q8.float().abs().amax(-1), torch.full(qi.shape[:2], 448.0, device=torch_device))
    for x, x8, s in ((qi, q8, qs), (ki, k8, ks)):
        err = (x8.float() * s - x.float()).abs()
        assert bool((err <= x.float().abs() * 2.0 ** -4 + s * 2.0 ** -9).all())


def test_fp8_selection_matches_the_dequantized_reference(torch_device):
    *_, qi, ki, cq, ck = _inputs(torch_device, seed=1)
    q8, k8, qs, ks = msa_py.quantize_index(qi, ki)
    bid = msa_py.select_blocks(q8, k8, cq, ck, topk=TOPK, block_size=BS)
    rep = Vf.selection_report(bid.cpu().numpy(), _np(q8.double() * qs.double()), _np(k8.double() * ks.double()),
                              cq.cpu().numpy(), ck.cpu().numpy(), block_size=BS, init_blocks=1, local_blocks=2)
    assert not rep["bad"] and rep["exact"] >= 0.98 * rep["rows"], rep
    # index_dtype quantizes the same way
    b2 = msa_py.select_blocks(qi, ki, cq, ck, topk=TOPK, block_size=BS, index_dtype=FP8)
    assert torch.equal(b2, bid)
    # most blocks agree with the reference's on the unquantized inputs
    ref = torch.from_numpy(R.select_blocks(_np(qi), _np(ki), cq.cpu().numpy(), ck.cpu().numpy(), topk=TOPK,
                                           block_size=BS))
    assert selection_overlap(bid.cpu(), ref) > 0.9


def test_msa_attention_on_the_fp8_selection(torch_device):
    q, k, v, qi, ki, cq, ck = _inputs(torch_device, seed=2)
    out, lse = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS, index_dtype=FP8)
    q8, k8 = msa_py.quantize_index(qi, ki)[:2]
    bid = msa_py.select_blocks(q8, k8, cq, ck, topk=TOPK, block_size=BS)
    ro, rl = R.sparse_attention(_np(q), _np(k), _np(v), bid.cpu().numpy(), cq.cpu().numpy(), ck.cpu().numpy(),
                                block_size=BS)
    assert Vf.rel_err(_np(out), ro) < 2e-2 and Vf.rel_err(_np(lse), rl) < 1e-4
    # pre-quantized inputs: the same call
    o2, l2 = msa_py.msa_attention(q, k, v, q8, k8, cq, ck, topk=TOPK, block_size=BS)
    assert torch.equal(o2, out) and torch.equal(l2, lse)
    # split into pieces of at most 50 queries (slices of the long sequences): the same answer, bit for bit
    per_q = msa_py._validate.workspace_bytes_per_query(HQ, HKV, D, TOPK, 2, k.shape[0], BS, 64)
    o3, l3 = msa_py.msa_attention(q, k, v, q8, k8, cq, ck, topk=TOPK, block_size=BS, max_workspace_bytes=50 * per_q)
    assert torch.equal(o3, out) and torch.equal(l3, lse)


def test_fp8_index_errors(torch_device):
    q, k, v, qi, ki, cq, ck = _inputs(torch_device, seed=3)
    q8, k8 = msa_py.quantize_index(qi, ki)[:2]
    with pytest.raises(ValueError, match="q_idx and k_idx must both be torch.float8_e4m3fn"):
        msa_py.select_blocks(q8, ki, cq, ck, topk=TOPK, block_size=BS)
    with pytest.raises(ValueError, match="index_dtype must be None or torch.float8_e4m3fn"):
        msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS, index_dtype=torch.float16)
    with pytest.raises(ValueError, match="q_idx"):  # 16-bit index inputs to quantize must still match q's dtype
        msa_py.msa_attention(q, k, v, qi.float(), ki.float(), cq, ck, topk=TOPK, block_size=BS, index_dtype=FP8)
    if torch_device == "cuda":
        with pytest.raises(ValueError, match="Di a multiple of 128"):
            msa_py.select_blocks(q8[..., :64].contiguous(), k8[:, :64].contiguous(), cq, ck, topk=TOPK, block_size=BS)


def test_fp8_index_in_a_graph():
    """msa_py.graph.select_blocks on uint8 e4m3 bytes; mixed formats refused."""
    from max.dtype import DType
    from max.graph import DeviceRef, Graph, TensorType

    from msa_py import graph as G

    cpu = DeviceRef.CPU()
    with pytest.raises(ValueError, match="both be uint8"):
        with Graph("mixed", input_types=[TensorType(DType.uint8, [8, 2, 128], device=cpu),
                                         TensorType(DType.bfloat16, [8, 128], device=cpu)],
                   custom_extensions=[msa_py.graph.kernels_path()]) as g:
            G.select_blocks(g.inputs[0].tensor, g.inputs[1].tensor, topk=2, block_size=16)
    with pytest.raises(ValueError, match="Di a multiple of 128"):
        with Graph("di64", input_types=[TensorType(DType.uint8, [8, 2, 64], device=DeviceRef.GPU(0)),
                                        TensorType(DType.uint8, [8, 64], device=DeviceRef.GPU(0))],
                   custom_extensions=[msa_py.graph.kernels_path()]) as g:
            G.select_blocks(g.inputs[0].tensor, g.inputs[1].tensor, topk=2, block_size=16)


class _FakeCuda:
    is_cuda = True
    device = "cuda:7"


def test_default_workspace_budget_keeps_what_it_granted(monkeypatch):
    """MAX keeps its pool: the budget never shrinks below what an earlier call
    was granted, grows with free memory, and stops at the cap."""
    free = iter([10 << 30, 1 << 30, 100 << 30])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (next(free), 80 << 30))
    monkeypatch.setattr(torch_ops, "_granted", {})
    x = _FakeCuda()
    assert torch_ops._workspace_budget(x, None) == int(0.4 * (10 << 30))
    assert torch_ops._workspace_budget(x, None) == int(0.4 * (10 << 30))  # 1 GiB free now: the pool holds the rest
    assert torch_ops._workspace_budget(x, None) == torch_ops.WORKSPACE_CAP_BYTES
    assert torch_ops._workspace_budget(x, 12345) == 12345


def test_paged_fp8_indexer_over_an_e4m3_cache(torch_device):
    """index_dtype=e4m3 on the paged ops: q_idx rows quantized, the e4m3
    index-key cache read as stored (shuffled pages); the selection is the
    reference's on the dequantized queries and keys, and the layer attends
    over it."""
    seqs = [(40, 40), (7, 90), (1, 33), (1, 200), (1, 1), (3, 70)]  # prompt, chunk, decode and draft tokens
    g = torch.Generator().manual_seed(5)
    need = [-(-tk // BS) for _, tk in seqs]
    num_pages = sum(need) + 3
    perm = torch.randperm(num_pages, generator=g).tolist()
    pt = torch.full((len(seqs), max(need)), -1, dtype=torch.int32)
    for b, n in enumerate(need):
        for j in range(n):
            pt[b, j] = perm.pop()
    r = lambda *s: torch.randn(*s, generator=g).to(torch_device)  # noqa: E731
    kc, vc = r(num_pages, BS, HKV, D).bfloat16(), r(num_pages, BS, HKV, D).bfloat16()
    kis = 0.05
    ic = msa_py.quantize_cache(r(num_pages, BS, DI) * 4, FP8, kis)
    T = sum(t for t, _ in seqs)
    q, qi = r(T, HQ, D).bfloat16(), (r(T, HKV, DI) * 3).bfloat16()
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=torch_device)  # noqa: E731
    pt, sl = pt.to(torch_device), i32([tk for _, tk in seqs])
    cu = i32(np.concatenate([[0], np.cumsum([tq for tq, _ in seqs])]))
    kw = dict(topk=TOPK, block_size=BS, k_idx_scale=kis)
    # the layer with its own selection (paged_select_blocks on e4m3 is test_fp8_decode_indexer's)
    out, lse, bid = paged.paged_layer(q, kc, vc, qi, ic, pt, sl, cu, index_dtype=FP8, **kw)
    q8, qs = torch_ops.quantize_rows(qi)
    host = dict(page_table=pt.cpu().numpy(), seq_lens=sl.cpu().numpy(), cu_seqlens_q=cu.cpu().numpy())
    ki, cu_k = R.gather_pages(_np(ic), host["page_table"], host["seq_lens"], block_size=BS, scale=kis)
    rep = Vf.selection_report(bid.cpu().numpy(), _np(q8.double() * qs.double()), ki, host["cu_seqlens_q"], cu_k,
                              block_size=BS, init_blocks=1, local_blocks=2)
    assert not rep["bad"] and rep["exact"] >= 0.95 * rep["rows"], rep
    ro, rl = R.paged_sparse_attention(_np(q), _np(kc), _np(vc), bid.cpu().numpy(), **host, block_size=BS)
    assert Vf.rel_err(_np(out), ro) < 2e-2 and Vf.rel_err(_np(lse), rl) < 1e-4
    with pytest.raises(ValueError, match="reads an e4m3 k_idx_cache"):
        msa_py.paged_select_blocks(qi, ic.float().bfloat16(), pt, sl, cu, topk=TOPK, block_size=BS, index_dtype=FP8)


def test_fp8_decode_indexer(torch_device):
    """Decode-sized calls with e4m3 index inputs take the decode indexer
    (its e4m3 score pass on CUDA): one new token or a few drafts per
    sequence, one sequence past the score pass's query tile (max_q), over
    contiguous keys and over shuffled e4m3 pages; the selection is the
    reference's on the dequantized inputs."""
    seqs = [(1, 300), (1, 1), (4, 700), (1, 129), (17, 450), (1, 2000), (2, 45)]  # 17 > max_q: scored by top-k
    g = torch.Generator().manual_seed(11)
    T, S = sum(t for t, _ in seqs), sum(s for _, s in seqs)
    qi = (torch.randn(T, HKV, DI, generator=g) * torch.linspace(0.1, 9, T).view(T, 1, 1)).to(torch_device)
    ki = (torch.randn(S, DI, generator=g) * 5).to(torch_device)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=torch_device)  # noqa: E731
    cq = i32(np.concatenate([[0], np.cumsum([t for t, _ in seqs])]))
    ck = i32(np.concatenate([[0], np.cumsum([s for _, s in seqs])]))
    assert torch_ops._decode(T, cq, qi.to(FP8), BS, Di=DI, topk=TOPK)  # the decode indexer runs
    q8, k8, qs, ks = msa_py.quantize_index(qi, ki)
    bid = msa_py.select_blocks(q8, k8, cq, ck, topk=TOPK, block_size=BS)
    rep = Vf.selection_report(bid.cpu().numpy(), _np(q8.double() * qs.double()), _np(k8.double() * ks.double()),
                              cq.cpu().numpy(), ck.cpu().numpy(), block_size=BS, init_blocks=1, local_blocks=2)
    assert not rep["bad"] and rep["exact"] >= 0.97 * rep["rows"], rep
    # the same keys as shuffled e4m3 pages (the cache holds k8, its scale ks)
    need = [-(-tk // BS) for _, tk in seqs]
    perm = torch.randperm(sum(need) + 2, generator=g).tolist()
    pages = torch.zeros(len(perm), BS, DI, dtype=FP8, device=torch_device)
    pt = torch.full((len(seqs), max(need)), -1, dtype=torch.int32)
    off = 0
    for b, (n, (_, tk)) in enumerate(zip(need, seqs)):
        for j in range(n):
            pt[b, j] = p = perm.pop()
            rows = k8[off + j * BS: off + min(tk, (j + 1) * BS)]
            pages[p, :rows.shape[0]] = rows
        off += tk
    pb = msa_py.paged_select_blocks(qi, pages, pt.to(torch_device), i32([tk for _, tk in seqs]), cq, topk=TOPK,
                                    block_size=BS, k_idx_scale=float(ks), index_dtype=FP8)  # q_idx quantized as q8
    assert torch.equal(pb, bid)


def test_decode_plan_with_the_fp8_indexer(torch_device):
    """PagedDecodePlan(index_dtype=e4m3): the engine writes q_idx rows
    quantized (quantize_rows); run() gives paged_msa_attention's answer with
    the FP8 indexer, and on CUDA a captured graph replays it."""
    seqs = [(1, 40), (1, 300), (1, 33), (1, 129)]
    g = torch.Generator().manual_seed(9)
    need = [-(-tk // BS) for _, tk in seqs]
    perm = torch.randperm(sum(need) + 2, generator=g).tolist()
    pt = torch.full((len(seqs), max(need)), 0, dtype=torch.int32)
    for b, n in enumerate(need):
        for j in range(n):
            pt[b, j] = perm.pop()
    r = lambda *s: torch.randn(*s, generator=g).to(torch_device)  # noqa: E731
    npg = pt.numel() + 2
    scales = dict(k_scale=0.04, v_scale=0.03, k_idx_scale=0.06)
    kc, vc = (msa_py.quantize_cache(r(npg, BS, HKV, D), FP8, scales[n]) for n in ("k_scale", "v_scale"))
    ic = msa_py.quantize_cache(r(npg, BS, DI) * 3, FP8, scales["k_idx_scale"])
    B = len(seqs)
    q, qi = r(B, HQ, D).bfloat16(), (r(B, HKV, DI) * 2).bfloat16()
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=torch_device)  # noqa: E731
    pt, sl, cu = pt.to(torch_device), i32([tk for _, tk in seqs]), i32(list(range(B + 1)))
    plan = msa_py.PagedDecodePlan(kc, vc, ic, max_batch=B + 1, max_pages=pt.shape[1], num_heads=HQ, n_new=1,
                                  topk=TOPK, block_size=BS, dtype=torch.bfloat16, index_dtype=FP8, **scales)
    assert plan.q_idx.dtype == FP8
    plan.q[:B].copy_(q)
    plan.q_idx[:B].copy_(msa_py.quantize_rows(qi)[0])
    plan.page_table[:B].copy_(pt)
    plan.seq_lens[:B].copy_(sl)
    plan.reset_rows(B)
    out, lse = plan.run()
    ro, rl = msa_py.paged_msa_attention(q, kc, vc, qi, ic, pt, sl, cu, topk=TOPK, block_size=BS, index_dtype=FP8,
                                        **scales)
    assert torch.equal(out[:B], ro) and torch.equal(lse[:B], rl)
    if torch_device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan.run()
        plan.out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(plan.out[:B], ro)
