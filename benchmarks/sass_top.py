"""Summarizes ncu's source page (--page source --csv --print-source sass):
the most sampled instructions and samples per opcode, with the stall-reason
columns ncu gives. Usage: python3 benchmarks/sass_top.py STEM.sass.csv"""

from __future__ import annotations

import csv
import sys
from collections import Counter


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main(path: str, top: int = 40) -> None:
    rows = list(csv.reader(open(path, newline="")))
    head_i = next(i for i, r in enumerate(rows) if any("Source" in c for c in r))
    head, body = rows[head_i], [r for r in rows[head_i + 1 :] if len(r) == len(rows[head_i])]
    src = next(i for i, c in enumerate(head) if c.strip() == "Source" or c.startswith("Source"))
    sampled = [i for i, c in enumerate(head) if "Sampling" in c and "All" in c] or \
              [i for i, c in enumerate(head) if "Sampling" in c]
    if not sampled:
        print("no sampling column; header:", head)
        return
    s = sampled[0]
    total = sum(_num(r[s]) for r in body) or 1.0
    print(f"{len(body)} instructions, {total:.0f} samples ({head[s]})")
    reasons = [i for i, c in enumerate(head) if c.startswith("stall_") or "Stall" in c and i != s][:12]
    print("\n# most sampled instructions: % of samples, then the instruction")
    for r in sorted(body, key=lambda r: -_num(r[s]))[:top]:
        extra = " ".join(f"{head[i]}={r[i]}" for i in reasons if _num(r[i]) > 0)[:200]
        print(f"{100 * _num(r[s]) / total:6.2f}%  {r[src].strip()[:90]:90s} {extra}")
    by_op = Counter()
    for r in body:
        op = r[src].strip().split()
        op = [t for t in op if not t.startswith("@")]
        by_op[op[0].split(".")[0] if op else "?"] += _num(r[s])
    print("\n# samples by opcode")
    for op, n in by_op.most_common(25):
        print(f"{100 * n / total:6.2f}%  {op}")


if __name__ == "__main__":
    main(sys.argv[1])
