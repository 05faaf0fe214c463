"""Runs every MSA op on a device and checks it against msa_py.reference.

    python -m msa_py.check --device gpu          # the H100 check (small + 32K shapes)
    python -m msa_py.check --device cpu --quick  # CPU paths, small shapes
    python -m msa_py.check --device virtual      # compile the GPU path for sm_90 only

For each case it runs the "stages" graph (every stage's output; the
"decode_stages" graph for decode cases) and compares:
selection (exact, or a near tie within tolerance), the inversion (exact,
against the reference inversion of the kernel's block_ids), the partials,
the combine, and the end-to-end output; then times the whole "msa" graph.
Large cases check a random sample of queries. Exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np


def _err(e: float) -> str:
    """A relative error for the log; '-' where the case has no such output (decode, lean, sampled rows)."""
    return "-" if math.isnan(e) else f"{e:.1e}"


def _set_virtual():
    from max import driver

    driver.set_virtual_device_api("cuda")
    driver.set_virtual_device_target_arch("sm_90")
    driver.set_virtual_device_count(1)


# (name, seqs [(Tq, Tk)], Hq, Hkv, D, Di, topk, block_size, dtype, use_mma, sample[, decode])
SMALL = [
    ("ragged_g4_f32", [(300, 300), (1, 1), (77, 200), (0, 5), (129, 129)], 8, 2, 64, 32, 4, 64, "float32", True, None),
    ("ragged_g4_bf16_mma", [(300, 300), (1, 1), (77, 200), (129, 129)], 8, 2, 64, 32, 4, 64, "bfloat16", True, None),
    ("ragged_g4_bf16_simt", [(300, 300), (1, 1), (77, 200), (129, 129)], 8, 2, 64, 32, 4, 64, "bfloat16", False, None),
    ("g16_d128_bf16", [(700, 700), (200, 900)], 16, 1, 128, 128, 4, 128, "bfloat16", True, None),
    ("g1_d128_f16", [(513, 513)], 4, 4, 128, 128, 4, 128, "float16", True, None),
    ("chunked_g16_f32", [(64, 1000), (3, 131)], 32, 2, 128, 64, 5, 128, "float32", True, None),
    # Di 256: the largest index head dim; on Hopper its wgmma ring does not fit in shared memory (mma.sync instead)
    ("di256_bf16", [(300, 300), (40, 200)], 16, 2, 128, 256, 8, 128, "bfloat16", True, None),
    # the plain pipeline (a name ending in _plain: no forced pass): the block
    # attention also takes each query's own, partly visible block, and the
    # last, short block of a sequence; the combine merges
    ("ragged_g4_bf16_plain", [(300, 300), (1, 1), (77, 200), (129, 129)], 8, 2, 64, 32, 4, 64, "bfloat16", True,
     None),
    ("g16_d128_bf16_plain", [(700, 700), (200, 900)], 16, 1, 128, 128, 4, 128, "bfloat16", True, None),
    # NaN in q, k and v (a name with _nan: _inject_nan): the outputs that read one are NaN, exactly as the reference
    ("g16_d128_bf16_nan", [(700, 700), (200, 900)], 16, 1, 128, 128, 4, 128, "bfloat16", True, None),
]
LARGE = [
    ("32k_model_shape_bf16", [(32768, 32768)], 64, 4, 128, 128, 16, 128, "bfloat16", True, 48),
    ("128k_model_shape_bf16", [(131072, 131072)], 64, 4, 128, 128, 16, 128, "bfloat16", True, 48),
]
LEAN_T = 65536  # from here on only final outputs are fetched (o_partial alone is 34 GB at 128K)
# decode kernels: a few new queries per sequence over caches from 1 token to
# 128K; sequences past the indexer's max_q queries (the slow path) included
DECODE = [
    ("decode_ragged_bf16", [(1, 9), (1, 16), (1, 40), (1, 130), (1, 3000), (1, 20000), (1, 1)],
     64, 4, 128, 128, 16, 128, "bfloat16", True, None, True),
    ("decode_spec8_bf16", [(8, 5000), (8, 8), (3, 700), (8, 2100), (5, 129)],
     64, 4, 128, 128, 16, 128, "bfloat16", True, None, True),
    ("decode_spec8_bf16_nan", [(8, 5000), (8, 8), (3, 700), (8, 2100), (5, 129)],
     64, 4, 128, 128, 16, 128, "bfloat16", True, None, True),
    ("decode_overflow_f16", [(20, 3000), (1, 100), (1, 1), (2, 300)], 16, 2, 64, 64, 4, 64, "float16", True, None,
     True),
    ("decode_128k_b8_bf16", [(1, 131072)] * 8, 64, 4, 128, 128, 16, 128, "bfloat16", True, None, True),
]
QUICK = [SMALL[0], SMALL[1], SMALL[3], SMALL[6], SMALL[8], DECODE[1]]
# cases with a small q_budget: their work lists span several of the
# inversion's query windows (WINDOW_CHUNKS * q_budget queries); others use 64
Q_BUDGET = {"ragged_g4_f32": 3, "ragged_g4_bf16_mma": 4, "g16_d128_bf16": 8, "ragged_g4_bf16_plain": 4}


def make_inputs(seed, seqs, Hq, Hkv, D, Di, dtype):
    from .engine import round_to

    rng = np.random.default_rng(seed)
    tq = np.array([s[0] for s in seqs])
    tk = np.array([s[1] for s in seqs])
    cu_q = np.concatenate([[0], np.cumsum(tq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(tk)]).astype(np.int32)
    T, S = int(cu_q[-1]), int(cu_k[-1])

    def r(*shape):
        return round_to(rng.standard_normal(shape, dtype=np.float32), dtype)

    return dict(q=r(T, Hq, D), k=r(S, Hkv, D), v=r(S, Hkv, D), q_idx=r(T, Hkv, Di), k_idx=r(S, Di),
                cu_q=cu_q, cu_k=cu_k), T, S, len(seqs)


def _inject_nan(a):
    """NaN in one (query, head) row of q, in one key of k past the first
    queries that share its block (masked for them) and in one value at the
    first key of a block (seen by every query that selects that block): the
    positions where the GPU kernels' NaN must match the reference exactly.
    (A NaN value in the middle of a block also reaches, through 0 * NaN in
    the tensor-core product, rows of the same tile whose mask hides it.)"""
    a["q"][5, 3, 7] = np.nan
    a["k"][300, 0, 11] = np.nan
    a["v"][384, 0, 5] = np.nan


def check_case(case, device: str, seed: int = 0, time_it: bool = True, log=print, lean: bool = False) -> bool:
    """lean (or T >= LEAN_T): run the select and whole-layer graphs only and check
    their outputs (every buffer fetched is fully specified: initcheck-clean)."""
    from . import engine as E
    from . import reference as R
    from . import verify as Vf

    name, seqs, Hq, Hkv, D, Di, topk, bs, dtype, use_mma, sample = case[:11]
    spec = _spec(case)
    decode = spec.decode
    a, T, S, B = make_inputs(seed, seqs, Hq, Hkv, D, Di, dtype)
    if "_nan" in name:
        _inject_nan(a)
    scale, idx_scale = 1.0 / math.sqrt(D), 1.0 / math.sqrt(Di)
    ins = E.numpy_inputs(spec, device, **a, scale=np.array([scale], np.float32),
                         idx_scale=np.array([idx_scale], np.float32))
    lean = lean or T >= LEAN_T
    if lean:
        bid = E.to_numpy(E.run("select", spec, device, {n: ins[n] for n in E.INPUTS["select"]})[0])
        out, lse = (E.to_numpy(o) for o in E.run("msa", spec, device, {n: ins[n] for n in E.INPUTS["msa"]}))
    elif decode:
        bid, out, lse = (E.to_numpy(o) for o in E.run("decode_stages", spec, device, ins))
    else:
        outs = [E.to_numpy(o) for o in E.run("stages", spec, device, ins)]
        bid, roff, row_ptr, entries, work, num_work, o_p, lse_p, out, lse = outs
    tol = Vf.tolerance(dtype)
    ok = True
    rows = None if sample is None else np.sort(np.random.default_rng(seed + 1).choice(T, sample, replace=False))
    if rows is not None:  # always include the first and last query
        rows = np.unique(np.concatenate([[0, T - 1], rows]))
    # 1-3 selection
    sel = Vf.selection_report(bid, a["q_idx"], a["k_idx"], a["cu_q"], a["cu_k"], block_size=bs, init_blocks=1,
                              local_blocks=2, idx_scale=idx_scale, rows=rows)
    ok &= not sel["bad"]
    # 4 inversion of the kernel's own block_ids
    forced = not decode and E.uses_forced_pass(spec, device)  # the layer's forced pass: see engine.KINDS
    skip = dict(init_blocks=spec.init_blocks, local_blocks=spec.local_blocks) if forced else {}
    inv = R.invert(bid, a["cu_q"], a["cu_k"], block_size=bs, q_budget=spec.q_budget, **skip)
    R_ = inv.row_ptr.shape[1]
    nw = int(inv.num_work[0])
    inv_ok = decode or lean or (  # decode has no inversion (query-major); lean fetches none
        np.array_equal(roff, inv.row_offsets)
        and np.array_equal(row_ptr[:, :R_], inv.row_ptr)
        and (row_ptr[:, R_:] == inv.row_ptr[:, -1:]).all()
        and np.array_equal(entries, inv.entries)
        and nw == int(num_work[0])
        and np.array_equal(work[:nw], inv.work)
    )
    ok &= inv_ok
    # 5-6 attention over the kernel's selection
    if rows is None and (lean or decode):  # decode: merge fused, no partials
        e_part = e_lsep = e_comb = float("nan")
        ref_o, ref_l = R.sparse_attention(a["q"], a["k"], a["v"], bid, a["cu_q"], a["cu_k"], block_size=bs,
                                          scale=scale)
    elif rows is None:
        ref_op, ref_lp = R.block_attention(a["q"], a["k"], a["v"], inv, a["cu_q"], a["cu_k"], topk=topk,
                                           block_size=bs, scale=scale)
        # o_partial is unspecified in unused slots (lse -inf; any bits, NaN included): zeroed before any use
        o_used = np.where(np.isneginf(lse_p)[..., None], 0, o_p)
        e_part = Vf.rel_err(o_used, ref_op)
        e_lsep = Vf.rel_err(lse_p, ref_lp)
        if forced:  # the forced pass alone, on the kernel's partials
            ref_out, ref_lse = R.forced_combine(a["q"], a["k"], a["v"], o_used, lse_p, a["cu_q"],
                                                a["cu_k"], block_size=bs, scale=scale, **skip)
        else:  # combine alone, on the kernel's partials
            ref_out, ref_lse = R.combine(o_used, lse_p)
        e_comb = max(Vf.rel_err(out, ref_out), Vf.rel_err(lse, ref_lse))
        ref_o, ref_l = R.sparse_attention(a["q"], a["k"], a["v"], bid, a["cu_q"], a["cu_k"], block_size=bs,
                                          scale=scale)
    else:
        e_part = e_lsep = e_comb = float("nan")
        ref_o, ref_l = Vf.attention_rows_reference(a["q"], a["k"], a["v"], bid, a["cu_q"], a["cu_k"], rows,
                                                   block_size=bs, scale=scale)
        out, lse = out[rows], lse[rows]
    e_out = Vf.rel_err(out, ref_o)
    e_lse = Vf.rel_err(lse, ref_l)
    errs = [e for e in (e_part, e_lsep, e_comb, e_out, e_lse) if not math.isnan(e)]
    ok &= all(e <= tol for e in errs)
    timing = ""
    if time_it:
        from .timing import time_max

        m_ins = {n: ins[n] for n in E.INPUTS["msa"]}
        bufs = E.run("msa", spec, device, m_ins)
        tm = time_max(lambda: E.run("msa", spec, device, m_ins, outputs=bufs), device,
                      iters=10 if T > 10000 else 5)
        flops = 4.0 * Hq * D * sum(_selected_keys(seqs, topk, bs))
        stages = ""
        if T > 10000:  # where the time goes
            s_ins = {n: ins[n] for n in E.INPUTS["select"]}
            ts = time_max(lambda: E.run("select", spec, device, s_ins), device, iters=5)
            p_ins = dict(m_ins, block_ids=E.to_buffer(bid.astype(np.int32), "int32", device))
            p_ins = {n: p_ins[n] for n in E.INPUTS["sparse"]}
            tp = time_max(lambda: E.run("sparse", spec, device, p_ins), device, iters=5)
            stages = f" [select {ts['median']:.3f} ms, invert+attention+combine {tp['median']:.3f} ms]"
        timing = stages + f" | msa {tm['median']:.3f} ms (host {tm['host_median']:.3f}) {flops / tm['median'] / 1e9:.1f} TFLOP/s attn-eff"
    log(
        f"{'PASS' if ok else 'FAIL'} {name:24s} T={T} S={S} B={B} Hq={Hq} Hkv={Hkv} D={D} Di={Di} topk={topk} "
        f"bs={bs} {dtype}{' mma' if use_mma else ' simt'}{' decode' if decode else ''} | select exact {sel['exact']}/{sel['rows']} "
        f"ties {sel['near_ties']} bad {len(sel['bad'])} | invert {'-' if decode or lean else ('ok' if inv_ok else 'MISMATCH')} (work {nw}) | "
        f"rel err partial {_err(e_part)} lse_p {_err(e_lsep)} {'forced+combine' if forced else 'combine'} {_err(e_comb)} out {_err(e_out)} lse {_err(e_lse)} "
        f"(tol {tol:g}){timing}"
    )
    return bool(ok)


def _spec(case):
    """The compiled configuration of a case (decode cases carry a 12th field True)."""
    from . import engine as E

    name, _, Hq, Hkv, D, Di, topk, bs, dtype, use_mma, _, *rest = case
    return E.Spec(dtype=dtype, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, idx_dim=Di, topk=topk,
                  block_size=bs, use_mma=use_mma, decode=bool(rest and rest[0]), q_budget=Q_BUDGET.get(name, 64),
                  forced_pass=not name.endswith("_plain"))


def _selected_keys(seqs, topk, bs):
    """Keys attended per query (causal, within the selected blocks), summed per sequence (upper bound)."""
    for tq, tk in seqs:
        p = np.arange(tk - tq, tk)
        yield float(np.minimum((p // bs + 1) * bs, topk * bs).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu", "virtual"], default="gpu")
    ap.add_argument("--quick", action="store_true", help="a few small cases only")
    ap.add_argument("--no-large", action="store_true", help="skip the 32K case")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--only", help="comma list of case names to run")
    ap.add_argument("--lean", action="store_true",
                    help="fetch only fully specified outputs (select, whole layer): for compute-sanitizer initcheck")
    args = ap.parse_args(argv)
    if args.device == "virtual":
        _set_virtual()
    every = SMALL + DECODE + LARGE
    large = {"decode_128k_b8_bf16"} | {c[0] for c in LARGE}
    cases = QUICK if args.quick else [c for c in every if not (c[0] in large and (args.no_large or args.device == "cpu"))]
    if args.only:
        names = args.only.split(",")
        cases = [c for c in every if c[0] in names]
        if len(cases) != len(names):
            ap.error(f"--only: unknown case in {names}; known: {[c[0] for c in every]}")
    dev = "gpu" if args.device in ("gpu", "virtual") else "cpu"
    if args.device == "gpu":
        from max.driver import Accelerator

        acc = Accelerator(0)
        print(f"device: {acc.model_name} ({acc.architecture_name})")
    print(f"msa_py.check --device {args.device}: {len(cases)} cases, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    ok = True
    for i, c in enumerate(cases):
        try:
            if args.device == "virtual":
                ok &= _virtual(c)
            else:
                ok &= check_case(c, dev, seed=i, time_it=not args.no_time, lean=args.lean)
        except Exception as e:  # report and go on with the next case
            ok = False
            print(f"ERROR {c[0]}: {type(e).__name__}: {e}")
            if e.__cause__ is not None:  # MAX's compiler diagnostics live in the cause
                print(f"  caused by: {e.__cause__}")
    print("CHECK PASSED" if ok else "CHECK FAILED")
    return 0 if ok else 1


def _virtual(case) -> bool:
    from . import engine as E

    spec = _spec(case)
    kind = "decode_stages" if spec.decode else "stages"
    t0 = time.time()
    E.model(kind, spec, "gpu")
    print(f"{case[0]:24s} {kind} graph compiled for sm_90 in {time.time() - t0:.1f} s")
    return True


if __name__ == "__main__":
    code = main()
    if "virtual" in sys.argv:
        # MAX 26.7 aborts in interpreter teardown after loading compile-only
        # models from its cache ("terminate called without an active
        # exception"); the check itself is done, so leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
