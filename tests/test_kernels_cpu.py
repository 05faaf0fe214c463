"""Every Mojo op (CPU path) against msa_py.reference, through the MAX graph.

One compiled "stages" model per static configuration (shared by all shapes:
T, S, B are symbolic) returns every stage's output; each stage is checked on
the previous stage's kernel output, so a failure names the op.
"""
import math

import numpy as np
import pytest

from msa_py import engine as E
from msa_py import reference as R
from msa_py import verify as Vf
from msa_py.check import make_inputs

# (id, spec kwargs, [seqs...])
CONFIGS = [
    ("g1_d64_di32_f32", dict(dtype="float32", num_heads=4, num_kv_heads=4, head_dim=64, idx_dim=32, topk=3,
                              block_size=16, q_budget=2),
     [[(77, 77)], [(40, 40), (1, 1), (33, 50), (0, 9), (70, 70)], [(20, 100), (16, 16)]]),
    ("g4_d128_di128_bf16", dict(dtype="bfloat16", num_heads=8, num_kv_heads=2, head_dim=128, idx_dim=128, topk=4,
                                 block_size=32, q_budget=3),
     [[(200, 200)], [(31, 100), (65, 65), (1, 7)]]),
    ("g16_d128_di32_f32", dict(dtype="float32", num_heads=16, num_kv_heads=1, head_dim=128, idx_dim=32, topk=2,
                                block_size=16, init_blocks=2, local_blocks=1, q_budget=64),
     [[(90, 90), (17, 40)]]),
]


def _run(spec, seqs, seed):
    a, T, S, B = make_inputs(seed, seqs, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.idx_dim, spec.dtype)
    scale, idx_scale = 1 / math.sqrt(spec.head_dim), 1 / math.sqrt(spec.idx_dim)
    ins = E.numpy_inputs(spec, "cpu", **a, scale=np.array([scale], np.float32),
                         idx_scale=np.array([idx_scale], np.float32))
    outs = [E.to_numpy(o) for o in E.run("stages", spec, "cpu", ins)]
    return a, outs, scale, idx_scale


@pytest.mark.parametrize("cid,kw,shapes", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_stages_against_reference(cid, kw, shapes):
    spec = E.Spec(**kw)
    tol = Vf.tolerance(spec.dtype)
    n_compiles = len(E.compile_log)
    for i, seqs in enumerate(shapes):
        a, outs, scale, idx_scale = _run(spec, seqs, seed=10 + i)
        bid, roff, row_ptr, entries, work, num_work, o_p, lse_p, out, lse = outs
        # select: exact match with the float64 reference (near ties allowed)
        rep = Vf.selection_report(bid, a["q_idx"], a["k_idx"], a["cu_q"], a["cu_k"], block_size=spec.block_size,
                                  init_blocks=spec.init_blocks, local_blocks=spec.local_blocks, idx_scale=idx_scale)
        assert not rep["bad"], rep
        assert rep["exact"] >= 0.99 * rep["rows"]
        # invert: exact, on the kernel's block_ids (without the forced blocks where the forced pass runs)
        forced = E.uses_forced_pass(spec, "cpu")
        assert forced == (cid != "g16_d128_di32_f32")  # topk 2 < 3 forced blocks: the plain pipeline
        skip = dict(init_blocks=spec.init_blocks, local_blocks=spec.local_blocks) if forced else {}
        inv = R.invert(bid, a["cu_q"], a["cu_k"], block_size=spec.block_size, q_budget=spec.q_budget, **skip)
        nr = inv.row_ptr.shape[1]
        np.testing.assert_array_equal(roff, inv.row_offsets)
        np.testing.assert_array_equal(row_ptr[:, :nr], inv.row_ptr)
        assert (row_ptr[:, nr:] == inv.row_ptr[:, -1:]).all()
        np.testing.assert_array_equal(entries, inv.entries)
        assert int(num_work[0]) == int(inv.num_work[0])
        np.testing.assert_array_equal(work[: int(num_work[0])], inv.work)
        # block attention: partials on the kernel's inversion
        ref_op, ref_lp = R.block_attention(a["q"], a["k"], a["v"], inv, a["cu_q"], a["cu_k"], topk=spec.topk,
                                           block_size=spec.block_size, scale=scale)
        used = np.isfinite(ref_lp)
        assert np.array_equal(np.isfinite(lse_p), used), "unused slots must carry lse -inf"
        assert Vf.rel_err(np.where(used[..., None], o_p, 0), ref_op) < tol
        assert Vf.rel_err(lse_p, ref_lp) < 1e-5
        # combine (or the forced pass): on the kernel's partials
        if forced:
            ref_out, ref_lse = R.forced_combine(a["q"], a["k"], a["v"], np.where(used[..., None], o_p, 0), lse_p,
                                                a["cu_q"], a["cu_k"], block_size=spec.block_size, scale=scale, **skip)
        else:
            ref_out, ref_lse = R.combine(np.where(used[..., None], o_p, 0), lse_p)
        assert Vf.rel_err(out, ref_out) < max(tol / 4, 1e-5)
        assert Vf.rel_err(lse, ref_lse) < 1e-5
        # end to end
        ro, rl = R.sparse_attention(a["q"], a["k"], a["v"], bid, a["cu_q"], a["cu_k"], block_size=spec.block_size,
                                    scale=scale)
        assert Vf.rel_err(out, ro) < tol
        assert Vf.rel_err(lse, rl) < 1e-5
    # one compiled model served every shape
    assert len(E.compile_log) - n_compiles <= 1
    assert ("stages", spec, "cpu") in E.cached_models()


def test_msa_graph_end_to_end_and_topk_covering_all_is_dense():
    spec = E.Spec(**CONFIGS[0][1])
    for seqs in ([(48, 48)], [(10, 40), (30, 30)]):
        a, T, S, B = make_inputs(3, seqs, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.idx_dim, spec.dtype)
        ins = E.numpy_inputs(spec, "cpu", **a, scale=np.array([0.1], np.float32), idx_scale=np.array([0.3], np.float32))
        out, lse = (E.to_numpy(o) for o in E.run("msa", spec, "cpu", {n: ins[n] for n in E.INPUTS["msa"]})[:2])
        ro, rl = R.msa_attention(a["q"], a["k"], a["v"], a["q_idx"], a["k_idx"], a["cu_q"], a["cu_k"], topk=spec.topk,
                                 block_size=spec.block_size, scale=0.1, idx_scale=0.3)
        assert Vf.rel_err(out, ro) < 1e-5 and Vf.rel_err(lse, rl) < 1e-5
        # 3 blocks of 16 cover 48 keys: topk 3 selects everything -> dense causal
        do, dl = R.dense_attention(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], scale=0.1)
        assert Vf.rel_err(out, do) < 1e-5 and Vf.rel_err(lse, dl) < 1e-5


@pytest.mark.parametrize("cid", ["g1_d64_di32_f32", "g16_d128_di32_f32"])
def test_nan_inputs_propagate_as_in_dense_attention(cid):
    """A NaN in q, k or v reaches exactly the outputs that dense attention
    makes NaN (no row silently dropped to 0 / -inf): through the forced pass
    (g1) and through the plain pipeline's combine (g16)."""
    kw = dict(next(c[1] for c in CONFIGS if c[0] == cid))
    spec = E.Spec(**kw)
    a, T, S, B = make_inputs(4, [(48, 48)], spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.idx_dim,
                             spec.dtype)
    G = spec.num_heads // spec.num_kv_heads
    a["q"][5, 1, 3] = np.nan  # one (query, head) row
    # (block 1 holds key 20, block 2 key 32: both are forced for every query
    # past them in these configurations, so "sees the key" is position alone)
    a["k"][20, 0, 7] = np.nan  # a key of group 0: every later query of its heads
    # a value at the first key of a block: column 2 of the queries that see it
    # (mid-block, the GPU's tensor cores would also reach the block's earlier
    # queries, 0 * NaN, as in FlashAttention)
    a["v"][32, spec.num_kv_heads - 1, 2] = np.nan
    ins = E.numpy_inputs(spec, "cpu", **a, scale=np.array([0.1], np.float32), idx_scale=np.array([0.3], np.float32))
    bid, roff, row_ptr, entries, work, num_work, o_p, lse_p, out, lse = (
        E.to_numpy(o) for o in E.run("stages", spec, "cpu", ins)
    )
    ro, rl = R.sparse_attention(a["q"], a["k"], a["v"], bid, a["cu_q"], a["cu_k"], block_size=spec.block_size,
                                scale=0.1)
    t = np.arange(T)[:, None]
    h = np.arange(spec.num_heads)[None, :]
    want_row_nan = ((t == 5) & (h == 1)) | ((t >= 20) & (h // G == 0))
    np.testing.assert_array_equal(np.isnan(rl), want_row_nan)
    col2 = (t >= 32) & (h // G == spec.num_kv_heads - 1)
    np.testing.assert_array_equal(np.isnan(ro).any(-1), want_row_nan | col2)
    if spec.topk * spec.block_size >= T:  # every block selected: dense attention, NaN for NaN
        do, dl = R.dense_attention(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], scale=0.1)
        np.testing.assert_array_equal(np.isnan(do), np.isnan(ro))
        np.testing.assert_array_equal(np.isnan(dl), np.isnan(rl))
    # the kernels: the same NaN entries, the rest within tolerance
    assert Vf.rel_err(out, ro) < Vf.tolerance(spec.dtype)
    assert Vf.rel_err(lse, rl) < 1e-5


def test_exact_tie_family_selects_as_the_reference():
    """msa_py.check's exact-tie family (index inputs that are small multiples
    of a power of two, so block scores tie exactly) on the CPU kernels: the
    selection equals the float64 reference's exactly, ties to the lower block
    id, for the prefill indexer at the shape where the GPU's SIMT indexer once
    broke a tie and for the decode indexer past its max_q queries too."""
    from msa_py.check import TIE_CONFIGS, check_ties

    lines = []
    configs = [c for c in TIE_CONFIGS if c[0] in ("t_simt_di8_f32", "t_dec_di16_f16")]
    assert check_ties("cpu", cases=16, seed=5, configs=configs, log=lines.append), "\n".join(lines)
    assert lines[-1].startswith("tie family: 16 cases, 0 with")
