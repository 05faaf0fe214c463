"""msa_py.graph inside a user's own MAX graph: default cu_seqlens, float scales,
symbolic lengths served by one compiled model, and graph-time errors."""
import pytest
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType

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
