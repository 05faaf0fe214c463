"""msa_py.graph inside a user's own MAX graph: default cu_seqlens, float scales,
symbolic lengths served by one compiled model, and graph-time errors."""
import pytest
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, ops

import msa_py.graph as msa
from msa_py import _validate as V
from msa_py import reference as R
from msa_py import verify as Vf

from cases import make_case


@pytest.fixture(scope="module")
def model():
    dev = DeviceRef.CPU()
    f = DType.float32
    types = [TensorType(f, ["T", 4, 64], device=dev), TensorType(f, ["S", 2, 64], device=dev),
             TensorType(f, ["S", 2, 64], device=dev), TensorType(f, ["T", 2, 32], device=dev),
             TensorType(f, ["S", 32], device=dev)]
    with Graph("user_graph", input_types=types, custom_extensions=[msa.kernels_path()]) as g:
        q, k, v, qi, ki = (x.tensor for x in g.inputs)
        out, lse = msa.msa_attention(q, k, v, qi, ki, topk=2, block_size=16, scale=0.2)
        g.output(out, lse)
    return InferenceSession(devices=[CPU()]).load(g)


@pytest.mark.parametrize("tq,tk", [(40, 40), (13, 77)])
def test_user_graph_without_cu_seqlens(model, tq, tk):
    c = make_case(5, [(tq, tk)], 4, 2, 64, 32)
    out, lse = model.execute(*(Buffer.from_numpy(x) for x in (c.q, c.k, c.v, c.q_idx, c.k_idx)))
    ro, rl = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, topk=2, block_size=16, scale=0.2)
    assert Vf.rel_err(out.to_numpy(), ro) < 1e-5
    assert Vf.rel_err(lse.to_numpy(), rl) < 1e-5


def test_graph_time_errors():
    dev = DeviceRef.CPU()
    f = DType.float32
    with Graph("bad", input_types=[TensorType(f, ["T", 6, 64], device=dev), TensorType(f, ["S", 4, 64], device=dev),
                                   TensorType(f, ["T", 4, 32], device=dev), TensorType(f, ["S", 32], device=dev)],
               custom_extensions=[msa.kernels_path()]) as g:
        q, k, qi, ki = (x.tensor for x in g.inputs)
        with pytest.raises(ValueError, match="multiple of KV heads"):
            msa.msa_attention(q, k, k, qi, ki)
        with pytest.raises(ValueError, match="topk"):
            msa.select_blocks(qi, ki, topk=0)
        with pytest.raises(ValueError, match="block_size"):
            msa.select_blocks(qi, ki, block_size=100)


def test_gpu_shared_memory_limits_are_checked_before_compiling():
    gpu = DeviceRef.GPU(0)
    f = DType.float32
    with Graph("too_big", input_types=[TensorType(f, ["T", 4, 256], device=gpu), TensorType(f, ["S", 4, 256], device=gpu),
                                       TensorType(f, ["T", 4, 64], device=gpu), TensorType(f, ["S", 64], device=gpu)],
               custom_extensions=[msa.kernels_path()]) as g:
        q, k, qi, ki = (x.tensor for x in g.inputs)
        with pytest.raises(ValueError, match="shared memory"):
            msa.msa_attention(q, k, k, qi, ki, block_size=256)
        with pytest.raises(ValueError, match="shared memory"):
            msa.select_blocks(qi, ki, topk=1000)


def test_gpu_decode_path_needs_its_kernel_shapes():
    """On the GPU the decode kernels need 16-bit tensor-core shapes and, for the
    indexer's top-k pass, topk <= DECODE_MAX_TOPK: forced, a clear error;
    automatic, the general path."""
    gpu = DeviceRef.GPU(0)
    bf = DType.bfloat16
    i32 = DType.int32
    with Graph("decode_shapes", input_types=[TensorType(bf, [4, 2, 64], device=gpu), TensorType(bf, [4096, 64], device=gpu),
                                             TensorType(i32, [5], device=gpu), TensorType(i32, [5], device=gpu)],
               custom_extensions=[msa.kernels_path()]) as g:
        qi, ki, cq, ck = (x.tensor for x in g.inputs)
        with pytest.raises(ValueError, match="topk <= 40"):
            msa.select_blocks(qi, ki, cq, ck, topk=64, decode=True)
        msa.select_blocks(qi, ki, cq, ck, topk=64)  # automatic: the general indexer
        assert str(g).count("msa_select_decode") == 0 and str(g).count('"msa_select"') == 1
        msa.select_blocks(qi, ki, cq, ck, topk=16)  # automatic: the decode indexer (T = 4 <= 8 * B)
        assert str(g).count("msa_select_decode") == 1
        with pytest.raises(ValueError, match="Di a multiple of 16"):
            msa.select_blocks(qi[:, :, :40], ki[:, :40], cq, ck, decode=True)


def test_graph_splits_a_long_call_under_its_workspace_budget():
    """A static one-sequence call whose partials exceed max_workspace_bytes
    runs as slices of queries over their key prefix: the unsplit answer.
    Symbolic shapes cannot be split in a graph: a clear error."""
    dev = DeviceRef.CPU()
    f = DType.float32
    T, S = 70, 90
    types = [TensorType(f, [T, 4, 64], device=dev), TensorType(f, [S, 2, 64], device=dev),
             TensorType(f, [S, 2, 64], device=dev), TensorType(f, [T, 2, 32], device=dev),
             TensorType(f, [S, 32], device=dev)]
    with Graph("split_graph", input_types=types, custom_extensions=[msa.kernels_path()]) as g:
        q, k, v, qi, ki = (x.tensor for x in g.inputs)
        out, lse = msa.msa_attention(q, k, v, qi, ki, topk=2, block_size=16, scale=0.2, max_workspace_bytes=30000)
        per_q = V.workspace_bytes_per_query(4, 2, 64, 2, 4, S, 16, 64)  # about 2.2 KB
        assert str(g).count('"msa_select"') == -(-T // (30000 // per_q)) > 1
        g.output(out, lse)
    m = InferenceSession(devices=[CPU()]).load(g)
    c = make_case(6, [(T, S)], 4, 2, 64, 32)
    out, lse = m.execute(*(Buffer.from_numpy(x) for x in (c.q, c.k, c.v, c.q_idx, c.k_idx)))
    ro, rl = R.msa_attention(c.q, c.k, c.v, c.q_idx, c.k_idx, topk=2, block_size=16, scale=0.2)
    assert Vf.rel_err(out.to_numpy(), ro) < 1e-5 and Vf.rel_err(lse.to_numpy(), rl) < 1e-5
    with Graph("split_symbolic", input_types=[TensorType(f, ["T", 4, 64], device=dev), TensorType(f, ["S", 2, 64], device=dev),
                                              TensorType(f, ["T", 2, 32], device=dev), TensorType(f, ["S", 32], device=dev)],
               custom_extensions=[msa.kernels_path()]) as g:
        q, k, qi, ki = (x.tensor for x in g.inputs)
        with pytest.raises(ValueError, match="static T"):
            msa.msa_attention(q, k, k, qi, ki, max_workspace_bytes=1000)


def test_paged_graph_over_e4m3_caches():
    """paged_cache + paged_msa_attention in a user's graph: e4m3 caches given
    as their bytes (uint8: MAX's CPU device has no float8 tensors) with float
    scales, shuffled pages, a decode step; against the reference on the
    dequantized caches. A scale on a cache in q's dtype is refused."""
    import numpy as np

    torch = pytest.importorskip("torch")
    B, P, BS, Hq, Hkv, D, Di, MP, topk = 3, 12, 16, 4, 2, 64, 32, 4, 3
    scales = dict(k_scale=0.04, v_scale=0.02, k_idx_scale=0.1)
    rng = np.random.default_rng(70)
    e4m3 = lambda shape, s: (torch.from_numpy(3 * rng.standard_normal(shape).astype(np.float32)) / s).to(  # noqa: E731
        torch.float8_e4m3fn)
    kc, vc, ic = e4m3((P, BS, Hkv, D), scales["k_scale"]), e4m3((P, BS, Hkv, D), scales["v_scale"]), e4m3(
        (P, BS, Di), scales["k_idx_scale"])
    sl = np.array([40, 17, 64], np.int32)
    perm = rng.permutation(P)
    pt = np.full((B, MP), -1, np.int32)
    used = 0
    for b in range(B):
        n = -(-int(sl[b]) // BS)
        pt[b, :n] = perm[used:used + n]
        used += n
    cu = np.arange(B + 1, dtype=np.int32)
    q = rng.standard_normal((B, Hq, D)).astype(np.float32)
    qi = rng.standard_normal((B, Hkv, Di)).astype(np.float32)
    dev, f, u8, i32 = DeviceRef.CPU(), DType.float32, DType.uint8, DType.int32
    types = [TensorType(f, [B, Hq, D], device=dev), TensorType(u8, [P, BS, Hkv, D], device=dev),
             TensorType(u8, [P, BS, Hkv, D], device=dev), TensorType(f, [B, Hkv, Di], device=dev),
             TensorType(u8, [P, BS, Di], device=dev), TensorType(i32, [B, MP], device=dev),
             TensorType(i32, [B], device=dev), TensorType(i32, [B + 1], device=dev)]
    with Graph("paged_e4m3", input_types=types, custom_extensions=[msa.kernels_path()]) as g:
        a = [x.tensor for x in g.inputs]
        cache = msa.paged_cache(a[1], a[2], a[4], a[5], block_size=BS, **scales)
        out, lse = msa.paged_msa_attention(a[0], cache, a[3], a[5], a[6], a[7], topk=topk, block_size=BS)
        with pytest.raises(ValueError, match="v_scale applies to a float8_e4m3fn v_cache"):
            flat_f32 = ops.reshape(a[0], [-1])  # a float32 "cache" in q's dtype
            bid = ops.constant(np.zeros((Hkv, B, topk), np.int32), i32, device=dev)
            msa.paged_sparse_attention(a[0], cache._replace(k=flat_f32, v=flat_f32, k_scale=None, v_scale=0.5), bid,
                                       a[5], a[6], a[7], block_size=BS)
        g.output(out, lse)
    m = InferenceSession(devices=[CPU()]).load(g)
    bytes_ = [x.view(torch.uint8).numpy() for x in (kc, vc, ic)]
    out, lse = m.execute(*(Buffer.from_numpy(x) for x in (q, bytes_[0], bytes_[1], qi, bytes_[2], pt, sl, cu)))
    ro, rl = R.paged_msa_attention(q, kc.float().numpy(), vc.float().numpy(), qi, ic.float().numpy(), pt, sl, cu,
                                   topk=topk, block_size=BS, **scales)
    assert Vf.rel_err(out.to_numpy(), ro) < 1e-5 and Vf.rel_err(lse.to_numpy(), rl) < 1e-5
