"""Random MSA inputs shared by the tests (never zeros)."""
from dataclasses import dataclass

import numpy as np


@dataclass
class Case:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    q_idx: np.ndarray
    k_idx: np.ndarray
    cu_q: np.ndarray
    cu_k: np.ndarray

    @property
    def T(self):
        return self.q.shape[0]


def make_case(seed, seqs, Hq=4, Hkv=2, D=64, Di=32, dtype=np.float32):
    """seqs: [(Tq_b, Tk_b), ...] with Tq_b <= Tk_b (queries are the last Tq_b keys)."""
    rng = np.random.default_rng(seed)
    tq = np.array([s[0] for s in seqs])
    tk = np.array([s[1] for s in seqs])
    cu_q = np.concatenate([[0], np.cumsum(tq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(tk)]).astype(np.int32)
    T, S = int(cu_q[-1]), int(cu_k[-1])

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return Case(r(T, Hq, D), r(S, Hkv, D), r(S, Hkv, D), r(T, Hkv, Di), r(S, Di), cu_q, cu_k)


def rel_err(got, ref):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
