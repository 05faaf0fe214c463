"""Every bad input raises a ValueError naming the argument (reference layer)."""
import numpy as np
import pytest

from msa_py import reference as R

from cases import make_case

C = make_case(0, [(20, 40), (10, 10)], 4, 2, 16, 8)


def call_msa(**over):
    a = dict(q=C.q, k=C.k, v=C.v, q_idx=C.q_idx, k_idx=C.k_idx, cu_seqlens_q=C.cu_q, cu_seqlens_k=C.cu_k)
    kw = dict(topk=2, block_size=16)
    for key, val in over.items():  # anything not an array argument is a keyword
        (a if key in a else kw)[key] = val
    return R.msa_attention(a["q"], a["k"], a["v"], a["q_idx"], a["k_idx"], a["cu_seqlens_q"], a["cu_seqlens_k"], **kw)


BAD = [
    ("q", dict(q=C.q[:, :, None])),
    ("k", dict(k=C.k[:, :1])),
    ("q heads", dict(q=C.q[:, :3])),
    ("v", dict(v=C.v[:, :, :8])),
    ("q_idx", dict(q_idx=C.q_idx[:, 0])),
    ("k_idx", dict(k_idx=C.k_idx[:, :4])),
    ("q", dict(q=C.q.astype(np.int32))),
    ("cu_seqlens_q", dict(cu_seqlens_q=np.array([1, 20, 30], np.int32))),
    ("cu_seqlens_q", dict(cu_seqlens_q=np.array([0, 25, 20, 30], np.int32), cu_seqlens_k=np.array([0, 40, 45, 50], np.int32))),
    ("cu_seqlens_k", dict(cu_seqlens_k=np.array([0, 40, 49], np.int32))),
    ("same length", dict(cu_seqlens_q=np.array([0, 30], np.int32))),
    ("more queries", dict(cu_seqlens_q=np.array([0, 25, 30], np.int32), cu_seqlens_k=np.array([0, 20, 50], np.int32))),
    ("cu_seqlens_q and cu_seqlens_k", dict(cu_seqlens_k=None)),
    ("topk", dict(topk=0)),
    ("block_size", dict(block_size=48)),
    ("block_size", dict(block_size=8)),
    ("init_blocks", dict(init_blocks=-1)),
    ("local_blocks", dict(local_blocks=-2)),
    ("idx_scale", dict(idx_scale=-1.0)),
    ("scale", dict(scale=0.0)),
]


@pytest.mark.parametrize("needle,over", BAD)
def test_bad_input_raises(needle, over):
    with pytest.raises(ValueError, match=needle):
        call_msa(**over)


FORCED_BAD = [
    ("o_partial", dict(o_partial=np.zeros((30, 4, 3, 8)))),
    ("lse_partial", dict(lse_partial=np.zeros((30, 4, 2)))),
    ("init_blocks \\+ local_blocks <= topk", dict(init_blocks=2)),
    ("local_blocks", dict(local_blocks=-1)),
]


@pytest.mark.parametrize("needle,over", FORCED_BAD)
def test_forced_combine_bad_input_raises(needle, over):
    a = dict(o_partial=np.zeros((30, 4, 3, 16)), lse_partial=np.full((30, 4, 3), -np.inf))
    kw = dict(block_size=16, init_blocks=1, local_blocks=2)
    for key, val in over.items():
        (a if key in a else kw)[key] = val
    with pytest.raises(ValueError, match=needle):
        R.forced_combine(C.q, C.k, C.v, a["o_partial"], a["lse_partial"], C.cu_q, C.cu_k, **kw)


def test_more_queries_than_keys_without_cu_seqlens():
    with pytest.raises(ValueError, match="T="):
        R.sparse_attention(C.q, C.k[:10], C.v[:10], np.zeros((2, 30, 1), np.int32))


def test_block_ids_errors():
    with pytest.raises(ValueError, match="block_ids"):
        R.sparse_attention(C.q, C.k, C.v, np.zeros((3, 30, 2), np.int32), C.cu_q, C.cu_k, block_size=16)
    with pytest.raises(ValueError, match="block_ids"):
        R.sparse_attention(C.q, C.k, C.v, np.zeros((2, 30, 2), np.float32), C.cu_q, C.cu_k, block_size=16)
    with pytest.raises(ValueError, match="not causal"):
        R.sparse_attention(C.q, C.k, C.v, np.full((2, 30, 2), 5, np.int32), C.cu_q, C.cu_k, block_size=16)


def test_combine_shape_errors():
    with pytest.raises(ValueError, match="lse_partial"):
        R.combine(np.zeros((2, 2, 3, 4)), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="o_partial"):
        R.combine(np.zeros((2, 2, 3)), np.zeros((2, 2, 3)))


def test_invert_errors():
    bid = R.select_blocks(C.q_idx, C.k_idx, C.cu_q, C.cu_k, topk=2, block_size=16)
    with pytest.raises(ValueError, match="q_budget"):
        R.invert(bid, C.cu_q, C.cu_k, block_size=16, q_budget=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        R.invert(bid, None, None, block_size=16)


def test_int32_limits_refused_before_overflow():
    from msa_py import _validate as V

    V.check_int32_range(131072, 131072, 16, 64, 4)  # the model shape at 128K fits
    with pytest.raises(ValueError, match=r"T \* Hq \* topk"):
        V.check_int32_range(3_000_000, 3_000_000, 16, 64, 4)
    with pytest.raises(ValueError, match=r"^T \* topk"):
        V.check_int32_range(2**28, 2**28, 16)


def test_forced_pass_gpu_fit():
    """The GPU forced pass is taken only where its kernel compiles: 16-bit
    tiles, and the tile's lse_partial (64 x topk fp32) within the 48 KB of
    static shared memory; elsewhere the layer keeps the plain pipeline."""
    from msa_py.graph import forced_gpu_fits

    assert forced_gpu_fits(True, 128, 128, 16)
    assert forced_gpu_fits(True, 64, 64, 128)
    assert not forced_gpu_fits(True, 128, 128, 256)  # 64 KB of lse_partial
    assert not forced_gpu_fits(False, 128, 128, 16)  # fp32: no tensor-core tiles
    assert not forced_gpu_fits(True, 256, 128, 16)


def test_block_ids_value_errors():
    ok = R.select_blocks(C.q_idx, C.k_idx, C.cu_q, C.cu_k, topk=2, block_size=16)
    for g, t, s, val, msg in ((0, 3, 0, -2, ">= -1"), (1, 19, 0, 3, "not causal")):
        bad = ok.copy()
        bad[g, t, s] = val
        with pytest.raises(ValueError, match=msg):
            R.sparse_attention(C.q, C.k, C.v, bad, C.cu_q, C.cu_k, block_size=16)
        with pytest.raises(ValueError, match=msg):
            R.invert(bad, C.cu_q, C.cu_k, block_size=16)
