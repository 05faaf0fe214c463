"""Property-based tests (hypothesis), bounded so CI stays fast.

1. The reference against the brute-force oracle over random configurations
   (batch composition, GQA ratio, D, Di, topk, block size, sinks, locals).
2. The Mojo kernels (CPU path, one compiled model) against the reference over
   random batch compositions: 1-token sequences, lengths just under and over
   block multiples, sequences shorter than topk blocks, chunked prefill.
A failure prints the falsifying example (hypothesis does), which reproduces it.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_py import engine as E
from msa_py import reference as R
from msa_py import verify as Vf

from cases import make_case
from oracle import mask_from_block_ids, masked_attention, select_oracle


@st.composite
def batches(draw, max_seqs=4, max_len=80, block=16):
    n = draw(st.integers(1, max_seqs))
    seqs = []
    for _ in range(n):
        near = draw(st.sampled_from([None, -1, 0, 1]))  # just under / at / over a block multiple
        tk = draw(st.integers(1, max_len)) if near is None else max(1, block * draw(st.integers(1, 4)) + near)
        tq = draw(st.integers(1, tk))
        seqs.append((tq, tk))
    return seqs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=batches(),
    hkv=st.sampled_from([1, 2]),
    g=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([16, 32]),
    di=st.sampled_from([8, 16]),
    topk=st.integers(1, 5),
    bs=st.sampled_from([16, 32]),
    init=st.integers(0, 2),
    local=st.integers(0, 3),
    q_budget=st.sampled_from([1, 3, 64]),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_oracle(seqs, hkv, g, d, di, topk, bs, init, local, q_budget, seed):
    c = make_case(seed, seqs, hkv * g, hkv, d, di)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=topk, block_size=bs, init_blocks=init,
                          local_blocks=local)
    np.testing.assert_array_equal(bid, select_oracle(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk, bs, init, local))
    out, lse = R.sparse_attention(c.q, c.k, c.v, bid, c.cu_q, c.cu_k, block_size=bs)
    ro, rl = masked_attention(c.q, c.k, c.v, mask_from_block_ids(bid, c.cu_q, c.cu_k, bs))
    np.testing.assert_allclose(out, ro, atol=1e-12)
    np.testing.assert_allclose(lse, rl, atol=1e-12)
    inv = R.invert(bid, c.cu_q, c.cu_k, block_size=bs, q_budget=q_budget)
    assert (inv.work[:, 3] >= 1).all() and (inv.work[:, 3] <= q_budget).all()
    np.testing.assert_array_equal(R.block_ids_from_inversion(inv, c.cu_q, c.cu_k, topk), bid)
    if 0 < init + local <= topk:  # the layer's decomposition: forced blocks out of the inversion, into forced_combine
        kw = dict(block_size=bs, init_blocks=init, local_blocks=local)
        inv_f = R.invert(bid, c.cu_q, c.cu_k, q_budget=q_budget, **kw)
        o_p, lse_p = R.block_attention(c.q, c.k, c.v, inv_f, c.cu_q, c.cu_k, topk=topk, block_size=bs)
        fo, fl = R.forced_combine(c.q, c.k, c.v, o_p, lse_p, c.cu_q, c.cu_k, **kw)
        np.testing.assert_allclose(fo, ro, atol=1e-12)
        np.testing.assert_allclose(fl, rl, atol=1e-12)


SPEC = E.Spec(dtype="float32", num_heads=4, num_kv_heads=2, head_dim=32, idx_dim=16, topk=3, block_size=16,
              init_blocks=1, local_blocks=1, q_budget=4)


def run_stages(c, kind="stages"):
    """Every stage's output for a Case through the compiled SPEC model (CPU);
    kind "decode_stages": block_ids, out, lse of the decode kernels."""
    ins = E.numpy_inputs(SPEC, "cpu", q=c.q, k=c.k, v=c.v, q_idx=c.q_idx, k_idx=c.k_idx, cu_q=c.cu_q, cu_k=c.cu_k,
                         scale=np.array([0.2], np.float32), idx_scale=np.array([0.25], np.float32))
    return [E.to_numpy(o) for o in E.run(kind, SPEC, "cpu", ins)]


def check_decode_against_general(c):
    """The decode kernels (indexer split over keys, query-major attention
    with the merge fused) give the reference's selection and output, and the
    general path's."""
    g = run_stages(c)
    bid, out, lse = run_stages(c, "decode_stages")
    ref_bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=3, block_size=16, init_blocks=1,
                              local_blocks=1, idx_scale=0.25)
    np.testing.assert_array_equal(bid, ref_bid)
    np.testing.assert_array_equal(bid, g[0])
    ro, rl = R.sparse_attention(c.q, c.k, c.v, bid, c.cu_q, c.cu_k, block_size=16, scale=0.2)
    assert Vf.rel_err(out, ro) < 1e-5 and Vf.rel_err(lse, rl) < 1e-5
    assert Vf.rel_err(out, g[8]) < 1e-5 and Vf.rel_err(lse, g[9]) < 1e-5
    assert (np.isneginf(lse) == np.isneginf(rl)).all()  # a query with no visible key: lse -inf, out 0
    assert not np.isnan(out).any()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=batches(max_seqs=5, max_len=70), seed=st.integers(0, 2**16))
def test_kernels_match_reference_on_random_batches(seqs, seed):
    c = make_case(seed, seqs, SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim, SPEC.idx_dim)
    outs = run_stages(c)
    bid, out, lse = outs[0], outs[-2], outs[-1]
    ref_bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=3, block_size=16, init_blocks=1,
                              local_blocks=1, idx_scale=0.25)
    rep = Vf.selection_report(bid, c.q_idx, c.k_idx, c.cu_q, c.cu_k, block_size=16, init_blocks=1, local_blocks=1,
                              idx_scale=0.25)
    assert not rep["bad"], (rep, bid, ref_bid)
    ro, rl = R.sparse_attention(c.q, c.k, c.v, bid, c.cu_q, c.cu_k, block_size=16, scale=0.2)
    assert Vf.rel_err(out, ro) < 1e-5 and Vf.rel_err(lse, rl) < 1e-5


def test_kernels_nan_and_inf_inputs_stay_in_range():
    """NaN index scores act as -inf (the block stays selectable, ranks last);
    ids always lie in the query's own sequence, as in the reference."""
    c = make_case(3, [(60, 60), (20, 50)], SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim, SPEC.idx_dim)
    c.q_idx[5] = np.nan
    c.q_idx[70, 1, 3] = np.nan
    c.k_idx[20] = np.inf
    c.k_idx[90, 2] = -np.inf
    ref = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=3, block_size=16, init_blocks=1, local_blocks=1,
                          idx_scale=0.25)
    np.testing.assert_array_equal(run_stages(c)[0], ref)
    np.testing.assert_array_equal(run_stages(c, "decode_stages")[0], ref)  # and the decode indexer


def test_kernels_are_deterministic():
    c = make_case(4, [(70, 90), (33, 33)], SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim, SPEC.idx_dim)
    a = run_stages(c)
    b = run_stages(c)
    nw = int(a[5][0])
    a[4], b[4] = a[4][:nw], b[4][:nw]  # work items past num_work are unspecified
    used = np.isfinite(a[7])[..., None]  # so are partials of unused slots
    a[6], b[6] = np.where(used, a[6], 0), np.where(used, b[6], 0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=batches(max_seqs=5, max_len=70), seed=st.integers(0, 2**16))
def test_decode_kernels_match_reference_on_random_batches(seqs, seed):
    """Random batches, including sequences with more queries than the decode
    indexer scores in its tile (max_q): those take its direct path."""
    check_decode_against_general(make_case(seed, seqs, SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim,
                                           SPEC.idx_dim))


@pytest.mark.parametrize("n_new", [1, 3, 8, 12])
def test_decode_kernels_decode_shapes(n_new):
    contexts = [1, 9, 16, 40, 130, 300]
    seqs = [(min(n_new, tk), tk) for tk in contexts]
    check_decode_against_general(make_case(60 + n_new, seqs, SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim,
                                           SPEC.idx_dim))


@pytest.mark.parametrize("n_new", [1, 3, 8])
def test_kernels_decode_shapes(n_new):
    """Decode / speculative decoding: n_new new queries per sequence over ragged
    caches, including caches shorter than topk blocks."""
    contexts = [9, 16, 40, 130, 300]
    seqs = [(min(n_new, tk), tk) for tk in contexts]
    c = make_case(40 + n_new, seqs, SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim, SPEC.idx_dim)
    outs = run_stages(c)
    bid, out, lse = outs[0], outs[-2], outs[-1]
    ref_bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=3, block_size=16, init_blocks=1,
                              local_blocks=1, idx_scale=0.25)
    np.testing.assert_array_equal(bid, ref_bid)
    ro, rl = R.sparse_attention(c.q, c.k, c.v, bid, c.cu_q, c.cu_k, block_size=16, scale=0.2)
    assert Vf.rel_err(out, ro) < 1e-5 and Vf.rel_err(lse, rl) < 1e-5


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=batches(max_seqs=5, max_len=70), seed=st.integers(0, 2**16))
def test_decode_attention_on_any_causal_block_ids(seqs, seed):
    """The fused decode attention (sparse_attention's decode path) on block_ids
    no selection would write: any causal blocks in any slot order, repeats,
    and unused slots (-1) anywhere. Same as the reference: each slot is one
    split of the query's softmax."""
    from dataclasses import replace

    c = make_case(seed, seqs, SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim, SPEC.idx_dim)
    rng = np.random.default_rng(seed)
    T, topk, bs = c.q.shape[0], SPEC.topk, SPEC.block_size
    _, pos, _ = R._positions(c.cu_q, c.cu_k)
    jq = pos // bs
    bid = rng.integers(0, jq[None, :, None] + 1, size=(SPEC.num_kv_heads, T, topk)).astype(np.int32)
    bid[rng.random(bid.shape) < 0.3] = -1
    spec = replace(SPEC, decode=True)
    ins = E.numpy_inputs(spec, "cpu", q=c.q, k=c.k, v=c.v, block_ids=bid, cu_q=c.cu_q, cu_k=c.cu_k,
                         scale=np.array([0.2], np.float32))
    out, lse = (E.to_numpy(o) for o in E.run("sparse", spec, "cpu", ins))
    ro, rl = R.sparse_attention(c.q, c.k, c.v, bid, c.cu_q, c.cu_k, block_size=bs, scale=0.2)
    assert Vf.rel_err(out, ro) < 1e-5
    assert (np.isneginf(lse) == np.isneginf(rl)).all()  # every slot unused: lse -inf, out 0
    fin = np.isfinite(rl)
    np.testing.assert_allclose(lse[fin], rl[fin], rtol=1e-5, atol=1e-5)
    assert not np.isnan(out).any() and (out[~fin] == 0).all()


def test_decode_attention_propagates_nan_inputs():
    """A NaN in q, k or v reaches exactly the outputs the reference makes NaN
    through the fused decode attention (out and lse of the row for a NaN
    score, the column for a NaN value); no split is dropped as empty."""
    from dataclasses import replace

    seqs = [(3, 40), (1, 130), (8, 300)]
    c = make_case(11, seqs, SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim, SPEC.idx_dim)
    bs, G = SPEC.block_size, SPEC.num_heads // SPEC.num_kv_heads  # keys of the sequences start at 0, 40, 170
    q, k, v = c.q.copy(), c.k.copy(), c.v.copy()
    q[1, G, 2] = np.nan  # sequence 0, query 1, a head of group 1
    k[40 + 5, 0, 3] = np.nan  # sequence 1, key 5 (block 0, a sink): every head of group 0
    v[170, SPEC.num_kv_heads - 1, 4] = np.nan  # sequence 2, key 0 (the sink): column 4 of the last group
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=SPEC.topk, block_size=bs,
                          init_blocks=SPEC.init_blocks, local_blocks=SPEC.local_blocks, idx_scale=0.25)
    spec = replace(SPEC, decode=True)
    ins = E.numpy_inputs(spec, "cpu", q=q, k=k, v=v, block_ids=bid, cu_q=c.cu_q, cu_k=c.cu_k,
                         scale=np.array([0.2], np.float32))
    out, lse = (E.to_numpy(o) for o in E.run("sparse", spec, "cpu", ins))
    ro, rl = R.sparse_attention(q, k, v, bid, c.cu_q, c.cu_k, block_size=bs, scale=0.2)
    assert np.isnan(rl[1, G]) and np.isnan(rl[3, :G]).all()  # the reference sees the NaNs
    assert np.isnan(ro[4:, -G:, 4]).all() and not np.isnan(ro[4:, -G:, 5]).any()
    assert Vf.rel_err(out, ro) < 1e-5  # NaN exactly where the reference has it, the rest close
    assert Vf.rel_err(lse, rl) < 1e-5
