"""`msa bench`: MSA stage by stage against dense causal attention (torch SDPA)
and a query-major gather baseline, over sequence lengths.

Times are medians of device-event timings after warm-up (MAX events for the
MSA stages, CUDA events for torch), with several input sets rotated so the
L2 cache does not flatter. FLOPs follow MSA.md:
  indexer     2 * causal pairs * Hkv * Di
  attention   4 * (keys attended, summed over queries) * Hq * D
  dense       4 * causal pairs * Hq * D
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path


from . import engine as E

STAGES = ("select", "invert", "block_attention", "combine")


def layer_stage_kinds(spec: E.Spec, device: str) -> dict:
    """The engine kind behind each stage as the msa kind runs it: with the
    forced pass, the inversion without the forced blocks and forced_combine
    (forced blocks' attention fused with the merge) in place of the combine."""
    if E.uses_forced_pass(spec, device):
        return dict(select="select", invert="invert_skip_forced", block_attention="block_attention",
                    combine="forced_combine")
    return {k: k for k in STAGES}


def _progress(i: int, n: int, label: str) -> None:
    w = 30
    done = int(w * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (w - done)}] {i}/{n} {label:40s}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


@contextlib.contextmanager
def value_checks_off():
    """The torch layer's value checks off (MSA_SKIP_VALUE_CHECKS) while timing,
    as in a serving or training loop that validated its batch once; the
    setting is restored after."""
    old = os.environ.get("MSA_SKIP_VALUE_CHECKS")
    os.environ["MSA_SKIP_VALUE_CHECKS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MSA_SKIP_VALUE_CHECKS", None)
        else:
            os.environ["MSA_SKIP_VALUE_CHECKS"] = old


def commit() -> str:
    if os.environ.get("MSA_COMMIT"):  # the GPU machine gets the tree without .git
        return os.environ["MSA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------- inputs
def make_inputs(torch, spec: E.Spec, T: int, S: int, device, scenario: str, seed: int):
    """Random q, k, v, q_idx, k_idx (torch, on device) for one sequence of T
    queries over S keys. scenario "hot": a few key blocks that most queries
    prefer (index keys biased along the queries' common direction)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec.dtype]

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dt)

    q, k, v = r(T, spec.num_heads, spec.head_dim), r(S, spec.num_kv_heads, spec.head_dim), r(S, spec.num_kv_heads, spec.head_dim)
    qi = torch.randn(T, spec.num_kv_heads, spec.idx_dim, generator=g)
    ki = torch.randn(S, spec.idx_dim, generator=g)
    if scenario == "hot":
        u = torch.randn(spec.idx_dim, generator=g)
        u = u / u.norm()
        qi = qi + 2.0 * u
        nblk = (S + spec.block_size - 1) // spec.block_size
        hot = torch.randperm(nblk, generator=g)[: max(1, min(8, nblk // 4))]
        for j in hot.tolist():
            ki[j * spec.block_size : (j + 1) * spec.block_size] += 3.0 * u
    qi, ki = qi.to(device=device, dtype=dt), ki.to(device=device, dtype=dt)
    if spec.idx_dtype:  # the FP8 indexer: e4m3 index inputs (msa_py.quantize_index)
        from .torch_ops import quantize_index

        qi, ki = quantize_index(qi, ki)[:2]
    return q, k, v, qi, ki


def causal_pairs(T: int, S: int) -> int:
    off = S - T
    return T * (off + 1) + T * (T - 1) // 2


def attended_keys(torch, block_ids, T: int, S: int, block_size: int, forced: tuple | None = None) -> int:
    """Keys each query attends (visible keys of its selected blocks), summed.
    forced (init_blocks, local_blocks): only those in each query's forced
    blocks (the forced pass's keys)."""
    p = torch.arange(S - T, S, device=block_ids.device)
    j = block_ids.long()
    keep = j >= 0
    if forced is not None:
        from .reference import is_forced

        keep &= is_forced(j, (p // block_size)[None, :, None], *forced)
    vis = (p[None, :, None] - j * block_size + 1).clamp(0, block_size)
    vis = torch.where(keep, vis, torch.zeros_like(vis))
    return int(vis.sum().item() // block_ids.shape[0])


# --------------------------------------------------------------------------- timing
def _timer(device: str):
    from .timing import time_max

    return lambda fn, iters: time_max(fn, device, warmup=2, iters=iters)["median"]


def _torch_timer(torch, device: str):
    from .timing import time_torch

    if device == "cpu":
        return _timer("cpu")
    return lambda fn, iters: time_torch(fn, warmup=2, iters=iters)["median"]


class MSARunner:
    """Runs the MSA stages on torch tensors through the engine (MAX buffers
    viewing torch memory), so each stage can be timed on its own."""

    def __init__(self, spec: E.Spec, device: str):
        self.spec, self.device = spec, device

    def buffers(self, torch, q, k, v, qi, ki, T, S):
        from .torch_ops import _buf, _idx_bytes

        qi, ki = _idx_bytes(qi), _idx_bytes(ki)

        cu_q = torch.tensor([0, T], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, S], dtype=torch.int32, device=q.device)
        sc = torch.tensor([1 / math.sqrt(self.spec.head_dim)], dtype=torch.float32, device=q.device)
        isc = torch.tensor([1 / math.sqrt(self.spec.idx_dim)], dtype=torch.float32, device=q.device)
        keys = torch.empty(S, dtype=torch.int8, device=q.device)
        return {n: _buf(t) for n, t in dict(q=q, k=k, v=v, q_idx=qi, k_idx=ki, cu_q=cu_q, cu_k=cu_k, scale=sc,
                                            idx_scale=isc, keys=keys).items()}

    def run(self, kind, ins, outputs=None):
        return E.run(kind, self.spec, self.device, {n: ins[n] for n in E.input_names(kind, self.spec)},
                     outputs=outputs)


def dense_sdpa(torch, q, k, v, S: int):
    """Dense causal attention (bottom-right aligned) with torch SDPA, GQA."""
    import torch.nn.functional as F

    T = q.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if T == S:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)


def gather_attention(torch, q, k, v, block_ids, S: int, block_size: int, chunk: int = 2048):
    """Query-major baseline: gather each query's selected K/V rows, attend (torch ops)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    topk = block_ids.shape[2]
    out = torch.empty_like(q)
    ar = torch.arange(block_size, device=q.device)
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        n = c1 - c0
        p = torch.arange(S - T + c0, S - T + c1, device=q.device)
        j = block_ids[:, c0:c1].long().permute(1, 0, 2)  # [n, Hkv, topk]
        keys = (j.clamp(min=0)[..., None] * block_size + ar).reshape(n, Hkv, topk * block_size)
        valid = ((j >= 0)[..., None].expand(n, Hkv, topk, block_size).reshape(n, Hkv, -1)) & (keys <= p[:, None, None])
        keys = keys.clamp(max=S - 1)
        gi = torch.arange(Hkv, device=q.device)[None, :, None]
        ks, vs = k[keys, gi], v[keys, gi]  # [n, Hkv, L, D]
        qq = q[c0:c1].view(n, Hkv, G, D)
        s = torch.matmul(qq, ks.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
        out[c0:c1] = torch.matmul(torch.softmax(s.float(), -1).to(q.dtype), vs).reshape(n, Hq, D)
    return out


def matmul_peak(torch, device: str, dtype) -> float:
    """Measured matmul TFLOP/s, the ceiling for percentages: bf16 8192^3 on the
    GPU, float32 2048^3 on the CPU (torch.matmul on the same threads)."""
    if device == "cpu":
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        ms = _timer("cpu")(lambda: a @ b, 5)
        return 2 * 2048**3 / (ms * 1e-3) / 1e12
    from .timing import time_torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_torch(lambda: a @ b, warmup=3, iters=10)["median"]
    return 2 * n**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- the sweep
def run_bench(spec: E.Spec, lengths, *, device: str, repeats: int = 5, rotate_sets: int = 2, scenario: str = "uniform",
              chunk: int | None = None, gather_max: int = 32768, dense_max: int = 1 << 30, log=print) -> dict:
    import torch

    tdev = "cpu" if device == "cpu" else "cuda"
    tm = _timer(device)
    ttm = _torch_timer(torch, device)
    peak = matmul_peak(torch, device, torch.bfloat16)
    runner = MSARunner(spec, device)
    rows = []
    steps = len(lengths)
    tdev = "cpu" if device == "cpu" else "cuda"
    for li, L in enumerate(lengths):
        try:
            rows.append(_bench_length(torch, spec, L, li, steps, runner, tm, ttm, peak, device, tdev, repeats,
                                      rotate_sets, scenario, chunk, gather_max, dense_max))
        except Exception as e:  # e.g. out of device memory at the longest length: keep the others
            rows.append(dict(T=L, S=L, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            log(f"\nT={L}: {rows[-1]['error']}")
        if device != "cpu":
            torch.cuda.empty_cache()
    _progress(steps, steps, "done")
    # seconds MAX took to compile (or fetch from its cache) each model this run used
    loads = {k: round(sec, 2) for k, sp, d, sec in E.compile_log if sp == spec and d == device}
    return dict(config=asdict(spec), device=device, scenario=scenario, chunk=chunk, repeats=repeats,
                matmul_peak_tflops=peak, rows=rows, model_load_s=loads, commit=commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def time_stage(runner, tm, kind, bufs, repeats: int) -> float:
    """Median ms of one stage, the input sets `bufs` rotated between runs;
    destination buffers allocated once per set, outside the timed region
    (that first call also compiles and warms up)."""
    outs = [runner.run(kind, b) if kind in E.DPS_KINDS else None for b in bufs]
    k_it = iter(range(10**9))

    def call():
        i = next(k_it) % len(bufs)
        return runner.run(kind, bufs[i], outputs=outs[i])

    return tm(call, repeats)


def rotations(spec: E.Spec, T: int, rotate_sets: int) -> int:
    """Input sets to rotate: one where the stored partials of several would not fit (far past L2 anyway)."""
    part_bytes = T * spec.num_heads * spec.topk * spec.head_dim * (4 if spec.dtype == "float32" else 2)
    return 1 if part_bytes > (8 << 30) else rotate_sets


def prepare_layer(runner, bufs, kinds: dict) -> list:
    """Runs the selection and the layer's inversion once on each input set,
    adding block_ids and the work list to it (the later stages' inputs);
    returns the block_ids."""
    bids = [runner.run("select", b)[0] for b in bufs]
    for b, bid in zip(bufs, bids):
        b["block_ids"] = bid
        inv = runner.run(kinds["invert"], b)
        b.update(row_offsets=inv[0], entries=inv[2], work=inv[3], num_work=inv[4])
    return bids


def store_partials(runner, bufs) -> None:
    """One block attention per input set, its partials kept for the merge."""
    for b in bufs:
        o_p, lse_p = runner.run("block_attention", b)
        b.update(o_partial=o_p, lse_partial=lse_p)


def drop_partials(bufs) -> None:
    """Frees the stored partials (34 GB at 128K): each timed block attention makes its own."""
    for b in bufs:
        b.pop("o_partial", None), b.pop("lse_partial", None)


def attention_tflops(torch, spec: E.Spec, block_ids, T: int, S: int, ms: float, forced_pass: bool) -> float:
    """The block attention's effective rate over its own keys: without each
    query's forced blocks where the forced pass takes them."""
    bid_t = torch.from_dlpack(block_ids)
    keys = attended_keys(torch, bid_t, T, S, spec.block_size)
    if forced_pass:
        keys -= attended_keys(torch, bid_t, T, S, spec.block_size, (spec.init_blocks, spec.local_blocks))
    return 4 * keys * spec.num_heads * spec.head_dim / (ms * 1e-3) / 1e12


def select_tflops(spec: E.Spec, T: int, S: int, ms: float) -> float:
    """The indexer's effective rate: 2 x causal pairs x Hkv x Di."""
    return 2 * causal_pairs(T, S) * spec.num_kv_heads * spec.idx_dim / (ms * 1e-3) / 1e12


def _stages_fit(torch, spec: E.Spec, T: int, device: str) -> bool:
    """Whether one call's partials fit half the free memory (the stage-by-stage
    timing keeps them); longer lengths are timed as whole layers only."""
    from . import _validate as V

    per_q = V.workspace_bytes_per_query(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.topk,
                                        4 if spec.dtype == "float32" else 2, T, spec.block_size, spec.q_budget)
    free = torch.cuda.mem_get_info()[0] if device != "cpu" else 0.4 * _ram_bytes()
    return T * per_q < 0.5 * free


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@value_checks_off()
def _bench_layer_only(torch, spec, L, li, steps, ttm, device, tdev, repeats) -> dict:
    """A length whose partials would not fit one call: msa_attention as a
    user calls it (one call, split internally under its workspace budget)
    against dense SDPA; the peak device memory of the MSA calls: torch's
    peak of live tensors (inputs and outputs) plus what MAX holds (its pool
    keeps its peak size), measured after torch's cache is emptied."""
    from . import _validate as V
    from . import torch_ops

    T = S = L
    row = dict(T=T, S=S, layer_only=True)
    if device != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    q, k, v, qi, ki = make_inputs(torch, replace(spec, idx_dtype=""), T, S, tdev, "uniform", seed=0)
    sel_kw = dict(topk=spec.topk, block_size=spec.block_size, init_blocks=spec.init_blocks,
                  local_blocks=spec.local_blocks)
    kw = dict(sel_kw, q_budget=spec.q_budget)
    n = max(1, repeats // 2)
    _progress(li, steps, f"T={L}: MSA layer (one call)")
    if spec.idx_dtype:  # the FP8 indexer, and the bf16 one on the same inputs (the layer quantizes them each call)
        row["msa_bf16_index_ms"] = ttm(lambda: torch_ops.msa_attention(q, k, v, qi, ki, **kw), n)
        row["select_bf16_ms"] = ttm(lambda: torch_ops.select_blocks(qi, ki, **sel_kw), 1)
        q8, k8 = torch_ops.quantize_index(qi, ki)[:2]
        row["select_ms"] = ttm(lambda: torch_ops.select_blocks(q8, k8, **sel_kw), 1)
        del q8, k8
        kw["index_dtype"] = torch.float8_e4m3fn
    else:
        row["select_ms"] = ttm(lambda: torch_ops.select_blocks(qi, ki, **sel_kw), 1)
    row["select_tflops"] = select_tflops(spec, T, S, row["select_ms"])
    row["msa_ms"] = ttm(lambda: torch_ops.msa_attention(q, k, v, qi, ki, **kw), n)
    per_q = V.workspace_bytes_per_query(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.topk, q.element_size(),
                                        S, spec.block_size, spec.q_budget)
    row["pieces"] = -(-T // max(1, torch_ops._workspace_budget(q, None) // per_q))
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        held_by_max = (total - free) - torch.cuda.memory_reserved()  # MAX's pool, the CUDA context
        row["peak_gb"] = (torch.cuda.max_memory_allocated() + held_by_max) / 1e9
    pairs = causal_pairs(T, S)
    dense_flops = 4 * pairs * spec.num_heads * spec.head_dim
    row["msa_tflops_effective"] = dense_flops / (row["msa_ms"] * 1e-3) / 1e12
    _progress(li, steps, f"T={L}: dense SDPA")
    if device != "cpu":  # one warm-up call: at 1M a dense call takes ~37 s
        from .timing import time_torch

        torch.cuda.reset_peak_memory_stats()
        row["dense_ms"] = time_torch(lambda: dense_sdpa(torch, q, k, v, S), warmup=1, iters=1)["median"]
    else:
        row["dense_ms"] = ttm(lambda: dense_sdpa(torch, q, k, v, S), 1)
    if device != "cpu":
        row["dense_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    row["dense_tflops"] = dense_flops / (row["dense_ms"] * 1e-3) / 1e12
    row["speedup_vs_dense"] = row["dense_ms"] / row["msa_ms"]
    if "msa_bf16_index_ms" in row:
        row["bf16_index_speedup_vs_dense"] = row["dense_ms"] / row["msa_bf16_index_ms"]
    return row


def _bench_length(torch, spec, L, li, steps, runner, tm, ttm, peak, device, tdev, repeats, rotate_sets, scenario,
              chunk, gather_max, dense_max) -> dict:
    if not _stages_fit(torch, spec, L, device):
        return _bench_layer_only(torch, spec, L, li, steps, ttm, device, tdev, repeats)
    _progress(li, steps, f"T={L}: compiling / warming up")
    T = S = L
    rotate = rotations(spec, T, rotate_sets)
    sets = [make_inputs(torch, spec, T, S, tdev, scenario, seed=s) for s in range(rotate)]
    bufs = [runner.buffers(torch, *x, T, S) for x in sets]
    it = iter(range(10**9))
    row = dict(T=T, S=S)
    kinds = layer_stage_kinds(spec, device)
    row["forced_pass"] = kinds["combine"] == "forced_combine"
    bids = prepare_layer(runner, bufs, kinds)  # selection and inversion once per set: the later stages' inputs
    store_partials(runner, bufs)
    _progress(li, steps, f"T={L}: timing MSA stages")
    for stage in ("select", "invert", "combine", "block_attention", "msa"):
        kind = kinds.get(stage, stage)
        if kind == "block_attention":
            drop_partials(bufs)
        row[f"{stage}_ms"] = time_stage(runner, tm, kind, bufs, repeats)
    if chunk:
        calls = _chunk_calls(runner, torch, sets[0], T, chunk)
        row["msa_chunked_ms"] = tm(lambda: [runner.run("msa", b) for b in calls], max(1, repeats // 2))
        del calls
    pairs = causal_pairs(T, S)
    keys = attended_keys(torch, torch.from_dlpack(bids[0]), T, S, spec.block_size)
    row["keys_per_query"] = keys / T
    row["select_tflops"] = select_tflops(spec, T, S, row["select_ms"])
    row["attention_tflops"] = attention_tflops(torch, spec, bids[0], T, S, row["block_attention_ms"], row["forced_pass"])
    row["attention_pct_peak"] = 100 * row["attention_tflops"] / peak
    if row["forced_pass"]:  # the forced pass's rate over its own keys (each query's sink and local blocks)
        fkeys = attended_keys(torch, torch.from_dlpack(bids[0]), T, S, spec.block_size,
                              (spec.init_blocks, spec.local_blocks))
        row["forced_tflops"] = 4 * fkeys * spec.num_heads * spec.head_dim / (row["combine_ms"] * 1e-3) / 1e12
        row["forced_pct_peak"] = 100 * row["forced_tflops"] / peak
    # the share of the layer that is not indexer or attention math
    row["invert_combine_pct"] = 100 * (row["invert_ms"] + row["combine_ms"]) / row["msa_ms"]
    row["select_pct_peak"] = 100 * row["select_tflops"] / peak
    dense_flops = 4 * pairs * spec.num_heads * spec.head_dim
    row["msa_tflops_effective"] = dense_flops / (row["msa_ms"] * 1e-3) / 1e12
    if L <= dense_max:
        _progress(li, steps, f"T={L}: dense SDPA")
        row["dense_ms"] = ttm(lambda: dense_sdpa(torch, *sets[next(it) % rotate][:3], S), repeats)
        row["dense_tflops"] = dense_flops / (row["dense_ms"] * 1e-3) / 1e12
        row["speedup_vs_dense"] = row["dense_ms"] / min(row["msa_ms"], row.get("msa_chunked_ms", math.inf))
    if L <= gather_max:
        _progress(li, steps, f"T={L}: gather baseline")
        bt = [torch.from_dlpack(b) for b in bids]
        row["gather_ms"] = ttm(lambda: gather_attention(torch, *sets[0][:3], bt[0], S, spec.block_size),
                               max(1, repeats // 2))
        row["speedup_vs_gather"] = row["gather_ms"] / row["msa_ms"]
    return row


def _chunk_calls(runner, torch, inputs, T: int, chunk: int) -> list:
    """Chunked prefill: queries [c0, c1) over keys [0, c1), one msa call each.
    Their inputs (views, and cu_seqlens made by a host copy that waits for
    the device) are made here, before the timed calls, as a serving engine
    has them ready."""
    q, k, v, qi, ki = inputs
    bounds = [(c0, min(T, c0 + chunk)) for c0 in range(0, T, chunk)]
    return [runner.buffers(torch, q[c0:c1], k[:c1], v[:c1], qi[c0:c1], ki[:c1], c1 - c0, c1) for c0, c1 in bounds]


# --------------------------------------------------------------------------- output
COLUMNS = [
    ("T", "T", "{:>7d}"),
    ("select_ms", "select", "{:8.3f}"),
    ("invert_ms", "invert", "{:8.3f}"),
    ("block_attention_ms", "attn", "{:8.3f}"),
    ("combine_ms", "combine", "{:8.3f}"),
    ("msa_ms", "MSA", "{:8.3f}"),
    ("msa_bf16_index_ms", "MSA bf16 idx", "{:12.3f}"),
    ("select_bf16_ms", "sel bf16 idx", "{:12.3f}"),
    ("msa_chunked_ms", "chunked", "{:8.3f}"),
    ("dense_ms", "dense", "{:8.3f}"),
    ("gather_ms", "gather", "{:8.3f}"),
    ("select_tflops", "sel TF/s", "{:8.4g}"),
    ("attention_tflops", "attn TF/s", "{:9.4g}"),
    ("select_pct_peak", "sel %pk", "{:7.1f}"),
    ("attention_pct_peak", "attn %pk", "{:8.1f}"),
    ("forced_tflops", "fp TF/s", "{:8.4g}"),
    ("forced_pct_peak", "fp %pk", "{:6.1f}"),
    ("invert_combine_pct", "inv+cmb %", "{:9.1f}"),
    ("speedup_vs_dense", "x dense", "{:7.2f}"),
    ("bf16_index_speedup_vs_dense", "x dense bf16 idx", "{:16.2f}"),
    ("peak_gb", "peak GB", "{:7.1f}"),
    ("pieces", "pieces", "{:6d}"),
    ("speedup_vs_gather", "x gather", "{:8.2f}"),
]


def _config_text(c: dict) -> str:
    return (f"{c['dtype']} Hq {c['num_heads']} Hkv {c['num_kv_heads']} D {c['head_dim']} Di {c['idx_dim']} "
            f"topk {c['topk']} block {c['block_size']}" + (", FP8 indexer (e4m3 q_idx, k_idx)" if c.get("idx_dtype") else ""))


def table(result: dict) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in result["rows"])]
    head = " ".join(f"{name:>{len(fmt.format(0) if 'd' in fmt else fmt.format(0.0))}}" for _, name, fmt in cols)
    lines = [head]
    for r in result["rows"]:
        cells = []
        for key, name, fmt in cols:
            w = len(fmt.format(0) if "d" in fmt else fmt.format(0.0))
            cells.append(fmt.format(r[key]) if key in r else " " * (w - 1) + "-")
        lines.append(" ".join(cells))
    lines.append(f"(ms, median of {result['repeats']}; {_config_text(result['config'])}; scenario "
                 f"{result['scenario']}; matmul peak {result['matmul_peak_tflops']:.4g} TF/s)")
    if any(r.get("layer_only") for r in result["rows"]):
        lines.append("(rows with pieces: partials too large for one call's stages, so the whole layer only: one "
                     "msa_attention call, split internally under its workspace budget; peak GB: torch's peak of live "
                     "tensors, inputs and outputs included, plus the memory MAX holds)")
    if any(r.get("forced_pass") for r in result["rows"]):
        lines.append("(combine: the forced pass, each query's sink and local blocks attended to and merged with the "
                     "partials of its other blocks; attn and attn TF/s: the block attention over those other blocks; "
                     "fp TF/s: the forced pass over the sink and local blocks' keys; %pk: of the matmul peak)")
    if result.get("model_load_s"):
        lines.append(f"(models compiled or fetched from MAX's cache in {sum(result['model_load_s'].values()):.1f} s)")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on GPU machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes(ax, xlabel: str, ylabel: str, *, log_y: bool = False, title: str | None = None) -> None:
    """Log2 x axis (sizes double), labels and legend, the same on every plot."""
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))

    def lines(ax, series, ylabel, title):
        for key, label in series:
            pts = [(r["T"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        _axes(ax, "tokens", ylabel, log_y=True, title=title)

    lines(a, (("msa_ms", "MSA (whole layer)"), ("msa_chunked_ms", "MSA chunked prefill"),
              ("dense_ms", "dense SDPA (causal)"), ("gather_ms", "query-major gather"),
              ("select_ms", "MSA select"), ("block_attention_ms", "MSA block attention")), "ms", "time")
    b.axhline(1.0, color="gray", lw=0.8)
    lines(b, (("speedup_vs_dense", "vs dense SDPA"), ("speedup_vs_gather", "vs gather")), "speedup of MSA", "speedup")
    c = result["config"]
    fig.suptitle(f"MSA on {result.get('device_name', result['device'])}: {c['dtype']}, Hq {c['num_heads']}, "
                 f"Hkv {c['num_kv_heads']}, D {c['head_dim']}, topk {c['topk']}, scenario {result['scenario']}",
                 fontsize=9)
    _save(fig, path)


def save(result: dict, out: Path, plotter=None) -> tuple[Path, Path]:
    """Writes out.json and out.png (plotter: plot, or decode_plot for decode results)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    js = out.with_suffix(".json")
    png = out.with_suffix(".png")
    js.write_text(json.dumps(result, indent=1))
    (plotter or plot)(result, png)
    return js, png


# --------------------------------------------------------------------------- decode
def copy_bandwidth(torch, device: str) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written)."""
    if device == "cpu":
        return float("nan")
    from .timing import time_torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = time_torch(lambda: y.copy_(x), warmup=3, iters=10)["median"]
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def _paged_buffers(torch, runner, bufs, k, v, ki, B: int, Tk: int, seed: int, fp8: bool = False) -> dict:
    """The same caches as shuffled pages: physical page perm[i] holds logical
    block i (sequence i // pages, block i % pages); the paged layer's inputs.
    fp8: the caches quantized to e4m3 with per-tensor scales amax / 448 (as
    an engine's calibration would), their scales folded as the torch layer does."""
    from . import _validate as V
    from .paged import FP8, quantize_cache
    from .torch_ops import _buf

    bs = runner.spec.block_size
    npg = -(-Tk // bs)
    pad = npg * bs - Tk

    def pages(x):  # [B * Tk, ...] -> [B * npg, bs, ...], each sequence padded to whole pages
        x = x.view(B, Tk, *x.shape[1:])
        if pad:
            x = torch.cat([x, x.new_zeros((B, pad) + tuple(x.shape[2:]))], 1)
        return x.reshape(B * npg, bs, *x.shape[2:])

    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(B * npg, generator=g).to(k.device)
    caches = []
    for x in (k, v, ki):
        p = pages(x)
        c = torch.empty_like(p)
        c[perm] = p
        caches.append(c)
    kc, vc, ic = caches
    pt = perm.view(B, npg).to(torch.int32)
    geom = torch.tensor(V.cache_geometry(kc.stride(), ic.stride(), npg), dtype=torch.int64, device=k.device)
    sl = torch.full((B,), Tk, dtype=torch.int32, device=k.device)
    extra = {}
    if fp8:
        sc = [max(float(x.abs().max()), 1e-30) / 448.0 for x in (kc, vc, ic)]
        kc, vc, ic = (quantize_cache(x, FP8, s).view(torch.uint8) for x, s in zip((kc, vc, ic), sc))
        f32 = lambda x: torch.tensor([x], dtype=torch.float32, device=k.device)  # noqa: E731
        spec = runner.spec
        scales = (f32(sc[0] / math.sqrt(spec.head_dim)), f32(sc[2] / math.sqrt(spec.idx_dim)), f32(sc[1]))
        extra = dict(scale=_buf(scales[0]), idx_scale=_buf(scales[1]), v_scale=_buf(scales[2]), _scales=scales,
                     _raw_scales=(sc[0], sc[1], sc[2]))  # k_scale, v_scale, k_idx_scale
    return dict(bufs, k_cache=_buf(kc.view(-1)), v_cache=_buf(vc.view(-1)), k_idx_cache=_buf(ic.view(-1)),
                page_table=_buf(pt), seq_lens=_buf(sl), geometry=_buf(geom), _keep=(kc, vc, ic, pt, sl, geom), **extra)


def decode_plan(torch, spec: E.Spec, pb: dict, q, qi, B: int, n_new: int, fp8: bool = False):
    """A PagedDecodePlan over the paged caches of `pb` (_paged_buffers), its
    inputs written: q, q_idx, the page table and seq_lens. fp8: pb's e4m3
    caches (their scales) and the FP8 indexer, q_idx rows quantized as an
    engine would write them."""
    from .plan import PagedDecodePlan
    from .torch_ops import FP8, quantize_rows

    kc, vc, ic, pt, sl, _ = pb["_keep"]
    kw = {}
    if fp8:
        kc, vc, ic = (x.view(FP8) for x in (kc, vc, ic))
        ks, vs, iks = pb["_raw_scales"]
        kw = dict(dtype=q.dtype, k_scale=ks, v_scale=vs, k_idx_scale=iks, index_dtype=FP8)
    plan = PagedDecodePlan(kc, vc, ic, max_batch=B, max_pages=pt.shape[1], num_heads=spec.num_heads, n_new=n_new,
                           topk=spec.topk, block_size=spec.block_size, init_blocks=spec.init_blocks,
                           local_blocks=spec.local_blocks, **kw)
    plan.q.copy_(q)
    plan.q_idx.copy_(quantize_rows(qi)[0] if fp8 else qi)
    plan.page_table.copy_(pt)
    plan.seq_lens.copy_(sl)
    return plan


def _plan_overhead(torch, spec: E.Spec, pb: dict, q, qi, B: int, n_new: int, repeats: int, prefix: str = "plan",
                   fp8: bool = False) -> dict:
    """decode_plan's wall time per eager `run()` in a loop of 20 with one
    sync at the end (what a step costs when the host launches it), and on
    CUDA per replay of one CUDA graph captured around `run()` (the kernels
    alone, no host work)."""
    plan = decode_plan(torch, spec, pb, q, qi, B, n_new, fp8)
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)

    def per_call(fn, n=20) -> float:
        fn()
        sync()
        ts = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            ts.append((time.perf_counter() - t0) * 1e3 / n)
        return float(sorted(ts)[len(ts) // 2])

    res = {f"{prefix}_eager_ms": per_call(plan.run)}
    if q.is_cuda:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            plan.run()
        res[f"{prefix}_graph_ms"] = per_call(g.replay)
        res[f"{prefix}_eager_over_graph"] = res[f"{prefix}_eager_ms"] / res[f"{prefix}_graph_ms"]
    return res


def selection_overlap(a, b) -> float:
    """The share of b's selected blocks (-1 padding left out) that a selects
    too; a, b: selections [Hkv, T, topk] (torch) of the same rows."""
    a, b = a.long(), b.long()
    same = (b.unsqueeze(-1) == a.unsqueeze(-2)).any(-1) & (b >= 0)
    return float(same.sum()) / max(1, int((b >= 0).sum()))


def run_decode_bench(spec: E.Spec, batches, contexts, *, device: str, n_new: int = 1, repeats: int = 5,
                     paged: bool = False, kv_fp8: bool = False, fp8_index: bool = False, lean: bool = False,
                     log=print) -> dict:
    """Decode shapes: each of B sequences has n_new new queries (the last
    n_new of its Tk keys) over a cache of Tk keys. MSA (whole layer) on the
    decode kernels (indexer split over keys, query-major attention) and on
    the general prefill path, against dense decode (SDPA over the same
    cache, GQA). Bandwidth counts the index keys + selected K/V rows read +
    q/out over the decode path's time: the bytes any exact MSA must move.
    paged: the same caches also as shuffled pages of block_size keys, the
    paged layer timed beside the contiguous one (paged_ms). kv_fp8 (with
    paged): those pages also in e4m3 (K, V and index keys, per-tensor
    scales), timed (fp8_ms), its bytes, and its selection's overlap with the
    16-bit one (quantizing the index keys moves some near-tied blocks).
    fp8_index (with kv_fp8): the same e4m3 caches with the FP8 indexer
    (q_idx rows in e4m3 too), timed (fp8q_ms), and as a PagedDecodePlan.
    lean: only the contiguous layer, dense and the e4m3 rows (no stages
    apart, no general path, no paged 16-bit layer): long contexts."""
    import torch
    import torch.nn.functional as F

    tdev = "cpu" if device == "cpu" else "cuda"
    tm = _timer(device)
    ttm = _torch_timer(torch, device)
    bw = copy_bandwidth(torch, device)
    dec = MSARunner(replace(spec, decode=True), device)
    f8 = MSARunner(replace(spec, decode=True, kv_cache_dtype="float8_e4m3fn", idx_cache_dtype="float8_e4m3fn"), device)
    # the FP8 indexer on top: q_idx rows quantized too, the scores on e4m3 tensor cores
    f8q = MSARunner(replace(f8.spec, idx_dtype="float8_e4m3fn", decode_queries=n_new if device != "cpu" else 0),
                    device)
    gen = MSARunner(replace(spec, decode=False), device)
    esize = 4 if spec.dtype == "float32" else 2
    rows = []
    steps = len(batches) * len(contexts)
    i = 0
    for B in batches:
        for Tk in contexts:
            _progress(i, steps, f"decode B={B} Tk={Tk}")
            i += 1
            try:
                q, k, v, qi, ki = make_inputs(torch, spec, B * n_new, B * Tk, tdev, "uniform", seed=i)
                bufs = dec.buffers(torch, q, k, v, qi, ki, B * n_new, B * Tk)
                cu_q = torch.arange(0, B + 1, dtype=torch.int32, device=tdev) * n_new
                cu_k = torch.arange(0, B + 1, dtype=torch.int32, device=tdev) * Tk
                from .torch_ops import _buf

                bufs.update(cu_q=_buf(cu_q), cu_k=_buf(cu_k))
                row = dict(B=B, Tk=Tk, n_new=n_new)
                outs = dec.run("msa", bufs)
                row["msa_ms"] = tm(lambda: dec.run("msa", bufs, outputs=outs), repeats)
                if not lean:
                    sel = dec.run("select", bufs)
                    row["select_ms"] = tm(lambda: dec.run("select", bufs, outputs=sel), repeats)
                    sp_ins = dict(bufs, block_ids=sel[0])
                    sp = dec.run("sparse", sp_ins)
                    row["attention_ms"] = tm(lambda: dec.run("sparse", sp_ins, outputs=sp), repeats)
                    g_outs = gen.run("msa", bufs)
                    row["msa_general_ms"] = tm(lambda: gen.run("msa", bufs, outputs=g_outs), repeats)
                    del sel, sp_ins, sp, g_outs
                if paged and not lean:
                    pb = _paged_buffers(torch, dec, bufs, k, v, ki, B, Tk, seed=i)
                    p_outs = dec.run("paged_msa", pb)
                    row["paged_ms"] = tm(lambda: dec.run("paged_msa", pb, outputs=p_outs), repeats)
                    row["paged_over_contiguous"] = row["paged_ms"] / row["msa_ms"]
                    p_bid, c_bid = torch.from_dlpack(p_outs[2]), torch.from_dlpack(outs[2])
                    row["paged_same_selection"] = bool(torch.equal(p_bid, c_bid))
                    row.update(_plan_overhead(torch, spec, pb, q, qi, B, n_new, repeats))
                    del pb, p_outs
                if paged and kv_fp8:
                    pb8 = _paged_buffers(torch, f8, bufs, k, v, ki, B, Tk, seed=i, fp8=True)
                    f_outs = f8.run("paged_msa", pb8)
                    row["fp8_ms"] = tm(lambda: f8.run("paged_msa", pb8, outputs=f_outs), repeats)
                    row["fp8_selection_overlap"] = selection_overlap(torch.from_dlpack(f_outs[2]),
                                                                     torch.from_dlpack(outs[2]))
                    if device != "cpu":  # its two stages apart on the card (two more compiled models)
                        s8 = f8.run("paged_select", pb8)
                        row["fp8_select_ms"] = tm(lambda: f8.run("paged_select", pb8, outputs=s8), repeats)
                        a8_ins = dict(pb8, block_ids=s8[0])
                        a8 = f8.run("paged_sparse", a8_ins)
                        row["fp8_attention_ms"] = tm(lambda: f8.run("paged_sparse", a8_ins, outputs=a8), repeats)
                        del s8, a8_ins, a8
                    del f_outs
                if paged and kv_fp8 and fp8_index:  # the same e4m3 pages (pb8)
                    from .torch_ops import _buf, quantize_rows

                    q8 = quantize_rows(qi)[0].view(torch.uint8)
                    pbq = dict(pb8, q_idx=_buf(q8), _q8=q8)
                    q_outs = f8q.run("paged_msa", pbq)
                    row["fp8q_ms"] = tm(lambda: f8q.run("paged_msa", pbq, outputs=q_outs), repeats)
                    row["fp8q_selection_overlap"] = selection_overlap(torch.from_dlpack(q_outs[2]),
                                                                      torch.from_dlpack(outs[2]))
                    if device != "cpu":
                        sq = f8q.run("paged_select", pbq)
                        row["fp8q_select_ms"] = tm(lambda: f8q.run("paged_select", pbq, outputs=sq), repeats)
                        del sq
                    row.update(_plan_overhead(torch, spec, pb8, q, qi, B, n_new, repeats, prefix="fp8q_plan", fp8=True))
                    del pbq, q_outs
                if paged and kv_fp8:
                    del pb8
                # dense decode over the same cache: q [B, Hq, n_new, D], k/v [B, Hkv, Tk, D]
                qd = q.view(B, n_new, spec.num_heads, spec.head_dim).transpose(1, 2)
                kd = k.view(B, Tk, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
                vd = v.view(B, Tk, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
                mask = None if n_new == 1 else torch.ones(n_new, Tk, dtype=torch.bool, device=tdev).tril(Tk - n_new)
                row["dense_ms"] = ttm(
                    lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True), repeats)
                sel_rows = min(spec.topk * spec.block_size, Tk)
                moved = (B * Tk * spec.idx_dim * esize  # index keys
                         + B * n_new * spec.num_kv_heads * sel_rows * spec.head_dim * esize * 2  # selected K and V
                         + 2 * B * n_new * spec.num_heads * spec.head_dim * esize)  # q and out
                gbps = moved / (row["msa_ms"] * 1e-3) / 1e9
                row.update(speedup_vs_dense=row["dense_ms"] / row["msa_ms"], gbytes_moved=moved / 1e9, gbps=gbps,
                           pct_copy_bw=100 * gbps / bw)
                if "fp8_ms" in row:  # e4m3 caches: half the index-key and K/V bytes
                    moved8 = moved - (B * Tk * spec.idx_dim + B * n_new * spec.num_kv_heads * sel_rows
                                      * spec.head_dim * 2) * (esize - 1)
                    gbps8 = moved8 / (row["fp8_ms"] * 1e-3) / 1e9
                    row.update(fp8_speedup_vs_dense=row["dense_ms"] / row["fp8_ms"], fp8_gbytes_moved=moved8 / 1e9,
                               fp8_pct_copy_bw=100 * gbps8 / bw)
                    if "fp8q_ms" in row:  # the same bytes (q_idx in e4m3: a few KB less)
                        row.update(fp8q_speedup_vs_dense=row["dense_ms"] / row["fp8q_ms"],
                                   fp8q_pct_copy_bw=100 * moved8 / (row["fp8q_ms"] * 1e-3) / 1e9 / bw)
                rows.append(row)
            except Exception as e:  # keep the other shapes
                rows.append(dict(B=B, Tk=Tk, n_new=n_new, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                log(f"\nB={B} Tk={Tk}: {rows[-1]['error']}")
            if device != "cpu":
                torch.cuda.empty_cache()
    _progress(steps, steps, "done")
    return dict(config=asdict(spec), device=device, mode="decode", n_new=n_new, repeats=repeats, paged=paged,
                kv_fp8=kv_fp8, copy_bandwidth_gbps=bw, rows=rows, commit=commit(), date=time.strftime("%Y-%m-%d %H:%M:%S"))


def decode_table(result: dict) -> str:
    lines = [f"{'B':>4} {'Tk':>8} {'MSA ms':>9} {'select':>8} {'attn':>8} {'general':>8} {'dense ms':>9} "
             f"{'x dense':>8} {'GB/s':>8} {'% copy':>7}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['B']:>4} {r['Tk']:>8} {r['error']}")
            continue
        lines.append(f"{r['B']:>4} {r['Tk']:>8} {r['msa_ms']:9.3f} {r.get('select_ms', float('nan')):8.3f} "
                     f"{r.get('attention_ms', float('nan')):8.3f} {r.get('msa_general_ms', float('nan')):8.3f} "
                     f"{r['dense_ms']:9.3f} {r['speedup_vs_dense']:8.2f} {r['gbps']:8.1f} {r['pct_copy_bw']:7.1f}")
    if any("paged_ms" in r for r in result["rows"]):
        lines.append("paged (shuffled pages of block_size keys, same caches): "
                     + ", ".join(f"B={r['B']} Tk={r['Tk']}: {r['paged_ms']:.3f} ms ({r['paged_over_contiguous']:.3f}x, "
                                 f"selection {'same' if r['paged_same_selection'] else 'DIFFERENT'})"
                                 for r in result["rows"] if "paged_ms" in r))
    if any("plan_eager_ms" in r for r in result["rows"]):
        lines.append("PagedDecodePlan.run(), wall per step in a loop: "
                     + ", ".join(f"B={r['B']} Tk={r['Tk']}: eager {r['plan_eager_ms']:.3f} ms"
                                 + (f", CUDA graph replay {r['plan_graph_ms']:.3f} ms (eager "
                                    f"{r['plan_eager_over_graph']:.3f}x)" if "plan_graph_ms" in r else "")
                                 for r in result["rows"] if "plan_eager_ms" in r))
    if any("fp8_ms" in r for r in result["rows"]):
        lines.append("paged, e4m3 caches (K, V, index keys): "
                     + ", ".join(f"B={r['B']} Tk={r['Tk']}: {r['fp8_ms']:.3f} ms ({r['fp8_speedup_vs_dense']:.2f}x dense, "
                                 f"{r['fp8_pct_copy_bw']:.0f}% copy bw, selection overlap "
                                 f"{100 * r['fp8_selection_overlap']:.1f}%"
                                 + (f"; select {r['fp8_select_ms']:.3f}, attn {r['fp8_attention_ms']:.3f}"
                                    if "fp8_select_ms" in r else "") + ")"
                                 for r in result["rows"] if "fp8_ms" in r))
    if any("fp8q_ms" in r for r in result["rows"]):
        lines.append("the same, FP8 indexer (q_idx rows in e4m3 too, index_dtype=torch.float8_e4m3fn): "
                     + ", ".join(f"B={r['B']} Tk={r['Tk']}: {r['fp8q_ms']:.3f} ms ({r['fp8q_speedup_vs_dense']:.2f}x "
                                 f"dense, {r['fp8q_pct_copy_bw']:.0f}% copy bw, selection overlap "
                                 f"{100 * r['fp8q_selection_overlap']:.1f}%"
                                 + (f"; select {r['fp8q_select_ms']:.3f}" if "fp8q_select_ms" in r else "")
                                 + f"; PagedDecodePlan eager {r['fp8q_plan_eager_ms']:.3f} ms"
                                 + (f", CUDA graph replay {r['fp8q_plan_graph_ms']:.3f} ms (eager "
                                    f"{r['fp8q_plan_eager_over_graph']:.3f}x)" if "fp8q_plan_graph_ms" in r else "")
                                 + ")"
                                 for r in result["rows"] if "fp8q_ms" in r))
    lines.append("(MSA: decode kernels, whole layer; select / attn: its indexer and attention+combine; general: "
                 "the prefill path on the same inputs)")
    lines.append(f"(decode, {result['n_new']} new token(s) per sequence; {_config_text(result['config'])}; "
                 f"copy bandwidth {result['copy_bandwidth_gbps']:.0f} GB/s)")
    return "\n".join(lines)


def decode_plot(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for B in sorted({r["B"] for r in result["rows"]}):
        pts = [(r["Tk"], r["speedup_vs_dense"]) for r in result["rows"] if r["B"] == B and "error" not in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"batch {B}")
    ax.axhline(1.0, color="gray", lw=0.8)
    _axes(ax, "context (keys per sequence)", "MSA speedup over dense decode")
    _save(fig, path)


# --------------------------------------------------------------------------- backward
@value_checks_off()
def run_backward_bench(spec: E.Spec, lengths, *, device: str, repeats: int = 5, log=print) -> dict:
    """Training shapes: one sequence of T tokens; MSA forward (with autograd,
    msa_py.msa_attention) and forward + backward against dense causal SDPA
    forward and forward + backward (torch autograd), same inputs, same run.
    The torch layer's value checks are off (MSA_SKIP_VALUE_CHECKS), as in a
    training step that validated its batch once. The backward is timed on
    its own (.backward on a kept forward graph). Backward rate: the five
    products of the backward over the selected keys, 10 * keys * Hq * D."""
    import torch
    import torch.nn.functional as F

    from . import torch_ops

    tdev = "cpu" if device == "cpu" else "cuda"
    ttm = _torch_timer(torch, device)
    rows = []
    kw = dict(topk=spec.topk, block_size=spec.block_size, init_blocks=spec.init_blocks,
              local_blocks=spec.local_blocks, q_budget=spec.q_budget)
    for li, L in enumerate(lengths):
        _progress(li, len(lengths), f"T={L}: backward")
        try:
            q, k, v, qi, ki = make_inputs(torch, spec, L, L, tdev, "uniform", seed=li)
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            dout = torch.randn_like(q)

            def fwd():
                return torch_ops.msa_attention(*leaves, qi, ki, **kw)

            def fwd_bwd():
                for x in leaves:
                    x.grad = None
                out, _ = fwd()
                out.backward(dout)

            row = dict(T=L, S=L)
            row["fwd_ms"] = ttm(fwd, repeats)
            row["fwd_bwd_ms"] = ttm(fwd_bwd, repeats)
            # the backward timed on its own (one forward's graph kept): the
            # difference of the two timings above goes negative on a noisy host
            out_kept, _ = fwd()

            def bwd():
                for x in leaves:
                    x.grad = None
                out_kept.backward(dout, retain_graph=True)

            row["bwd_ms"] = ttm(bwd, repeats)
            del out_kept
            with torch.no_grad():
                bid = torch_ops.select_blocks(qi, ki, **{n: kw[n] for n in ("topk", "block_size", "init_blocks",
                                                                           "local_blocks")})
            keys = attended_keys(torch, bid, L, L, spec.block_size)
            row["bwd_tflops"] = 10 * keys * spec.num_heads * spec.head_dim / (row["bwd_ms"] * 1e-3) / 1e12
            row["bwd_over_fwd"] = row["bwd_ms"] / row["fwd_ms"]
            dl = [x.detach().transpose(0, 1)[None].requires_grad_(True) for x in (q, k, v)]
            d_dout = dout.transpose(0, 1)[None]

            def dense_fwd():
                return F.scaled_dot_product_attention(*dl, is_causal=True, enable_gqa=True)

            def dense_fwd_bwd():
                for x in dl:
                    x.grad = None
                dense_fwd().backward(d_dout)

            row["dense_fwd_ms"] = ttm(dense_fwd, repeats)
            row["dense_fwd_bwd_ms"] = ttm(dense_fwd_bwd, repeats)
            row["speedup_fwd_bwd"] = row["dense_fwd_bwd_ms"] / row["fwd_bwd_ms"]
            rows.append(row)
            leaves = dl = q = k = v = qi = ki = None  # free the inputs before the next length
        except Exception as e:  # e.g. out of memory at the longest length: keep the others
            rows.append(dict(T=L, S=L, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            log(f"\nT={L}: {rows[-1]['error']}")
        if device != "cpu":
            torch.cuda.empty_cache()
    _progress(len(lengths), len(lengths), "done")
    return dict(config=asdict(spec), device=device, mode="backward", repeats=repeats, rows=rows, commit=commit(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def backward_table(result: dict) -> str:
    lines = [f"{'T':>7} {'fwd':>9} {'bwd':>9} {'fwd+bwd':>9} {'bwd/fwd':>8} {'bwd TF/s':>9} {'dense fwd':>10} "
             f"{'dense f+b':>10} {'x dense f+b':>12}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['T']:>7} {r['error']}")
            continue
        lines.append(f"{r['T']:>7} {r['fwd_ms']:9.3f} {r['bwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} {r['bwd_over_fwd']:8.2f} "
                     f"{r['bwd_tflops']:9.4g} {r['dense_fwd_ms']:10.3f} {r['dense_fwd_bwd_ms']:10.3f} "
                     f"{r['speedup_fwd_bwd']:12.2f}")
    lines.append(f"(ms, median of {result['repeats']}; training step of the attention: msa_attention forward with "
                 f"autograd, then .backward; {_config_text(result['config'])}; dense: causal SDPA forward / forward + "
                 f"backward)")
    return "\n".join(lines)


def backward_plot(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in result["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("fwd_bwd_ms", "MSA forward + backward"), ("dense_fwd_bwd_ms", "dense SDPA forward + backward"),
                       ("bwd_ms", "MSA backward")):
        if rows:
            ax.plot([r["T"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    _axes(ax, "tokens", "ms", log_y=True)
    _save(fig, path)


# --------------------------------------------------------------------------- several devices
@value_checks_off()
def run_distributed_bench(spec: E.Spec, lengths, *, device: str, repeats: int = 3, log=print) -> dict:
    """Under torchrun (RANK / WORLD_SIZE set): context-parallel prefill of one
    sequence (msa_py.distributed.cp_msa_attention, zigzag split, K / V /
    index keys all-gathered) against dense attention run the same way (each
    rank's two chunks against the all-gathered K / V, SDPA), and tensor
    parallel (each rank's Hkv / n KV groups) against the whole heads on one
    device; the one-device rows run on rank 0 in the same run. Times are the
    slowest rank's, after a barrier. Returns the rows on every rank."""
    import torch
    import torch.distributed as dist

    from . import distributed as Dd
    from . import torch_ops

    cuda = device != "cpu"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    tdev = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    kw = dict(topk=spec.topk, block_size=spec.block_size, init_blocks=spec.init_blocks,
              local_blocks=spec.local_blocks)

    def timed(fn) -> float:
        """Median over repeats of the slowest rank's wall time (ms), after a barrier."""
        fn()
        ts = []
        for _ in range(repeats):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            t = torch.tensor([(time.perf_counter() - t0) * 1e3])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ts.append(float(t))
        return sorted(ts)[len(ts) // 2]

    rows = []
    for L in lengths:
        q, k, v, qi, ki = make_inputs(torch, spec, L, L, tdev, "uniform", seed=0)
        mine = [Dd.zigzag_split(x, rank, world).contiguous() for x in (q, k, v, qi, ki)]
        row = dict(T=L, world=world)
        row["cp_ms"] = timed(lambda: Dd.cp_msa_attention(*mine, seq_len=L, **kw))

        def dense_cp():
            k_all, v_all = (Dd._all_gather_tokens(x, L, None) for x in mine[1:3])
            i = 0
            for c0, c1 in Dd.zigzag_chunks(L, rank, world):
                dense_sdpa(torch, mine[0][i:i + c1 - c0], k_all[:c1], v_all[:c1], c1)
                i += c1 - c0

        row["dense_cp_ms"] = timed(dense_cp)
        sl = Dd.tp_shard(rank, world, spec.num_heads, spec.num_kv_heads)
        shard = [x[:, s].contiguous() for x, s in zip((q, k, v, qi), (sl.q, sl.kv, sl.kv, sl.kv))]
        row["tp_ms"] = timed(lambda: torch_ops.msa_attention(*shard, ki, **kw))
        if rank == 0:  # one device, whole sequence and heads, the same call a user makes
            fn = lambda: torch_ops.msa_attention(q, k, v, qi, ki, **kw)  # noqa: E731
            fn()
            if cuda:
                torch.cuda.synchronize()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e3)
            row["one_device_ms"] = sorted(ts)[len(ts) // 2]
            row["cp_speedup"] = row["one_device_ms"] / row["cp_ms"]
            row["tp_over_ideal"] = row["tp_ms"] / (row["one_device_ms"] / world)
            row["cp_vs_dense_cp"] = row["dense_cp_ms"] / row["cp_ms"]
        dist.barrier()
        rows.append(row)
        q = k = v = qi = ki = mine = shard = None  # free the inputs before the next length
        if cuda:
            torch.cuda.empty_cache()
    return dict(config=asdict(spec), device=device, mode="distributed", world=world, repeats=repeats, rows=rows,
                commit=commit(), date=time.strftime("%Y-%m-%d %H:%M:%S"))


def distributed_table(result: dict) -> str:
    lines = [f"{'T':>8} {'world':>5} {'1 device':>9} {'CP':>9} {'CP x':>6} {'dense CP':>9} {'MSA/dense':>9} "
             f"{'TP/rank':>9} {'TP / ideal':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['T']:>8} {r['world']:>5} {r.get('one_device_ms', float('nan')):9.2f} {r['cp_ms']:9.2f} "
                     f"{r.get('cp_speedup', float('nan')):6.2f} {r['dense_cp_ms']:9.2f} "
                     f"{r.get('cp_vs_dense_cp', float('nan')):9.2f} {r['tp_ms']:9.2f} "
                     f"{r.get('tp_over_ideal', float('nan')):10.2f}")
    lines.append(f"(ms, median of {result['repeats']}, the slowest rank; CP: context-parallel prefill, zigzag split, "
                 f"K/V/index keys all-gathered; dense CP: SDPA on each rank's chunks against the gathered K/V; TP: "
                 f"Hkv / world KV groups a rank, ideal = one device / world; {_config_text(result['config'])})")
    return "\n".join(lines)
