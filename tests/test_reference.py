"""msa_py.reference against the brute-force oracle, plus selection/inversion properties."""
import numpy as np
import pytest

from msa_py import reference as R

from cases import make_case
from oracle import mask_from_block_ids, masked_attention, select_oracle

# (name, seqs, Hq, Hkv, D, Di, block_size, topk)
CASES = [
    ("one_seq_odd", [(77, 77)], 4, 4, 64, 32, 16, 3),
    ("ragged", [(40, 40), (1, 1), (33, 50), (0, 9), (70, 70)], 8, 2, 64, 128, 16, 2),
    ("chunked_prefill", [(20, 100), (16, 16)], 16, 1, 128, 32, 32, 2),
    ("gqa16_d128", [(65, 65)], 16, 1, 128, 128, 16, 4),
    ("gqa4", [(48, 120)], 8, 2, 64, 32, 16, 5),
]


@pytest.mark.parametrize("name,seqs,Hq,Hkv,D,Di,bs,topk", CASES)
def test_select_matches_oracle(name, seqs, Hq, Hkv, D, Di, bs, topk):
    c = make_case(1, seqs, Hq, Hkv, D, Di)
    got = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=topk, block_size=bs)
    ref = select_oracle(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk, bs, 1, 2)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name,seqs,Hq,Hkv,D,Di,bs,topk", CASES)
def test_msa_attention_matches_oracle(name, seqs, Hq, Hkv, D, Di, bs, topk):
    c = make_case(2, seqs, Hq, Hkv, D, Di)
    out, lse = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=topk, block_size=bs)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=topk, block_size=bs)
    ref_o, ref_l = masked_attention(c.q, c.k, c.v, mask_from_block_ids(bid, c.cu_q, c.cu_k, bs))
    np.testing.assert_allclose(out, ref_o, atol=1e-12, rtol=1e-10)
    np.testing.assert_allclose(lse, ref_l, atol=1e-12, rtol=1e-10)


def test_stages_compose_to_sparse_attention():
    c = make_case(3, [(50, 90), (64, 64)], 8, 2, 64, 32)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=3, block_size=16)
    inv = R.invert(bid, c.cu_q, c.cu_k, block_size=16, q_budget=7)
    o_p, lse_p = R.block_attention(c.q, c.k, c.v, inv, c.cu_q, c.cu_k, topk=3, block_size=16)
    out, lse = R.combine(o_p, lse_p)
    ref_o, ref_l = R.sparse_attention(c.q, c.k, c.v, bid, c.cu_q, c.cu_k, block_size=16)
    np.testing.assert_allclose(out, ref_o, atol=1e-12)
    np.testing.assert_allclose(lse, ref_l, atol=1e-12)


@pytest.mark.parametrize("topk,init_blocks,local_blocks", [(5, 1, 2), (3, 1, 2), (6, 2, 3), (4, 0, 1), (4, 2, 0)])
def test_forced_pass_composes_to_sparse_attention(topk, init_blocks, local_blocks):
    """The layer's decomposition: the inversion without the forced blocks,
    block attention on the rest, forced_combine."""
    c = make_case(6, [(50, 90), (64, 64), (1, 1), (3, 130)], 8, 2, 64, 32)
    kw = dict(block_size=16, init_blocks=init_blocks, local_blocks=local_blocks)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=topk, **kw)
    inv = R.invert(bid, c.cu_q, c.cu_k, q_budget=7, **kw)
    full = R.invert(bid, c.cu_q, c.cu_k, q_budget=7, block_size=16)
    assert inv.row_ptr[:, -1].sum() < full.row_ptr[:, -1].sum()
    o_p, lse_p = R.block_attention(c.q, c.k, c.v, inv, c.cu_q, c.cu_k, topk=topk, block_size=16)
    out, lse = R.forced_combine(c.q, c.k, c.v, o_p, lse_p, c.cu_q, c.cu_k, **kw)
    ref_o, ref_l = R.sparse_attention(c.q, c.k, c.v, bid, c.cu_q, c.cu_k, block_size=16)
    np.testing.assert_allclose(out, ref_o, atol=1e-12)
    np.testing.assert_allclose(lse, ref_l, atol=1e-12)


def test_no_cu_seqlens_is_one_bottom_right_sequence():
    c = make_case(4, [(30, 70)], 4, 2, 64, 32)
    a = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, topk=2, block_size=16)
    b = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=2, block_size=16)
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("seqs", [[(100, 100)], [(37, 120), (5, 5)]])
def test_topk_covering_all_blocks_is_dense_causal(seqs):
    c = make_case(5, seqs, 8, 2, 64, 32)
    out, lse = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=8, block_size=16)
    ref_o, ref_l = R.dense_attention(c.q, c.k, c.v, c.cu_q, c.cu_k)
    np.testing.assert_allclose(out, ref_o, atol=1e-12)
    np.testing.assert_allclose(lse, ref_l, atol=1e-12)


def test_selection_properties():
    bs, topk, init, local = 16, 4, 2, 3
    c = make_case(6, [(200, 260), (3, 3), (17, 40)], 4, 2, 64, 32)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=topk, block_size=bs,
                          init_blocks=init, local_blocks=local)
    for b in range(len(c.cu_q) - 1):
        tq, tk = c.cu_q[b + 1] - c.cu_q[b], c.cu_k[b + 1] - c.cu_k[b]
        for i in range(tq):
            t = c.cu_q[b] + i
            jq = (tk - tq + i) // bs
            nsel = min(topk, jq + 1)
            for g in range(bid.shape[0]):
                row = bid[g, t]
                assert (row[nsel:] == -1).all(), "-1 padding exactly past the selectable count"
                sel = row[:nsel]
                assert (np.diff(sel) > 0).all(), "ascending ids"
                assert sel.min() >= 0 and sel.max() <= jq
                forced = sorted(set(range(min(init, jq + 1))) | set(range(max(0, jq - local + 1), jq + 1)))
                if len(forced) <= topk:
                    assert set(forced) <= set(sel.tolist()), "sinks and local blocks present"
                else:  # forced blocks score +inf: sinks first, then locals by lower id
                    assert sel.tolist() == forced[:topk]


def test_ties_go_to_lower_block_id():
    # constant index keys: every block scores the same, so the lowest free ids win
    T = S = 160
    q_idx = np.ones((T, 1, 8))
    k_idx = np.ones((S, 8))
    bid = R.select_blocks(q_idx, k_idx, topk=4, block_size=16, init_blocks=1, local_blocks=1)
    # last query: own block 9 (local), sink 0, then ties -> 1, 2
    assert bid[0, -1].tolist() == [0, 1, 2, 9]
    # forcing beyond topk: sinks rank before local blocks
    bid = R.select_blocks(q_idx, k_idx, topk=2, block_size=16, init_blocks=1, local_blocks=3)
    assert bid[0, -1].tolist() == [0, 7]


def test_nan_scores_stay_in_range():
    c = make_case(7, [(64, 64)], 4, 2, 64, 16)
    c.q_idx[5] = np.nan
    c.k_idx[20] = np.inf
    bid = R.select_blocks(c.q_idx, c.k_idx, topk=3, block_size=16)
    p = np.arange(64)
    for g in range(2):
        n = np.minimum(3, p // 16 + 1)
        for t in range(64):
            assert ((bid[g, t, : n[t]] >= 0) & (bid[g, t, : n[t]] <= p[t] // 16)).all()
            assert (bid[g, t, n[t]:] == -1).all()


def test_inversion_round_trip_and_budget():
    c = make_case(8, [(90, 130), (1, 1), (60, 60)], 4, 2, 64, 32)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=4, block_size=16)
    for qb in (1, 5, 64):
        inv = R.invert(bid, c.cu_q, c.cu_k, block_size=16, q_budget=qb)
        assert inv.row_offsets.tolist()[-1] == 9 + 1 + 4
        w = inv.work
        assert int(inv.num_work[0]) == len(w)
        assert (w[:, 3] >= 1).all() and (w[:, 3] <= qb).all()
        np.testing.assert_array_equal(R.block_ids_from_inversion(inv, c.cu_q, c.cu_k, 4), bid)
        for g in range(2):
            nnz = int(inv.row_ptr[g, -1])
            assert nnz == int((bid[g] >= 0).sum())
            for r in range(inv.row_ptr.shape[1] - 1):
                e = inv.entries[g, inv.row_ptr[g, r] : inv.row_ptr[g, r + 1]]
                assert (np.diff(e // 4) > 0).all(), "sorted by query within a row"


def test_work_order_windows():
    """Work items go by group, query window (WINDOW_CHUNKS * q_budget queries),
    row (serpentine), begin; each item stays in one row and one window, and
    the items of a row tile its entries exactly."""
    from msa_py._validate import Config

    topk = 4
    c = make_case(9, [(150, 150), (1, 1), (40, 200), (100, 100)], 4, 2, 64, 32)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=topk, block_size=16)
    for qb in (1, 2, 3):
        win = Config(q_budget=qb).q_window
        inv = R.invert(bid, c.cu_q, c.cu_k, block_size=16, q_budget=qb)
        T, R_rows = c.q.shape[0], inv.row_ptr.shape[1] - 1
        assert -(-T // win) >= 2  # the case spans several windows
        keys, covered = [], np.zeros_like(inv.entries, bool)
        for g, row, b, n in inv.work:
            lo, hi = inv.row_ptr[g, row], inv.row_ptr[g, row + 1]
            assert lo <= b and b + n <= hi
            w = inv.entries[g, b : b + n] // topk // win
            assert (w == w[0]).all(), "an item stays in one window"
            assert not covered[g, b : b + n].any()
            covered[g, b : b + n] = True
            keys.append((g, w[0], row if w[0] % 2 == 0 else R_rows - 1 - row, b))
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        for g in range(inv.row_ptr.shape[0]):
            assert covered[g, : inv.row_ptr[g, -1]].all() and not covered[g, inv.row_ptr[g, -1] :].any()


def test_combine_equals_one_softmax_over_union():
    rng = np.random.default_rng(9)
    T, H, K, D = 5, 3, 4, 8
    # random logits/values per key split into K groups of 6 keys
    s = rng.standard_normal((T, H, K, 6))
    vals = rng.standard_normal((T, H, K, 6, D))
    lse_p = np.log(np.exp(s).sum(-1))
    o_p = np.einsum("thkn,thknd->thkd", np.exp(s - lse_p[..., None]), vals)
    lse_p[0, 0, 1] = -np.inf  # an unused slot
    o_p[0, 0, 1] = np.nan  # must not leak
    out, lse = R.combine(o_p, lse_p)
    keep = np.ones((T, H, K), bool)
    keep[0, 0, 1] = False
    flat_s = np.where(keep[..., None], s, -np.inf).reshape(T, H, -1)
    ref_lse = np.log(np.exp(flat_s).sum(-1))
    ref_out = np.einsum("thn,thnd->thd", np.exp(flat_s - ref_lse[..., None]), vals.reshape(T, H, -1, D))
    np.testing.assert_allclose(lse, ref_lse, atol=1e-12)
    np.testing.assert_allclose(out, ref_out, atol=1e-12)
    # a query with nothing visible: out 0, lse -inf, no NaN
    out, lse = R.combine(np.ones((1, 1, 2, 3)), np.full((1, 1, 2), -np.inf))
    assert lse[0, 0] == -np.inf and (out == 0).all()


def test_reference_4k_is_fast_enough():
    import time
    c = make_case(10, [(4096, 4096)], 8, 2, 64, 64)
    t0 = time.time()
    R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, topk=16)
    assert time.time() - t0 < 30


def _torch_masked_attention(q, k, v, mask, scale):
    """Dense masked attention in torch float64 (autograd's truth): out, lse."""
    import torch

    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kk = k.repeat_interleave(G, dim=1)  # [S, Hq, D]
    vv = v.repeat_interleave(G, dim=1)
    s = scale * torch.einsum("thd,shd->ths", q, kk)
    m = torch.from_numpy(np.repeat(mask, G, axis=0).transpose(1, 0, 2))  # [T, Hq, S]
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("ths,shd->thd", torch.softmax(s, -1), vv), lse


@pytest.mark.parametrize("seqs,Hq,Hkv,bs,topk", [
    ([(40, 40), (7, 30), (1, 1)], 4, 2, 16, 3),  # ragged, chunked, GQA
    ([(50, 50)], 2, 2, 16, 2),
])
def test_backward_matches_torch_autograd_float64(seqs, Hq, Hkv, bs, topk):
    """sparse_attention_backward against torch autograd through a dense masked
    attention in float64 (the oracle's mask), with a gradient on lse too."""
    torch = pytest.importorskip("torch")
    c = make_case(3, seqs, Hq, Hkv, 16, 8)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=topk, block_size=bs, init_blocks=1, local_blocks=1)
    mask = mask_from_block_ids(bid, c.cu_q, c.cu_k, bs)
    rng = np.random.default_rng(4)
    dout = rng.standard_normal(c.q.shape)
    dlse = rng.standard_normal(c.q.shape[:2])
    qt, kt, vt = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (c.q, c.k, c.v))
    out, lse = _torch_masked_attention(qt, kt, vt, mask, 0.25)
    ((out * torch.from_numpy(dout)).sum() + (lse * torch.from_numpy(dlse)).sum()).backward()
    dq, dk, dv = R.sparse_attention_backward(c.q, c.k, c.v, bid, dout, c.cu_q, c.cu_k, dlse=dlse, block_size=bs,
                                             scale=0.25)
    np.testing.assert_allclose(dq, qt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dk, kt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dv, vt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_block_mass_is_the_softmax_share_of_each_block():
    c = make_case(5, [(40, 40), (9, 33)], 4, 2, 16, 8)
    bs = 16
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=3, block_size=bs)
    mass = R.block_mass(c.q, c.k, bid, c.cu_q, c.cu_k, block_size=bs, scale=0.3)
    used = bid >= 0
    assert (mass[~used] == 0).all() and (mass[used] > 0).all()
    np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-12)
    # by hand for one (t, g): softmax over the union of its blocks' visible keys, summed per block
    t, g = 45, 1
    seq, p, _ = R._positions(c.cu_q.astype(np.int64), c.cu_k.astype(np.int64))
    k0 = int(c.cu_k[seq[t]])
    G = 2
    want = np.zeros(3)
    for h in range(g * G, g * G + G):
        keys = [(s, key) for s, j in enumerate(bid[g, t]) if j >= 0 for key in range(j * bs, min((j + 1) * bs, p[t] + 1))]
        sc = np.array([0.3 * c.q[t, h].astype(np.float64) @ c.k[k0 + key, g].astype(np.float64) for _, key in keys])
        w = np.exp(sc - sc.max())
        w /= w.sum()
        for (s, _), x in zip(keys, w):
            want[s] += x / G
    np.testing.assert_allclose(mass[g, t], want, rtol=1e-10)
