"""Random MSA inputs shared by the tests (never zeros)."""
from dataclasses import dataclass

import numpy as np

from msa_py.check import make_inputs


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


def make_case(seed, seqs, Hq=4, Hkv=2, D=64, Di=32):
    """seqs: [(Tq_b, Tk_b), ...] with Tq_b <= Tk_b (queries are the last Tq_b keys); float32."""
    a, _, _, _ = make_inputs(seed, seqs, Hq, Hkv, D, Di, "float32")
    return Case(a["q"], a["k"], a["v"], a["q_idx"], a["k_idx"], a["cu_q"], a["cu_k"])


def rel_err(got, ref):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
