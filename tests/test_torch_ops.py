"""The torch front door (msa_py.*) against msa_py.reference.

    pytest tests/test_torch_ops.py                  # CPU tensors (CI)
    pytest tests/test_torch_ops.py --device cuda    # CUDA tensors (GPU machine)
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import msa_py  # noqa: E402
from msa_py import engine as E  # noqa: E402
from msa_py import reference as R  # noqa: E402
from msa_py import verify as Vf  # noqa: E402

from cases import make_case  # noqa: E402

HQ, HKV, D, DI, TOPK, BS = 8, 2, 64, 32, 4, 16
SHAPES = [[(77, 77)], [(40, 40), (1, 1), (33, 50), (70, 70)], [(20, 100), (16, 16)]]
TDT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensors(c, device, dtype="float32"):
    f = lambda x: torch.from_numpy(E.round_to(x, dtype)).to(TDT[dtype]).to(device)  # noqa: E731
    i = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
    return f(c.q), f(c.k), f(c.v), f(c.q_idx), f(c.k_idx), i(c.cu_q), i(c.cu_k)


def np64(t):
    return t.detach().float().cpu().numpy().astype(np.float64)


@pytest.mark.parametrize("seqs", SHAPES)
def test_msa_attention_and_friends(seqs, torch_device):
    c = make_case(20, seqs, HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device)
    out, lse = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
    assert out.device == q.device and out.dtype == q.dtype and lse.dtype == torch.float32
    ro, rl = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=TOPK, block_size=BS)
    assert Vf.rel_err(np64(out), ro) < 1e-5 and Vf.rel_err(np64(lse), rl) < 1e-5
    # the stages one by one
    bid = msa_py.select_blocks(qi, ki, cq, ck, topk=TOPK, block_size=BS)
    np.testing.assert_array_equal(bid.cpu().numpy(), R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=TOPK,
                                                                      block_size=BS))
    inv = msa_py.invert(bid, cq, ck, block_size=BS, q_budget=5)
    ref_inv = R.invert(bid.cpu().numpy(), c.cu_q, c.cu_k, block_size=BS, q_budget=5)
    nw = int(inv.num_work[0])
    assert nw == int(ref_inv.num_work[0])
    np.testing.assert_array_equal(inv.work[:nw].cpu().numpy(), ref_inv.work)
    np.testing.assert_array_equal(inv.entries.cpu().numpy(), ref_inv.entries)
    o_p, lse_p = msa_py.block_attention(q, k, v, inv, cq, ck, topk=TOPK, block_size=BS)
    r_op, r_lp = R.block_attention(c.q, c.k, c.v, ref_inv, c.cu_q, c.cu_k, topk=TOPK, block_size=BS)
    used = np.isfinite(r_lp)
    assert np.array_equal(np.isfinite(np64(lse_p)), used)
    assert Vf.rel_err(np.where(used[..., None], np64(o_p), 0), r_op) < 1e-5
    o2, l2 = msa_py.combine(o_p, lse_p)
    assert Vf.rel_err(np64(o2), ro) < 1e-5
    o3, l3 = msa_py.sparse_attention(q, k, v, bid, cq, ck, block_size=BS)
    assert Vf.rel_err(np64(o3), ro) < 1e-5 and Vf.rel_err(np64(l3), rl) < 1e-5
    # the layer's decomposition: forced blocks out of the inversion, into forced_combine
    inv_f = msa_py.invert(bid, cq, ck, block_size=BS, q_budget=5, init_blocks=1, local_blocks=2)
    ref_inv_f = R.invert(bid.cpu().numpy(), c.cu_q, c.cu_k, block_size=BS, q_budget=5, init_blocks=1, local_blocks=2)
    np.testing.assert_array_equal(inv_f.entries.cpu().numpy(), ref_inv_f.entries)
    o_pf, lse_pf = msa_py.block_attention(q, k, v, inv_f, cq, ck, topk=TOPK, block_size=BS)
    if torch_device == "cpu":
        o4, l4 = msa_py.forced_combine(q, k, v, o_pf, lse_pf, cq, ck, block_size=BS)
        assert Vf.rel_err(np64(o4), ro) < 1e-5 and Vf.rel_err(np64(l4), rl) < 1e-5
    else:
        # the GPU forced pass is a tensor-core kernel: fp32 is refused before any
        # kernel (the layer takes the combine path there), 16-bit runs it
        with pytest.raises(ValueError, match="forced_combine on CUDA needs bfloat16/float16"):
            msa_py.forced_combine(q, k, v, o_pf, lse_pf, cq, ck, block_size=BS)
        qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
        o_pb, lse_pb = msa_py.block_attention(qb, kb, vb, inv_f, cq, ck, topk=TOPK, block_size=BS)
        o4, l4 = msa_py.forced_combine(qb, kb, vb, o_pb, lse_pb, cq, ck, block_size=BS)
        rob, rlb = R.sparse_attention(*(np64(x) for x in (qb, kb, vb)), bid.cpu().numpy(), c.cu_q, c.cu_k,
                                      block_size=BS)
        assert Vf.rel_err(np64(o4), rob) < Vf.tolerance("bfloat16") and Vf.rel_err(np64(l4), rlb) < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_inputs(dtype, torch_device):
    c = make_case(21, [(60, 90), (45, 45)], HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device, dtype)
    out, lse = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS, scale=0.11)
    assert out.dtype == TDT[dtype]
    # the selection the op used (its third output: the same compiled model, no select graph per dtype)
    bid = torch.ops.msa.msa_attention(q, k, v, qi, ki, cq, ck, TOPK, BS, 1, 2, 0.11, 1 / DI**0.5, 64)[2]
    r = [np64(x) for x in (q, k, v)]
    ro, rl = R.sparse_attention(*r, bid.cpu().numpy(), c.cu_q, c.cu_k, block_size=BS, scale=0.11)
    assert Vf.rel_err(np64(out), ro) < Vf.tolerance(dtype)
    assert Vf.rel_err(np64(lse), rl) < 1e-4


def test_no_recompile_for_new_lengths(torch_device):
    outs = []
    for seqs in ([(33, 33)], [(100, 140), (7, 7)], [(5, 300)]):
        c = make_case(22, seqs, HQ, HKV, D, DI)
        outs.append(msa_py.msa_attention(*tensors(c, torch_device), topk=TOPK, block_size=BS))
    dev = "cpu" if torch_device == "cpu" else "gpu:0"
    # one model per kernel family: the general path, and (T <= 8 * B, e.g. 5
    # queries over 300 keys on the CPU) the decode path
    for decode in (False, True):
        keys = [key for key in E.cached_models() if key[0] == "msa" and key[2] == dev and key[1].num_heads == HQ
                and key[1].dtype == "float32" and key[1].topk == TOPK and key[1].decode == decode]
        assert len(keys) <= 1, keys
        for key in keys:
            assert sum(1 for log in E.compile_log if log[0] == "msa" and log[1] == key[1] and log[2] == dev) == 1
    assert any(key[0] == "msa" and key[2] == dev and not key[1].decode for key in E.cached_models())


def test_torch_compile_fullgraph(torch_device):
    class Layer(torch.nn.Module):
        def forward(self, q, k, v, qi, ki, cq, ck):
            out, _ = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
            return out * 2

    c = make_case(23, [(50, 64), (30, 30)], HQ, HKV, D, DI)
    args = tensors(c, torch_device)
    eager = Layer()(*args)
    compiled = torch.compile(Layer(), fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)


def test_opcheck(torch_device):
    c = make_case(24, [(40, 40)], HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device)
    torch.library.opcheck(torch.ops.msa.msa_attention.default,
                          (q, k, v, qi, ki, cq, ck, TOPK, BS, 1, 2, 0.125, 1 / math.sqrt(DI), 64),
                          test_utils=("test_schema", "test_faketensor"))


def test_cuda_graph_capture(torch_device):
    if torch_device != "cuda":
        pytest.skip("CUDA graphs need --device cuda")
    c = make_case(25, [(300, 300)], HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, "cuda")
    ref, _ = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)  # compile + warm up
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
    q.copy_(q * 0.5)
    g.replay()
    torch.cuda.synchronize()
    ro, _ = R.msa_attention(np64(q), c.k, c.v, c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=TOPK, block_size=BS)
    assert Vf.rel_err(np64(out), ro) < 1e-5


# --------------------------------------------------------------------------- errors before any kernel
def test_errors(torch_device):
    c = make_case(26, [(20, 40), (10, 10)], HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device)
    call = lambda **o: msa_py.msa_attention(  # noqa: E731
        o.get("q", q), o.get("k", k), o.get("v", v), o.get("qi", qi), o.get("ki", ki), o.get("cq", cq),
        o.get("ck", ck), topk=o.get("topk", TOPK), block_size=o.get("bs", BS))
    cases = [
        ("q must have rank 3", dict(q=q[None])),
        ("multiple of KV heads", dict(q=q[:, :3].contiguous())),
        ("k must have", dict(k=k[:, :, :32].contiguous())),
        ("same dtype", dict(k=k.half())),
        ("floating dtype", dict(q=q.int())),
        ("int32", dict(cq=cq.long())),
        ("must start at 0", dict(cq=cq + 1)),
        ("more queries", dict(cq=torch.tensor([0, 5, 30], dtype=torch.int32, device=cq.device))),
        ("end at", dict(ck=torch.tensor([0, 40, 49], dtype=torch.int32, device=ck.device))),
        ("given together", dict(ck=None)),
        ("topk", dict(topk=0)),
        ("block_size", dict(bs=24)),
        ("contiguous", dict(q=q.transpose(0, 1).contiguous().transpose(0, 1))),
        ("q_idx", dict(qi=qi[:10])),
    ]
    for needle, over in cases:
        with pytest.raises(ValueError, match=needle):
            call(**over)
            print("no error for", needle)
    with pytest.raises(ValueError, match="requires grad"):  # the selection is a constant: no gradient for q_idx
        call(qi=qi.clone().requires_grad_(True))
    with torch.no_grad():
        call(qi=qi.clone().requires_grad_(True))  # fine without autograd
    if torch_device == "cuda":
        with pytest.raises(ValueError, match="device"):
            call(k=k.cpu())


def test_bitwise_deterministic(torch_device):
    """Same inputs, same bits, run after run (the combine order is fixed by slot)."""
    c = make_case(27, [(200, 260), (64, 64)], HQ, HKV, D, DI)
    args = tensors(c, torch_device, "bfloat16")
    first = msa_py.msa_attention(*args, topk=TOPK, block_size=BS)
    for _ in range(3):
        again = msa_py.msa_attention(*args, topk=TOPK, block_size=BS)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_chunked_prefill_matches_one_call(torch_device):
    """A prompt prefilled as query chunks over the growing prefix (README,
    Memory) gives the one-call answer: same selection, same keys per query."""
    c = make_case(28, [(150, 150)], HQ, HKV, D, DI)
    q, k, v, qi, ki, _, _ = tensors(c, torch_device)
    out, lse = msa_py.msa_attention(q, k, v, qi, ki, topk=TOPK, block_size=BS)
    parts = [msa_py.msa_attention(q[c0:c1], k[:c1], v[:c1], qi[c0:c1], ki[:c1], topk=TOPK, block_size=BS)
             for c0, c1 in ((0, 64), (64, 128), (128, 150))]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), lse, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- decode
def test_decode_path(torch_device):
    """A few new tokens per sequence take the decode kernels (indexer split
    over keys, query-major attention): same answers as the reference, no
    host sync (CUDA-graph capture on a GPU)."""
    seqs = [(1, 9), (3, 300), (1, 1), (2, 130), (1, 77)]  # T = 8 <= 8 * B
    c = make_case(28, seqs, HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device, "bfloat16")
    out, lse = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
    dev = "cpu" if torch_device == "cpu" else "gpu:0"
    assert any(key[0] == "msa" and key[1].decode and key[2] == dev for key in E.cached_models())
    bid = torch.ops.msa.msa_attention(q, k, v, qi, ki, cq, ck, TOPK, BS, 1, 2, 1 / D**0.5, 1 / DI**0.5, 64)[2]
    r = [np64(x) for x in (q, k, v, qi, ki)]
    rep = Vf.selection_report(bid.cpu().numpy(), r[3], r[4], c.cu_q, c.cu_k, block_size=BS, init_blocks=1,
                              local_blocks=2, idx_scale=1 / math.sqrt(DI))
    assert not rep["bad"], rep
    ro, rl = R.sparse_attention(*r[:3], bid.cpu().numpy(), c.cu_q, c.cu_k, block_size=BS)
    assert Vf.rel_err(np64(out), ro) < Vf.tolerance("bfloat16") and Vf.rel_err(np64(lse), rl) < 1e-4
    o2, l2 = msa_py.sparse_attention(q, k, v, bid, cq, ck, block_size=BS)
    assert torch.equal(o2, out) and torch.equal(l2, lse)
    # the fused decode attention skips unused slots (-1) wherever they are, as the reference does
    holes = bid.clone()
    holes[:, 1, 0] = -1
    holes[:, 3, 1] = -1
    o4, l4 = msa_py.sparse_attention(q, k, v, holes, cq, ck, block_size=BS)
    ro4, rl4 = R.sparse_attention(*r[:3], holes.cpu().numpy(), c.cu_q, c.cu_k, block_size=BS)
    assert Vf.rel_err(np64(o4), ro4) < Vf.tolerance("bfloat16") and Vf.rel_err(np64(l4), rl4) < 1e-4
    if torch_device == "cuda":
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            o3, l3 = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(o3, out) and torch.equal(l3, lse)


def test_int32_limit_refused_on_real_tensors(torch_device):
    """T * Hq * topk past 2**31 - 1 (the lse_partial index) is refused before
    any kernel; the partials of such a call would not fit on an 80 GB card."""
    if torch_device != "cuda":
        pytest.skip("allocates 4 GB: GPU only (the CPU check is in test_errors)")
    Hq, topk = 64, 16
    T = (2**31) // (Hq * topk) + 1
    q = torch.empty((T, Hq, 16), dtype=torch.bfloat16, device="cuda")
    kv = torch.empty((T, 1, 16), dtype=torch.bfloat16, device="cuda")
    qi = torch.empty((T, 1, 16), dtype=torch.bfloat16, device="cuda")
    ki = torch.empty((T, 16), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="int32"):
        msa_py.msa_attention(q, kv, kv, qi, ki, topk=topk)


def test_block_ids_values(torch_device, monkeypatch):
    """Ids past the query's own block or below -1 are refused before any
    kernel runs; with the value checks off (MSA_SKIP_VALUE_CHECKS,
    or under CUDA-graph capture) the kernels ignore out-of-range ids, as -1,
    and read nothing past a sequence's keys."""
    c = make_case(3, SHAPES[2], HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device)
    bid = msa_py.select_blocks(qi, ki, cq, ck, topk=TOPK, block_size=BS)
    out, lse = msa_py.sparse_attention(q, k, v, bid, cq, ck, block_size=BS)
    b = bid.cpu().numpy()
    # query 0 sits at key 80 of 100 (own block 5) and fills its 3 slots; the
    # first sequence's last query t_last sits at key 99 (own block 6)
    assert (b[:, 0] >= 0).all()
    t_last = int(c.cu_q[1]) - 1
    bad_cases = [
        (0, 0, 2, 6),  # after query 0's own block
        (1, 3, 0, -7),  # below -1
    ]
    for g, t, s, val in bad_cases:
        x = b.copy()
        x[g, t, s] = val
        xt = torch.from_numpy(x).to(torch_device)
        with pytest.raises(ValueError, match="block_ids"):
            msa_py.sparse_attention(q, k, v, xt, cq, ck, block_size=BS)
        with pytest.raises(ValueError, match="block_ids"):
            msa_py.invert(xt, cq, ck, block_size=BS)
        with pytest.raises(ValueError, match="block_ids"):
            R.sparse_attention(c.q, c.k, c.v, x, c.cu_q, c.cu_k, block_size=BS)
    # checks off: ids past the own block (even past the sequence: block 40) act as -1
    monkeypatch.setenv("MSA_SKIP_VALUE_CHECKS", "1")
    x = b.copy()
    x[:, 0, 2] = 40
    x[:, t_last, 1] = 7
    as_pad = b.copy()
    as_pad[:, 0, 2] = -1
    as_pad[:, t_last, 1] = -1
    o_x, l_x = msa_py.sparse_attention(q, k, v, torch.from_numpy(x).to(torch_device), cq, ck, block_size=BS)
    o_p, l_p = msa_py.sparse_attention(q, k, v, torch.from_numpy(as_pad).to(torch_device), cq, ck, block_size=BS)
    assert torch.equal(o_x, o_p) and torch.equal(l_x, l_p)
    assert not torch.equal(l_p, lse)  # the replaced slots mattered


def test_workspace_split_is_the_one_call_answer(torch_device):
    """msa_attention under a workspace budget too small for the call: whole
    sequences grouped into pieces, a long one sliced into query ranges over
    its key prefix, down to one query a piece: the same bits as one call,
    and the same gradients."""
    from msa_py import _validate as V

    seqs = [(10, 40), (150, 150), (30, 30), (64, 90)]
    c = make_case(28, seqs, HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device)
    one, lse1 = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
    per_q = V.workspace_bytes_per_query(HQ, HKV, D, TOPK, 4, k.shape[0], BS, 64)
    for budget in (1, 37 * per_q, 100 * per_q):
        out, lse = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS, max_workspace_bytes=budget)
        assert torch.equal(out, one) and torch.equal(lse, lse1)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    msa_py.msa_attention(*leaves, qi, ki, cq, ck, topk=TOPK, block_size=BS,
                         max_workspace_bytes=37 * per_q)[0].square().sum().backward()
    ref = [x.clone().requires_grad_(True) for x in (q, k, v)]
    msa_py.msa_attention(*ref, qi, ki, cq, ck, topk=TOPK, block_size=BS)[0].square().sum().backward()
    for a, b in zip(leaves, ref):
        assert Vf.rel_err(np64(a.grad), np64(b.grad)) < 1e-6  # dk, dv: pieces sum in another order
    with pytest.raises(ValueError, match="max_workspace_bytes"):
        msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS, max_workspace_bytes=0)


def test_split_queries_covers_every_query_once():
    from msa_py import _validate as V

    tq, tk = [3, 0, 50, 7, 7, 120], [5, 4, 60, 7, 20, 120]
    for mq in (1, 7, 16, 64, 1000):
        pieces = V.split_queries(tq, tk, mq)
        rows = []
        for b0, b1, sl in pieces:
            n = sum(tq[b0:b1]) if sl is None else sl[1] - sl[0]
            assert n <= mq or (sl is None and b1 - b0 == 1 and tq[b0] <= mq)
            start = sum(tq[:b0]) + (0 if sl is None else sl[0])
            rows += list(range(start, start + n))
        assert rows == list(range(sum(tq)))
