"""Paged KV caches (page size == block_size) through the torch layer, against
msa_py.reference on the same pages: ragged batches, chunked prefill over a
cache that holds the chunk, decode and speculative decode, shuffled pages,
pages shared between sequences (prefix caching), caches with other strides
(FlashInfer's [num_pages, Hkv, block_size, D] transposed, vLLM's K and V
interleaved in one allocation), and the cache append.

    pytest tests/test_paged.py                  # CPU tensors (CI)
    pytest tests/test_paged.py --device cuda    # CUDA tensors (GPU machine)
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import msa_py  # noqa: E402
from msa_py import paged as P  # noqa: E402
from msa_py import reference as R  # noqa: E402
from msa_py import verify as Vf  # noqa: E402

HQ, HKV, D, DI, TOPK, BS = 8, 2, 64, 32, 4, 16


def _pages(seq_lens, num_pages, seed, share_prefix=False):
    """A page table of shuffled pages; with share_prefix, every sequence's first
    page is the first sequence's (a shared prompt prefix)."""
    rng = np.random.default_rng(seed)
    need = [-(-n // BS) for n in seq_lens]
    perm = list(rng.permutation(num_pages))
    pt = np.full((len(seq_lens), max(need) + 1), -1, np.int32)
    for b, n in enumerate(need):
        for j in range(n):
            pt[b, j] = pt[0, 0] if (share_prefix and b > 0 and j == 0) else perm.pop()
    return pt


def _case(seqs, seed, layout="plain", share_prefix=False, num_pages=48, dev="cpu"):
    rng = np.random.default_rng(seed)
    tq = [s[0] for s in seqs]
    sl = [s[1] for s in seqs]
    pt = _pages(sl, num_pages, seed, share_prefix)
    f = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32)).to(dev)  # noqa: E731
    if layout == "flashinfer":  # [num_pages, Hkv, block_size, D], passed as .transpose(1, 2)
        kc, vc = f(num_pages, HKV, BS, D).transpose(1, 2), f(num_pages, HKV, BS, D).transpose(1, 2)
    elif layout == "vllm":  # K and V interleaved along the last axis of one allocation
        kv = f(num_pages, BS, HKV, 2 * D)
        kc, vc = kv[..., :D], kv[..., D:]
    else:
        kc, vc = f(num_pages, BS, HKV, D), f(num_pages, BS, HKV, D)
    ic = f(num_pages, BS, DI)
    T = sum(tq)
    q, qi = f(T, HQ, D), f(T, HKV, DI)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    return q, kc, vc, qi, ic, i32(pt), i32(sl), i32(np.concatenate([[0], np.cumsum(tq)]))


def _np(x):
    return x.detach().float().cpu().numpy()


SHAPES = {
    "prefill_ragged": [(40, 40), (7, 90), (1, 33)],  # prompt, a chunk over a cached prefix, a 1-token sequence
    "decode": [(1, 40), (1, 90), (1, 33), (1, 1)],
    "speculative": [(8, 40), (3, 90), (5, 17)],
}


# Strided layouts on the prefill and decode kernels; the speculative path reads through the same KVAddr.
CASES = [(n, "plain") for n in SHAPES] + [(n, lay) for n in ("prefill_ragged", "decode") for lay in ("flashinfer", "vllm")]


@pytest.mark.parametrize("name,layout", CASES)
def test_paged_msa_attention_matches_reference(name, layout, torch_device):
    """The layer (and its own selection) against the reference; on the plain
    prefill case also paged_select_blocks and paged_sparse_attention, whose
    graphs differ from the layer's there (the layer's forced pass). On the
    decode-sized cases they run the layer's kernels, checked through it."""
    q, kc, vc, qi, ic, pt, sl, cu = _case(SHAPES[name], 50, layout, dev=torch_device)
    out, lse, bid = P.paged_layer(q, kc, vc, qi, ic, pt, sl, cu, topk=TOPK, block_size=BS)
    host = (pt.cpu().numpy(), sl.cpu().numpy(), cu.cpu().numpy())
    ro, rl = R.paged_msa_attention(_np(q), _np(kc), _np(vc), _np(qi), _np(ic), *host, topk=TOPK, block_size=BS)
    assert Vf.rel_err(_np(out), ro) < 1e-5 and Vf.rel_err(_np(lse), rl) < 1e-5
    rb = R.paged_select_blocks(_np(qi), _np(ic), *host, topk=TOPK, block_size=BS)
    np.testing.assert_array_equal(bid.cpu().numpy(), rb)
    if (name, layout) != ("prefill_ragged", "plain"):
        return
    bid2 = msa_py.paged_select_blocks(qi, ic, pt, sl, cu, topk=TOPK, block_size=BS)
    np.testing.assert_array_equal(bid2.cpu().numpy(), rb)
    o2, l2 = msa_py.paged_sparse_attention(q, kc, vc, bid, pt, sl, cu, block_size=BS)
    assert Vf.rel_err(_np(o2), ro) < 1e-5 and Vf.rel_err(_np(l2), rl) < 1e-5


def test_shared_prefix_pages_and_the_contiguous_answer(torch_device):
    """Sequences sharing their first page (prefix caching) give the answer of
    the same keys stored contiguously."""
    seqs = [(20, 20), (5, 36), (1, 40)]
    q, kc, vc, qi, ic, pt, sl, cu = _case(seqs, 51, share_prefix=True, dev=torch_device)
    assert len({int(pt[b, 0]) for b in range(3)}) == 1
    out, lse = msa_py.paged_msa_attention(q, kc, vc, qi, ic, pt, sl, cu, topk=TOPK, block_size=BS)
    k, cu_k = R.gather_pages(_np(kc), pt.cpu().numpy(), sl.cpu().numpy(), block_size=BS)
    v, _ = R.gather_pages(_np(vc), pt.cpu().numpy(), sl.cpu().numpy(), block_size=BS)
    ki, _ = R.gather_pages(_np(ic), pt.cpu().numpy(), sl.cpu().numpy(), block_size=BS)
    t = lambda x: torch.from_numpy(x.astype(np.float32)).to(torch_device)  # noqa: E731
    ck = torch.from_numpy(cu_k.astype(np.int32)).to(torch_device)
    o2, l2 = msa_py.msa_attention(q, t(k), t(v), qi, t(ki), cu, ck, topk=TOPK, block_size=BS)
    assert Vf.rel_err(_np(out), _np(o2)) < 1e-6 and Vf.rel_err(_np(lse), _np(l2)) < 1e-6


def test_paged_append_then_decode(torch_device):
    """New tokens appended into their pages (reference and torch agree), then a
    decode step over the updated caches."""
    seqs = [(3, 30), (1, 17), (2, 33)]
    q, kc, vc, qi, ic, pt, sl, cu = _case(seqs, 52, dev=torch_device)
    rng = np.random.default_rng(53)
    N = int(cu[-1])
    k = torch.from_numpy(rng.standard_normal((N, HKV, D)).astype(np.float32)).to(torch_device)
    v = torch.from_numpy(rng.standard_normal((N, HKV, D)).astype(np.float32)).to(torch_device)
    ki = torch.from_numpy(rng.standard_normal((N, DI)).astype(np.float32)).to(torch_device)
    rk, rv, ri = R.paged_append(_np(kc), _np(vc), _np(ic), _np(k), _np(v), _np(ki), pt.cpu().numpy(),
                                sl.cpu().numpy(), cu.cpu().numpy(), block_size=BS)
    msa_py.paged_append(kc, vc, ic, k, v, ki, pt, sl, cu)
    for got, want in ((kc, rk), (vc, rv), (ic, ri)):
        np.testing.assert_array_equal(_np(got), want)
    out, _ = msa_py.paged_msa_attention(q, kc, vc, qi, ic, pt, sl, cu, topk=TOPK, block_size=BS)
    ro, _ = R.paged_msa_attention(_np(q), rk, rv, _np(qi), ri, pt.cpu().numpy(), sl.cpu().numpy(), cu.cpu().numpy(),
                                  topk=TOPK, block_size=BS)
    assert Vf.rel_err(_np(out), ro) < 1e-5


def test_paged_errors(torch_device):
    q, kc, vc, qi, ic, pt, sl, cu = _case([(4, 40), (1, 20)], 54, dev=torch_device)
    call = lambda **o: msa_py.paged_msa_attention(  # noqa: E731
        q, o.get("kc", kc), vc, qi, ic, o.get("pt", pt), o.get("sl", sl), cu, topk=TOPK, block_size=o.get("bs", BS))
    bad = pt.clone()
    bad[0, 1] = 48
    with pytest.raises(ValueError, match=r"page_table\[0, 1\] = 48 is not a page"):
        call(pt=bad)
    with pytest.raises(ValueError, match=r"page_table\[0, 3\] = -1 is not a page"):  # a page never assigned
        call(sl=torch.tensor([60, 20], dtype=torch.int32, device=sl.device))
    with pytest.raises(ValueError, match="needs 5 pages"):
        call(sl=torch.tensor([80, 20], dtype=torch.int32, device=sl.device))
    with pytest.raises(ValueError, match="less than sequence 0's 4 new tokens"):
        call(sl=torch.tensor([3, 20], dtype=torch.int32, device=sl.device))
    with pytest.raises(ValueError, match="page size"):
        call(bs=32)
    odd = lambda x: x.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731  (same shape, D not contiguous)
    with pytest.raises(ValueError, match="v_cache must have k_cache's strides"):
        call(kc=odd(kc))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        msa_py.paged_msa_attention(q, odd(kc), odd(vc), qi, ic, pt, sl, cu, topk=TOPK, block_size=BS)
    with pytest.raises(ValueError, match="int32"):
        call(pt=pt.long())


@pytest.mark.parametrize("fp8", [False, True], ids=["16bit", "fp8"])
def test_decode_plan_run_writes_its_own_buffers(fp8, torch_device):
    """PagedDecodePlan: run() on the plan's buffers gives paged_msa_attention's
    answer for the batch's rows, in the plan's own output tensors (no new
    allocation), and rows past the batch keep a harmless sequence; on CUDA one
    captured graph replays for two batch sizes. bf16 queries (the CUDA decode
    kernels' dtype), over bf16 or e4m3 caches."""
    seqs = [(1, 40), (1, 90), (1, 33)]
    (q, kc, vc, qi, ic, pt, sl, cu), kw = _fp8_case(seqs, 55, torch_device, torch.bfloat16,
                                                    ("kv", "idx") if fp8 else ())
    plan = msa_py.PagedDecodePlan(kc, vc, ic, max_batch=5, max_pages=pt.shape[1], num_heads=HQ, n_new=1, topk=TOPK,
                                  block_size=BS, dtype=torch.bfloat16, **kw)
    out_ptr = plan.out.data_ptr()

    def step(B):
        plan.q[:B].copy_(q[:B])
        plan.q_idx[:B].copy_(qi[:B])
        plan.page_table[:B].copy_(pt[:B])
        plan.seq_lens[:B].copy_(sl[:B])
        plan.reset_rows(B)
        return plan.run()

    for B in (3, 2):
        out, lse = step(B)
        assert out.data_ptr() == out_ptr
        ro, rl = msa_py.paged_msa_attention(q[:B], kc, vc, qi[:B], ic, pt[:B], sl[:B], cu[:B + 1], topk=TOPK,
                                            block_size=BS, **kw)
        assert torch.equal(out[:B], ro) and torch.equal(lse[:B], rl)
        plan.check_batch()
    if torch_device == "cuda":
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            plan.run()
        for B in (3, 1):
            plan.q[:B].copy_(q[:B])
            plan.q_idx[:B].copy_(qi[:B])
            plan.page_table[:B].copy_(pt[:B])
            plan.seq_lens[:B].copy_(sl[:B])
            plan.reset_rows(B)
            g.replay()
            torch.cuda.synchronize()
            ro, _ = msa_py.paged_msa_attention(q[:B], kc, vc, qi[:B], ic, pt[:B], sl[:B], cu[:B + 1], topk=TOPK,
                                               block_size=BS, **kw)
            assert torch.equal(plan.out[:B], ro)


# --------------------------------------------------------------------------- FP8 (e4m3) caches
FP8 = torch.float8_e4m3fn
SCALES = dict(k_scale=0.04, v_scale=0.02, k_idx_scale=0.1)


def _fp8_case(seqs, seed, dev, dtype, which=("kv", "idx"), layout="plain"):
    """A paged case whose caches (K / V, index keys, or both) are e4m3 with
    per-tensor scales (values spread over e4m3's range, not all near 1), and
    the scales to pass."""
    q, kc, vc, qi, ic, pt, sl, cu = _case(seqs, seed, layout=layout, dev=dev)
    kc, vc, ic = (x.to(dtype) for x in (kc, vc, ic))
    kw = {}
    if "kv" in which:
        kc, vc = (msa_py.quantize_cache(3 * x, FP8, SCALES[n]) for x, n in ((kc, "k_scale"), (vc, "v_scale")))
        kw.update(k_scale=SCALES["k_scale"], v_scale=SCALES["v_scale"])
    if "idx" in which:
        ic = msa_py.quantize_cache(3 * ic, FP8, SCALES["k_idx_scale"])
        kw.update(k_idx_scale=SCALES["k_idx_scale"])
    return (q.to(dtype), kc, vc, qi.to(dtype), ic, pt, sl, cu), kw


FP8_CASES = [("decode", ("kv", "idx"), "plain"), ("speculative", ("kv", "idx"), "plain"),
             ("decode", ("kv",), "flashinfer"), ("decode", ("idx",), "vllm"),
             ("prefill_ragged", ("kv", "idx"), "plain"), ("prefill_ragged", ("kv",), "vllm")]


@pytest.mark.parametrize("name,which,layout", FP8_CASES,
                         ids=["decode", "speculative", "kv_only", "idx_only", "prefill", "prefill_kv_only"])
def test_fp8_caches_match_the_dequantized_reference(name, which, layout, torch_device):
    """e4m3 K / V and index-key caches (the decode kernels read them, a
    prefill chunk widens its pages first): the selection equals the
    reference's on the dequantized index keys, out / lse the reference's on
    the dequantized K / V (bf16 queries: bf16's tolerance)."""
    dtype = torch.bfloat16
    (q, kc, vc, qi, ic, pt, sl, cu), kw = _fp8_case(SHAPES[name], 60, torch_device, dtype, which, layout)
    host = dict(page_table=pt.cpu().numpy(), seq_lens=sl.cpu().numpy(), cu_seqlens_q=cu.cpu().numpy())
    out, lse, bid = P.paged_layer(q, kc, vc, qi, ic, pt, sl, cu, topk=TOPK, block_size=BS, **kw)
    ro, rl = R.paged_msa_attention(_np(q), _np(kc), _np(vc), _np(qi), _np(ic), topk=TOPK, block_size=BS, **host, **kw)
    assert Vf.rel_err(_np(out), ro) < 8e-3 and Vf.rel_err(_np(lse), rl) < 1e-4
    ikw = {n: kw[n] for n in ("k_idx_scale",) if n in kw}
    rb = R.paged_select_blocks(_np(qi), _np(ic), topk=TOPK, block_size=BS, **host, **ikw)
    np.testing.assert_array_equal(bid.cpu().numpy(), rb)
    if name != "prefill_ragged" or which != ("kv", "idx"):
        return  # the functions apart where their graphs differ from the layer's (prefill; one compile each)
    np.testing.assert_array_equal(msa_py.paged_select_blocks(qi, ic, pt, sl, cu, topk=TOPK, block_size=BS, **ikw)
                                  .cpu().numpy(), rb)
    vkw = {n: kw[n] for n in ("k_scale", "v_scale") if n in kw}
    o2, l2 = msa_py.paged_sparse_attention(q, kc, vc, bid, pt, sl, cu, block_size=BS, **vkw)
    assert Vf.rel_err(_np(o2), ro) < 8e-3 and Vf.rel_err(_np(l2), rl) < 1e-4


@pytest.mark.parametrize("name", ["speculative", "prefill_ragged"])
def test_fp8_float32_queries_on_the_cpu(name):
    """e4m3 caches under fp32 queries on the CPU (decode kernels reading
    e4m3; prefill over pages widened to fp32): the dequantized reference to
    fp32's tolerance."""
    (q, kc, vc, qi, ic, pt, sl, cu), kw = _fp8_case(SHAPES[name], 61, "cpu", torch.float32)
    out, lse = msa_py.paged_msa_attention(q, kc, vc, qi, ic, pt, sl, cu, topk=TOPK, block_size=BS, **kw)
    ro, rl = R.paged_msa_attention(_np(q), _np(kc), _np(vc), _np(qi), _np(ic), pt.numpy(), sl.numpy(), cu.numpy(),
                                   topk=TOPK, block_size=BS, **kw)
    assert Vf.rel_err(_np(out), ro) < 1e-5 and Vf.rel_err(_np(lse), rl) < 1e-5


def test_quantize_cache_and_fp8_append(torch_device):
    """quantize_cache rounds x / scale to e4m3 (within half an e4m3 step,
    2^-4 relative, for normal values) and saturates at +-448 instead of
    overflowing to NaN; paged_append stores exactly that in the new tokens'
    rows and leaves the other rows alone."""
    rng = np.random.default_rng(62)
    x = torch.from_numpy((rng.standard_normal(4000) * np.exp(rng.uniform(-4, 4, 4000))).astype(np.float32))
    x = x.to(torch_device)
    q8 = msa_py.quantize_cache(x, FP8, 0.05)
    deq = q8.float() * 0.05
    y = (x / 0.05).abs()
    normal = (y >= 2.0**-6) & (y < 448)
    assert normal.sum() > 3000
    assert ((deq - x).abs()[normal] <= 2.0**-4 * x.abs()[normal] + 1e-12).all()
    big = torch.tensor([1e4, -1e4], device=torch_device)
    assert torch.equal(msa_py.quantize_cache(big, FP8, 1.0).float(), torch.tensor([448.0, -448.0], device=torch_device))

    (q, kc, vc, qi, ic, pt, sl, cu), kw = _fp8_case([(3, 30), (1, 17), (2, 33)], 63, torch_device, torch.bfloat16)
    N = int(cu[-1])
    k, v = (torch.from_numpy(rng.standard_normal((N, HKV, D)).astype(np.float32)).to(torch_device) for _ in "kv")
    ki = torch.from_numpy(rng.standard_normal((N, DI)).astype(np.float32)).to(torch_device)
    before = [c.clone() for c in (kc, vc, ic)]
    msa_py.paged_append(kc, vc, ic, k, v, ki, pt, sl, cu, **kw)
    want = R.paged_append(*(b.view(torch.uint8).cpu().numpy() for b in before),
                          *(msa_py.quantize_cache(x, FP8, kw[n]).view(torch.uint8).cpu().numpy()
                            for x, n in ((k, "k_scale"), (v, "v_scale"), (ki, "k_idx_scale"))),
                          pt.cpu().numpy(), sl.cpu().numpy(), cu.cpu().numpy(), block_size=BS)
    for got, w in zip((kc, vc, ic), want):
        np.testing.assert_array_equal(got.view(torch.uint8).cpu().numpy(), w)


def test_fp8_errors(torch_device):
    (q, kc, vc, qi, ic, pt, sl, cu), kw = _fp8_case([(1, 40), (1, 20)], 64, torch_device, torch.bfloat16)
    q16, kc16, vc16, qi16, ic16, _, _, _ = _case([(1, 40), (1, 20)], 64, dev=torch_device)
    with pytest.raises(ValueError, match="k_scale applies to a float8_e4m3fn cache"):
        msa_py.paged_msa_attention(q16, kc16, vc16, qi16, ic16, pt, sl, cu, topk=TOPK, block_size=BS, k_scale=0.5)
    with pytest.raises(ValueError, match="v_cache must have k_cache's dtype"):
        msa_py.paged_msa_attention(q, kc, vc.to(torch.bfloat16), qi, ic, pt, sl, cu, topk=TOPK, block_size=BS, **kw)
    with pytest.raises(ValueError, match="k_cache must be in its queries' dtype"):
        msa_py.paged_msa_attention(q, kc.to(torch.float16), vc.to(torch.float16), qi, ic, pt, sl, cu, topk=TOPK,
                                   block_size=BS, k_idx_scale=kw["k_idx_scale"])
    with pytest.raises(ValueError, match="k_idx_scale must be"):
        msa_py.paged_select_blocks(qi, ic, pt, sl, cu, topk=TOPK, block_size=BS, k_idx_scale=-1.0)
