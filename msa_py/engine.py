"""Builds, compiles once and caches MAX models of the MSA graphs.

One compiled model per (graph kind, static configuration, device): token
counts T, S and the batch B are symbolic, so every sequence length and batch
composition reuses it. Scales are graph inputs, so they never recompile.

Graph kinds (inputs -> outputs):
  msa     q, k, v, q_idx, k_idx, cu_q, cu_k, scale, idx_scale -> out, lse, block_ids
  sparse  q, k, v, block_ids, cu_q, cu_k, scale               -> out, lse
  sparse_backward q, k, v, block_ids, out, lse, dout, dlse, cu_q, cu_k, scale -> dq, dk, dv
  select  q_idx, k_idx, cu_q, cu_k, idx_scale                  -> block_ids
  combine o_partial, lse_partial                               -> out, lse
  invert  block_ids, cu_q, cu_k, keys[S] (a shape carrier)     -> Inversion
  invert_skip_forced  as invert, leaving each query's forced blocks
          (spec.init_blocks / local_blocks) out: the layer's inversion
  forced_combine q, k, v, o_partial, lse_partial, cu_q, cu_k, scale -> out, lse
          (the layer's forced pass: forced blocks attended to, merged)
  block_attention q, k, v, row_offsets, entries, work, num_work,
          cu_q, cu_k, scale                                    -> o_partial, lse_partial
  stages  the msa inputs -> block_ids, Inversion, o_partial, lse_partial, out, lse
          (as the msa kind runs them: with the forced pass where it applies,
          `uses_forced_pass`)
  paged_msa   q, k_cache, v_cache, q_idx, k_idx_cache (flat storage), page_table, seq_lens,
          cu_q, geometry, scale, idx_scale [, v_scale] -> out, lse, block_ids
          (e4m3 caches: Spec.kv_cache_dtype / idx_cache_dtype; k_scale and
          k_idx_scale folded into scale and idx_scale, v_scale an input)
  paged_select, paged_sparse: the paged stages (msa_py.graph.paged_*)
  decode_stages the msa inputs -> block_ids, out, lse
          (decode kernels: indexer split over keys, query-major attention, merge fused)
Spec.decode picks the decode kernels for msa / sparse / select (the torch
layer sets it when a batch has at most DECODE_MAX_Q queries per sequence).
The first four write into caller-allocated buffers (destination-passing
style, so torch allocates its outputs); the others return MAX buffers.

`run_numpy` runs a kind on NumPy arrays (bf16 given as float32 values, rounded
on the host) on "cpu" or "gpu" and returns NumPy arrays.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from . import graph as G
from .build import kernels_path

KINDS = ("msa", "sparse", "sparse_backward", "select", "paged_msa", "paged_select", "paged_sparse", "combine", "invert", "invert_skip_forced", "block_attention", "forced_combine",
         "stages", "decode_stages")
DPS_KINDS = ("msa", "sparse", "sparse_backward", "select", "paged_msa", "paged_select", "paged_sparse", "combine", "forced_combine")


@dataclass(frozen=True)
class Spec:
    """Static configuration: what a compiled model is specialised on."""

    dtype: str = "bfloat16"  # of q, k, v, q_idx, k_idx
    num_heads: int = 64  # Hq
    num_kv_heads: int = 4  # Hkv
    head_dim: int = 128  # D
    idx_dim: int = 128  # Di
    topk: int = 16
    block_size: int = 128
    init_blocks: int = 1
    local_blocks: int = 2
    q_budget: int = 64
    use_mma: bool = True
    decode: bool = False  # decode kernels (few queries per sequence)
    forced_pass: bool = True  # the layer's forced blocks query-major, fused with the merge (graph.msa_attention)
    kv_cache_dtype: str = ""  # paged K / V caches: "" (dtype) or "float8_e4m3fn"
    idx_cache_dtype: str = ""  # paged index-key cache: "" (dtype) or "float8_e4m3fn"
    idx_dtype: str = ""  # contiguous q_idx / k_idx: "" (dtype) or "float8_e4m3fn" (the FP8 indexer, uint8 bytes)
    decode_queries: int = 0  # paged decode: most new tokens a sequence has (a plan's n_new; 0: up to DECODE_MAX_Q)


def _dt(name: str):
    from max.dtype import DType

    return {"float32": DType.float32, "float16": DType.float16, "bfloat16": DType.bfloat16, "int32": DType.int32,
            "int64": DType.int64}[name]


def _cache_dt(name: str):
    from max.dtype import DType

    return DType.uint8 if name == "float8_e4m3fn" else _dt(name)


# --------------------------------------------------------------------------- graphs
def _types(spec: Spec, dev):
    from max.dtype import DType
    from max.graph import Dim, TensorType

    T, S, B1 = Dim("T"), Dim("S"), Dim("B1")
    x = _dt(spec.dtype)
    xi = _cache_dt(spec.idx_dtype) if spec.idx_dtype else x  # index inputs: e4m3 as uint8 bytes (the FP8 indexer)
    i32 = DType.int32
    Hq, Hkv, D, Di, K = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.idx_dim, spec.topk
    t = {
        "q": TensorType(x, [T, Hq, D], device=dev),
        "k": TensorType(x, [S, Hkv, D], device=dev),
        "v": TensorType(x, [S, Hkv, D], device=dev),
        "q_idx": TensorType(xi, [T, Hkv, Di], device=dev),
        "k_idx": TensorType(xi, [S, Di], device=dev),
        "cu_q": TensorType(i32, [B1], device=dev),
        "cu_k": TensorType(i32, [B1], device=dev),
        "scale": TensorType(DType.float32, [1], device=dev),
        "idx_scale": TensorType(DType.float32, [1], device=dev),
        "block_ids": TensorType(i32, [Hkv, T, K], device=dev),
        "o_partial": TensorType(G.partial_dtype_for(x), [T, Hq, K, D], device=dev),
        "lse_partial": TensorType(DType.float32, [T, Hq, K], device=dev),
        "out": TensorType(x, [T, Hq, D], device=dev),
        "lse": TensorType(DType.float32, [T, Hq], device=dev),
        "dout": TensorType(x, [T, Hq, D], device=dev),
        "dlse": TensorType(DType.float32, [T, Hq], device=dev),
        "dq": TensorType(x, [T, Hq, D], device=dev),
        "dk": TensorType(x, [S, Hkv, D], device=dev),
        "dv": TensorType(x, [S, Hkv, D], device=dev),
        "keys": TensorType(DType.int8, [S], device=dev),
        "row_offsets": TensorType(i32, ["B1"], device=dev),
        "entries": TensorType(i32, [Hkv, "NE"], device=dev),  # NE = T * topk
        "work": TensorType(i32, ["W", 4], device=dev),
        "num_work": TensorType(i32, [1], device=dev),
        # flat storage of [num_pages, block_size, Hkv, D] and [num_pages, block_size, Di]
        # (e4m3 caches as their bytes: MAX's CPU device has no float8 tensors)
        "k_cache": TensorType(_cache_dt(spec.kv_cache_dtype or spec.dtype), ["NK"], device=dev),
        "v_cache": TensorType(_cache_dt(spec.kv_cache_dtype or spec.dtype), ["NK"], device=dev),
        "k_idx_cache": TensorType(_cache_dt(spec.idx_cache_dtype or spec.dtype), ["NI"], device=dev),
        "v_scale": TensorType(DType.float32, [1], device=dev),  # of an e4m3 V cache
        "page_table": TensorType(i32, ["B", "MP"], device=dev),
        "seq_lens": TensorType(i32, ["B"], device=dev),
        "geometry": TensorType(DType.int64, [6], device=dev),
    }
    return t


INPUTS = {
    "msa": ("q", "k", "v", "q_idx", "k_idx", "cu_q", "cu_k", "scale", "idx_scale"),
    "stages": ("q", "k", "v", "q_idx", "k_idx", "cu_q", "cu_k", "scale", "idx_scale"),
    "decode_stages": ("q", "k", "v", "q_idx", "k_idx", "cu_q", "cu_k", "scale", "idx_scale"),
    "sparse": ("q", "k", "v", "block_ids", "cu_q", "cu_k", "scale"),
    "sparse_backward": ("q", "k", "v", "block_ids", "out", "lse", "dout", "dlse", "cu_q", "cu_k", "scale"),
    "paged_msa": ("q", "k_cache", "v_cache", "q_idx", "k_idx_cache", "page_table", "seq_lens", "cu_q", "geometry",
                  "scale", "idx_scale"),
    "paged_select": ("q_idx", "k_idx_cache", "page_table", "seq_lens", "cu_q", "geometry", "idx_scale"),
    "paged_sparse": ("q", "k_cache", "v_cache", "block_ids", "page_table", "seq_lens", "cu_q", "geometry", "scale"),
    "select": ("q_idx", "k_idx", "cu_q", "cu_k", "idx_scale"),
    "combine": ("o_partial", "lse_partial"),
    "invert": ("block_ids", "cu_q", "cu_k", "keys"),
    "invert_skip_forced": ("block_ids", "cu_q", "cu_k", "keys"),
    "forced_combine": ("q", "k", "v", "o_partial", "lse_partial", "cu_q", "cu_k", "scale"),
    "block_attention": ("q", "k", "v", "row_offsets", "entries", "work", "num_work", "cu_q", "cu_k", "scale"),
}
OUTPUTS = {
    "msa": ("out", "lse", "block_ids"),
    "sparse": ("out", "lse"),
    "sparse_backward": ("dq", "dk", "dv"),
    "paged_msa": ("out", "lse", "block_ids"),
    "paged_select": ("block_ids",),
    "paged_sparse": ("out", "lse"),
    "select": ("block_ids",),
    "combine": ("out", "lse"),
    "forced_combine": ("out", "lse"),
}


def input_names(kind: str, spec: Spec) -> tuple:
    """The graph inputs of a kind, in order: INPUTS[kind], and v_scale for
    the paged layers over an e4m3 V cache (k_scale and k_idx_scale come
    folded into scale and idx_scale)."""
    fp8_v = spec.kv_cache_dtype == "float8_e4m3fn" and kind in ("paged_msa", "paged_sparse")
    return INPUTS[kind] + (("v_scale",) if fp8_v else ())


def uses_forced_pass(spec: Spec, device: str) -> bool:
    """Whether the msa and stages kinds run the forced pass for this spec."""
    from max.graph import DeviceRef

    dev = DeviceRef.CPU() if device == "cpu" else DeviceRef.GPU(gpu_index(device))
    return spec.forced_pass and not spec.decode and G.forced_pass_fits(
        _dt(spec.dtype), dev, head_dim=spec.head_dim, block_size=spec.block_size, topk=spec.topk,
        init_blocks=spec.init_blocks, local_blocks=spec.local_blocks)


def _input_types(kind: str, spec: Spec, dev) -> list:
    """A kind's graph inputs: its DPS output buffers (OUTPUTS), then its
    tensors (input_names)."""
    types = _types(spec, dev)
    if kind == "combine":  # combine on its own emits the partials' dtype
        types["out"] = type(types["out"])(types["o_partial"].dtype, types["out"].shape, device=dev)
    return [types[n].as_buffer() for n in OUTPUTS.get(kind, ())] + [types[n] for n in input_names(kind, spec)]


def build_graph(kind: str, spec: Spec, device: str):
    """The graph of one kind at one spec: what model() compiles and runs."""
    return build_bundle([(kind, spec)], device, name=f"msa_{kind}_{abs(hash(spec)) % 10**8}_{device}")


def build_bundle(builds: list, device: str, name: str | None = None):
    """One graph holding the ops of several (kind, spec) builds side by side,
    each with its own inputs and outputs, in order. MAX's fixed cost per
    graph (~15 s on a 2-core machine) dominates a compile-only check, so the
    sm_90 check compiles its builds as one bundle."""
    from max.graph import DeviceRef, Graph

    dev = DeviceRef.CPU() if device == "cpu" else DeviceRef.GPU(gpu_index(device))
    per_build = [_input_types(kind, spec, dev) for kind, spec in builds]
    name = name or f"msa_bundle_{abs(hash(tuple(builds))) % 10**8}_{device}"
    with Graph(name, input_types=[t for ts in per_build for t in ts], custom_extensions=[kernels_path()]) as g:
        outs, at = [], 0
        for (kind, spec), ts in zip(builds, per_build):
            outs += _emit(kind, spec, device, list(g.inputs[at:at + len(ts)]))
            at += len(ts)
        g.output(*outs)
    return g


def _emit(kind: str, spec: Spec, device: str, inputs: list) -> list:
    """Adds one kind's ops to the graph being built over its inputs
    (_input_types' order). DPS kinds write their output buffers and return
    []; the others return their output tensors."""
    ins = input_names(kind, spec)
    dps = OUTPUTS.get(kind, ())
    kw = dict(topk=spec.topk, block_size=spec.block_size)
    sel_kw = dict(kw, init_blocks=spec.init_blocks, local_blocks=spec.local_blocks, decode=spec.decode)
    bufs = [inputs[i].buffer for i in range(len(dps))]
    a = {n: inputs[len(dps) + i].tensor for i, n in enumerate(ins)}
    if kind == "msa":  # G.msa_attention, with its selection as a third output
        bid = G.select_blocks(a["q_idx"], a["k_idx"], a["cu_q"], a["cu_k"], idx_scale=a["idx_scale"], **sel_kw)
        res = [*G.layer_attention(a["q"], a["k"], a["v"], bid, a["cu_q"], a["cu_k"], scale=a["scale"],
                                  q_budget=spec.q_budget, use_mma=spec.use_mma, forced_pass=spec.forced_pass,
                                  block_size=spec.block_size, init_blocks=spec.init_blocks,
                                  local_blocks=spec.local_blocks, decode=spec.decode), bid]
    elif kind in ("paged_msa", "paged_select", "paged_sparse"):
        cache = G.PagedCache(a.get("k_cache"), a.get("v_cache"), a.get("k_idx_cache"), a["geometry"],
                             v_scale=a.get("v_scale"))
        paged = dict(block_size=spec.block_size, decode=spec.decode)
        if kind == "paged_select":
            res = [G.paged_select_blocks(a["q_idx"], cache, a["page_table"], a["seq_lens"], a["cu_q"],
                                         topk=spec.topk, init_blocks=spec.init_blocks,
                                         local_blocks=spec.local_blocks, idx_scale=a["idx_scale"],
                                         decode_queries=spec.decode_queries or None, **paged)]
        elif kind == "paged_sparse":
            res = G.paged_sparse_attention(a["q"], cache, a["block_ids"], a["page_table"], a["seq_lens"],
                                           a["cu_q"], scale=a["scale"], q_budget=spec.q_budget, **paged)
        else:
            bid = G.paged_select_blocks(a["q_idx"], cache, a["page_table"], a["seq_lens"], a["cu_q"],
                                        topk=spec.topk, init_blocks=spec.init_blocks,
                                        local_blocks=spec.local_blocks, idx_scale=a["idx_scale"],
                                        decode_queries=spec.decode_queries or None, **paged)
            res = [*G.paged_sparse_attention(a["q"], cache, bid, a["page_table"], a["seq_lens"], a["cu_q"],
                                             init_blocks=spec.init_blocks if spec.forced_pass else 0,
                                             local_blocks=spec.local_blocks if spec.forced_pass else 0,
                                             scale=a["scale"], q_budget=spec.q_budget, **paged), bid]
    elif kind == "sparse_backward":
        res = G.sparse_attention_backward(
            a["q"], a["k"], a["v"], a["block_ids"], a["out"], a["lse"], a["dout"], a["cu_q"], a["cu_k"],
            dlse=a["dlse"], block_size=spec.block_size, scale=a["scale"], q_budget=spec.q_budget)
    elif kind == "sparse":
        res = G.sparse_attention(
            a["q"], a["k"], a["v"], a["block_ids"], a["cu_q"], a["cu_k"], block_size=spec.block_size,
            scale=a["scale"], q_budget=spec.q_budget, use_mma=spec.use_mma, decode=spec.decode,
        )
    elif kind == "select":
        res = [G.select_blocks(a["q_idx"], a["k_idx"], a["cu_q"], a["cu_k"], idx_scale=a["idx_scale"], **sel_kw)]
    elif kind == "combine":
        res = G.combine(a["o_partial"], a["lse_partial"])
    elif kind in ("invert", "invert_skip_forced"):
        skip = dict(init_blocks=spec.init_blocks, local_blocks=spec.local_blocks) if kind != "invert" else {}
        res = list(G.invert(a["block_ids"], a["cu_q"], a["cu_k"], num_keys=a["keys"].shape[0],
                            block_size=spec.block_size, q_budget=spec.q_budget, **skip))
    elif kind == "forced_combine":
        res = G.forced_combine(a["q"], a["k"], a["v"], a["o_partial"], a["lse_partial"], a["cu_q"], a["cu_k"],
                               block_size=spec.block_size, init_blocks=spec.init_blocks,
                               local_blocks=spec.local_blocks, scale=a["scale"])
    elif kind == "block_attention":
        inv = G.Inversion(a["row_offsets"], None, a["entries"], a["work"], a["num_work"])
        res = G.block_attention(a["q"], a["k"], a["v"], inv, a["cu_q"], a["cu_k"], scale=a["scale"],
                                use_mma=spec.use_mma, **kw)
    elif kind == "stages":
        bid = G.select_blocks(a["q_idx"], a["k_idx"], a["cu_q"], a["cu_k"], idx_scale=a["idx_scale"],
                              **dict(sel_kw, decode=False))
        if uses_forced_pass(spec, device):
            inv, o_p, lse_p, out, lse = G.forced_layer(
                a["q"], a["k"], a["v"], bid, a["cu_q"], a["cu_k"], block_size=spec.block_size,
                init_blocks=spec.init_blocks, local_blocks=spec.local_blocks, scale=a["scale"],
                q_budget=spec.q_budget, use_mma=spec.use_mma)
        else:
            inv = G.invert(bid, a["cu_q"], a["cu_k"], num_keys=a["k"].shape[0], block_size=spec.block_size,
                           q_budget=spec.q_budget)
            o_p, lse_p = G.block_attention(a["q"], a["k"], a["v"], inv, a["cu_q"], a["cu_k"],
                                           scale=a["scale"], use_mma=spec.use_mma, **kw)
            out, lse = G.combine(o_p, lse_p, out_dtype=a["q"].dtype)
        res = [bid, *inv, o_p, lse_p, out, lse]
    elif kind == "decode_stages":
        bid = G.select_blocks(a["q_idx"], a["k_idx"], a["cu_q"], a["cu_k"], idx_scale=a["idx_scale"],
                              **dict(sel_kw, decode=True))
        out, lse = G.decode_attention(a["q"], a["k"], a["v"], bid, a["cu_q"], a["cu_k"], scale=a["scale"],
                                      block_size=spec.block_size)
        res = [bid, out, lse]
    else:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {KINDS}")
    if dps:
        for buf, r in zip(bufs, res):
            buf[...] = r
        return []
    return list(res)


def gpu_index(device: str) -> int:
    """"gpu" or "gpu:N" -> N (0 by default)."""
    return int(device.split(":")[1]) if ":" in device else 0


def _accelerator(device: str):
    from max.driver import Accelerator

    return Accelerator(gpu_index(device))


# --------------------------------------------------------------------------- sessions and cache
_lock = threading.Lock()
_sessions: dict[str, object] = {}
_models: dict[tuple, object] = {}
compile_log: list[tuple[str, Spec, str, float]] = []  # (kind, spec, device, seconds)


def session(device: str):
    from max.driver import CPU
    from max.engine import InferenceSession

    with _lock:
        if device not in _sessions:
            devs = [CPU()] if device == "cpu" else [CPU(), _accelerator(device)]
            _sessions[device] = InferenceSession(devices=devs)
        return _sessions[device]


def model(kind: str, spec: Spec, device: str = "cpu"):
    """The compiled model for (kind, spec, device); compiles on first use."""
    key = (kind, spec, device)
    m = _models.get(key)
    if m is not None:
        return m
    sess = session(device)
    with _lock:
        m = _models.get(key)
        if m is None:
            t0 = time.time()
            m = sess.load(build_graph(kind, spec, device))
            compile_log.append((kind, spec, device, time.time() - t0))
            _models[key] = m
    return m


def cached_models() -> list[tuple]:
    return list(_models)


# --------------------------------------------------------------------------- NumPy runner
def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Rounds float32 to bfloat16 (nearest even); returns uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values that `dtype` can hold (what the kernels will see)."""
    x = np.asarray(x, np.float32)
    if dtype == "bfloat16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    return x


def to_buffer(x: np.ndarray, dtype: str, device: str):
    from max.driver import Buffer
    from max.dtype import DType

    if dtype == "bfloat16":
        buf = Buffer.from_numpy(f32_to_bf16_bits(x)).view(DType.bfloat16)
    else:
        np_dt = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int8": np.int8,
                 "int64": np.int64}[dtype]
        buf = Buffer.from_numpy(np.ascontiguousarray(x, dtype=np_dt))
    return buf if device == "cpu" else buf.to(_accelerator(device))


def to_numpy(buf) -> np.ndarray:
    from max.driver import CPU
    from max.dtype import DType

    if buf.dtype == DType.bfloat16:
        return bf16_bits_to_f32(buf.to(CPU()).view(DType.uint16).to_numpy())
    return buf.to(CPU()).to_numpy()


def empty_buffer(dtype, shape, device: str):
    from max.driver import CPU, Buffer

    return Buffer(dtype, tuple(int(s) for s in shape), device=CPU() if device == "cpu" else _accelerator(device))


def run(kind: str, spec: Spec, device: str, inputs: dict, outputs=None):
    """Runs a kind on device Buffers (dict by input name). DPS kinds write into
    `outputs` (allocated here when None). Returns the list of output Buffers."""
    from max.dtype import DType

    m = model(kind, spec, device)
    args = [inputs[n] for n in input_names(kind, spec)]
    if kind in OUTPUTS:
        if outputs is None:
            T = args[0].shape[0]  # every DPS kind's first input is token-major
            x = _dt(spec.dtype)
            S = args[1].shape[0] if kind == "sparse_backward" else 0
            kv = ((S, spec.num_kv_heads, spec.head_dim), x)
            shapes = {"out": ((T, spec.num_heads, spec.head_dim), G.partial_dtype_for(x) if kind == "combine" else x),
                      "lse": ((T, spec.num_heads), DType.float32),
                      "block_ids": ((spec.num_kv_heads, T, spec.topk), DType.int32),
                      "dq": ((T, spec.num_heads, spec.head_dim), x), "dk": kv, "dv": kv}
            outputs = [empty_buffer(shapes[n][1], shapes[n][0], device) for n in OUTPUTS[kind]]
        m.execute(*outputs, *args)
        return list(outputs)
    return list(m.execute(*args))


def numpy_inputs(spec: Spec, device: str, **arrays) -> dict:
    """NumPy arrays -> device Buffers for the named graph inputs."""
    kinds = {"q": spec.dtype, "k": spec.dtype, "v": spec.dtype, "q_idx": spec.dtype, "k_idx": spec.dtype,
             "out": spec.dtype, "dout": spec.dtype, "scale": "float32", "idx_scale": "float32",
             "k_cache": spec.dtype, "v_cache": spec.dtype, "k_idx_cache": spec.dtype, "geometry": "int64",
             "lse_partial": "float32", "lse": "float32", "dlse": "float32", "keys": "int8"}
    out = {}
    for name, arr in arrays.items():
        if name == "o_partial":
            dt = "float32" if spec.dtype == "float32" else spec.dtype
        else:
            dt = kinds.get(name, "int32")
        out[name] = to_buffer(np.asarray(arr), dt, device)
    return out
