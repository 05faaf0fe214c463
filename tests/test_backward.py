"""The backward pass: msa_py.reference's gradients against float64 autograd,
the kernels (through torch autograd) against the reference, and the
indexer's training signal (block_mass, index_block_scores, indexer_kl_loss).

    pytest tests/test_backward.py                  # CPU tensors (CI)
    pytest tests/test_backward.py --device cuda    # CUDA tensors (GPU machine)
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import msa_py  # noqa: E402
from msa_py import reference as R  # noqa: E402
from msa_py import verify as Vf  # noqa: E402

from cases import make_case  # noqa: E402
from test_torch_ops import np64, tensors  # noqa: E402

HQ, HKV, D, DI, TOPK, BS = 8, 2, 64, 32, 4, 16
# ragged (a 1-token sequence, lengths off block multiples), chunked (Tq < Tk), GQA (G = 4)
SHAPES = [[(40, 40), (1, 1), (33, 50), (70, 70)], [(20, 100), (16, 16)]]


class _ReferenceAttention(torch.autograd.Function):
    """msa_py.reference's forward and backward as one autograd function, so
    torch.autograd.gradcheck can hold the backward to finite differences."""

    @staticmethod
    def forward(ctx, q, k, v, block_ids, cu_q, cu_k, block_size, scale):
        out, lse = R.sparse_attention(q.numpy(), k.numpy(), v.numpy(), block_ids, cu_q, cu_k, block_size=block_size,
                                      scale=scale)
        ctx.save_for_backward(q, k, v)
        ctx.args = (block_ids, cu_q, cu_k, block_size, scale)
        return torch.from_numpy(out), torch.from_numpy(lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v = ctx.saved_tensors
        block_ids, cu_q, cu_k, block_size, scale = ctx.args
        dq, dk, dv = R.sparse_attention_backward(q.numpy(), k.numpy(), v.numpy(), block_ids, dout.numpy(), cu_q, cu_k,
                                                 dlse=dlse.numpy(), block_size=block_size, scale=scale)
        return torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv), None, None, None, None, None


@pytest.mark.parametrize("seqs", [[(20, 20), (1, 1), (9, 37)], [(6, 40)]], ids=["ragged", "chunked"])
def test_reference_backward_gradcheck_float64(seqs):
    """Finite differences in float64 (torch.autograd.gradcheck) of out and lse
    with respect to q, k and v, through the reference (GQA: Hq 4, Hkv 2;
    one block chosen in two slots counts twice)."""
    c = make_case(30, seqs, 4, 2, 8, 8)
    bid = R.select_blocks(c.q_idx, c.k_idx, c.cu_q, c.cu_k, topk=2, block_size=16, init_blocks=1, local_blocks=1)
    bid[1, -1] = [bid[1, -1, 0], bid[1, -1, 0]]  # a duplicate: two splits of one block
    q, k, v = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (c.q, c.k, c.v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: _ReferenceAttention.apply(q, k, v, bid, c.cu_q, c.cu_k, 16, 0.3), (q, k, v), eps=1e-6,
        atol=1e-7, rtol=1e-5)


def _grads(fn, q, k, v, dout, dlse):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = fn(q, k, v)
    ((out.float() * dout.float()).sum() + (lse * dlse).sum()).backward()
    return out, lse, q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seqs", SHAPES, ids=["ragged", "chunked"])
def test_msa_attention_gradients_match_reference(seqs, dtype, torch_device):
    """Autograd through msa_attention (the forced pass's forward on CPU and
    GPU) and through sparse_attention: dq, dk, dv against the float64
    reference on the kernels' own selection, with a gradient on lse too."""
    if torch_device == "cpu" and dtype == "bfloat16" and len(seqs) == 2:
        pytest.skip("one bfloat16 shape on the CPU keeps the suite short")
    if torch_device == "cuda" and dtype == "float32":
        pytest.skip("the CUDA backward takes 16-bit inputs (test_backward_errors checks the refusal)")
    c = make_case(31, seqs, HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device, dtype)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(q.shape, generator=g).to(device=q.device, dtype=q.dtype)
    dlse = torch.randn(q.shape[:2], generator=g).to(q.device)
    out, lse, dq, dk, dv = _grads(lambda q, k, v: msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK,
                                                                         block_size=BS, scale=0.11), q, k, v, dout, dlse)
    with torch.no_grad():  # the op under msa_attention returns its selection too (the same compiled model)
        bid = torch.ops.msa.msa_attention(q, k, v, qi, ki, cq, ck, TOPK, BS, 1, 2, 0.11, 1 / DI**0.5, 64)[2]
    r = [np64(x) for x in (q, k, v)]
    rq, rk, rv = R.sparse_attention_backward(*r, bid.cpu().numpy(), np64(dout), c.cu_q, c.cu_k, dlse=np64(dlse),
                                             block_size=BS, scale=0.11)
    tol = 1e-5 if dtype == "float32" else Vf.tolerance(dtype)
    for got, ref in ((dq, rq), (dk, rk), (dv, rv)):
        assert got.dtype == q.dtype and Vf.rel_err(np64(got), ref) < tol
    # sparse_attention on the same selection: the same gradients (on the CPU in
    # float32 only: bfloat16 would compile one more model for what the
    # any-block_ids test below checks)
    if torch_device == "cpu" and dtype != "float32":
        return
    _, _, dq2, dk2, dv2 = _grads(lambda q, k, v: msa_py.sparse_attention(q, k, v, bid, cq, ck, block_size=BS,
                                                                         scale=0.11), q, k, v, dout, dlse)
    for got, ref in ((dq2, rq), (dk2, rk), (dv2, rv)):
        assert Vf.rel_err(np64(got), ref) < tol


def test_sparse_gradients_any_block_ids(torch_device):
    """Your own block_ids: -1 padding, any slot order, a block in two slots
    (counted twice), and a block no query of a group chose (its keys get
    gradient 0 exactly)."""
    c = make_case(32, [(48, 80)], HQ, HKV, D, DI)
    dtype = "float32" if torch_device == "cpu" else "bfloat16"
    q, k, v, *_, cq, ck = tensors(c, torch_device, dtype)
    T = q.shape[0]
    bid = np.full((HKV, T, TOPK), -1, np.int32)  # TOPK (4) slots: the compiled models of the test above
    p = np.arange(80 - T, 80)  # own blocks 2..4
    bid[:, :, 0] = p // BS
    bid[0, :, 1] = 0  # group 0: block 1 is chosen by no query
    bid[1, :, 2] = p // BS  # twice, after a -1 in slot 1
    bid[1, ::3, 3] = p[::3] // BS - 1
    bt = torch.from_numpy(bid).to(q.device)
    dout = torch.randn_like(q)
    dlse = torch.zeros(q.shape[:2], device=q.device)
    _, _, dq, dk, dv = _grads(lambda q, k, v: msa_py.sparse_attention(q, k, v, bt, cq, ck, block_size=BS), q, k, v,
                              dout, dlse)
    rq, rk, rv = R.sparse_attention_backward(np64(q), np64(k), np64(v), bid, np64(dout), c.cu_q, c.cu_k, block_size=BS)
    for got, ref in ((dq, rq), (dk, rk), (dv, rv)):
        assert Vf.rel_err(np64(got), ref) < (1e-5 if dtype == "float32" else Vf.tolerance(dtype))
    assert (np64(dk)[16:32, 0] == 0).all() and (np64(dv)[16:32, 0] == 0).all()
    assert (rk[16:32, 0] == 0).all() and np.abs(rk[16:32, 1]).sum() > 0


def test_backward_traces_under_torch_compile(torch_device):
    class Layer(torch.nn.Module):
        def forward(self, q, k, v, qi, ki, cq, ck):
            out, lse = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
            return (out * out).sum() + lse.sum()

    c = make_case(33, [(50, 64), (30, 30)], HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device, "float32" if torch_device == "cpu" else "bfloat16")
    grads = []
    for layer in (Layer(), torch.compile(Layer(), fullgraph=True)):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        layer(*leaves, qi, ki, cq, ck).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_indexer_training_signal(torch_device):
    """block_mass against the reference; index_block_scores against the
    reference and its gradient against autograd through a plain torch
    formulation; indexer_kl_loss is 0 exactly when the scores' softmax equals
    the mass."""
    c = make_case(34, [(40, 40), (9, 33)], HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device)
    bid = msa_py.select_blocks(qi, ki, cq, ck, topk=TOPK, block_size=BS)
    mass = msa_py.block_mass(q, k, bid, cq, ck, block_size=BS, scale=0.2)
    ref = R.block_mass(c.q, c.k, bid.cpu().numpy(), c.cu_q, c.cu_k, block_size=BS, scale=0.2)
    assert Vf.rel_err(np64(mass), ref) < 1e-5
    qi2, ki2 = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    scores = msa_py.index_block_scores(qi2, ki2, bid, cq, ck, block_size=BS, idx_scale=0.5)
    rs = R.index_block_scores(c.q_idx, c.k_idx, bid.cpu().numpy(), c.cu_q, c.cu_k, block_size=BS, idx_scale=0.5)
    assert Vf.rel_err(np64(scores), rs) < 1e-5
    loss = msa_py.indexer_kl_loss(scores, mass)
    loss.backward()
    # the same loss through dense torch ops (every key's score, masked, max per block)
    qi3, ki3 = qi.clone().double().requires_grad_(True), ki.clone().double().requires_grad_(True)
    seq, p, _ = R._positions(c.cu_q.astype(np.int64), c.cu_k.astype(np.int64))
    k0 = torch.from_numpy(c.cu_k[seq].astype(np.int64))
    j = bid.cpu().long()
    keys = (j.clamp(min=0)[..., None] * BS + torch.arange(BS))  # [g, t, s, b]
    vis = (j >= 0)[..., None] & (keys <= torch.from_numpy(p)[None, :, None, None])
    kk = ki3.cpu()[(k0[None, :, None, None] + keys).clamp(max=ki.shape[0] - 1)]
    s = 0.5 * torch.einsum("tgd,gtsbd->gtsb", qi3.cpu(), kk).masked_fill(~vis, float("-inf"))
    dense = msa_py.indexer_kl_loss(s.max(-1).values.float(), mass.cpu())
    dense.backward()
    assert abs(float(loss.detach()) - float(dense)) < 1e-5 * max(1.0, abs(float(dense)))
    assert Vf.rel_err(np64(qi2.grad), np64(qi3.grad)) < 1e-4 and Vf.rel_err(np64(ki2.grad), np64(ki3.grad)) < 1e-4
    # zero exactly at the target: scores = log(mass)
    assert float(msa_py.indexer_kl_loss(torch.log(mass).masked_fill(mass == 0, float("-inf")), mass)) < 1e-6


def test_backward_errors(torch_device):
    c = make_case(35, [(20, 40)], HQ, HKV, D, DI)
    q, k, v, qi, ki, cq, ck = tensors(c, torch_device)
    out, lse = msa_py.msa_attention(q, k, v, qi, ki, cq, ck, topk=TOPK, block_size=BS)
    bid = msa_py.select_blocks(qi, ki, cq, ck, topk=TOPK, block_size=BS)
    with pytest.raises(ValueError, match="dout must have"):
        msa_py.sparse_attention_backward(q, k, v, bid, out, lse, out[:5], cq, ck, block_size=BS)
    with pytest.raises(ValueError, match="lse must be float32"):
        msa_py.sparse_attention_backward(q, k, v, bid, out, lse.double(), out, cq, ck, block_size=BS)
    with pytest.raises(ValueError, match="q_idx requires grad"):
        msa_py.msa_attention(q, k, v, qi.clone().requires_grad_(True), ki, cq, ck, topk=TOPK, block_size=BS)
