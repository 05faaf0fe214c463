"""Summarizes ncu's source page (--page source --csv --print-source sass):
the most sampled instructions and samples per opcode, with the stall-reason
columns ncu gives; then samples by execution count (code run once a thread
block against code run once a tile shows as two counts) and the opcode mix
of the most sampled count's code per execution (the instructions a warp
issues per trip round the hot loop).
Usage: python3 benchmarks/sass_top.py STEM.sass.csv"""

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
        by_op[_opcode(r[src])] += _num(r[s])
    print("\n# samples by opcode")
    for op, n in by_op.most_common(25):
        print(f"{100 * n / total:6.2f}%  {op}")
    ex = next((i for i, c in enumerate(head) if c.strip() == "Instructions Executed"), None)
    if ex is not None:
        _by_exec(body, src, s, ex, total)


def _opcode(text: str) -> str:
    op = [t for t in text.strip().split() if not t.startswith("@")]
    return op[0].split(".")[0] if op else "?"


def _by_exec(body, src: int, s: int, ex: int, total: float) -> None:
    """Samples grouped by how often each instruction ran (warp-level
    executions), then the hot loop's opcode mix per trip: the instructions
    that ran between half and all of the most sampled count's executions
    (a loop body with its predicated branches), divided by that count."""
    groups: dict[float, list] = {}
    for r in body:
        groups.setdefault(_num(r[ex]), []).append(r)
    print("\n# samples by execution count (one count: one stretch of code run as often)")
    print(f"{'executions':>12} {'instrs':>7} {'samples':>8}")
    ranked = sorted(groups.items(), key=lambda kv: -sum(_num(r[s]) for r in kv[1]))
    for n, rs in ranked[:12]:
        print(f"{n:12.0f} {len(rs):7d} {100 * sum(_num(r[s]) for r in rs) / total:7.2f}%")
    hot = ranked[0][0] if ranked else 0
    if hot <= 0:
        return
    loop = [r for r in body if hot / 2 <= _num(r[ex]) <= hot]
    mix = Counter()
    for r in loop:
        mix[_opcode(r[src])] += _num(r[ex]) / hot
    print(f"\n# per trip of the code run {hot:.0f} times: {sum(mix.values()):.0f} instructions a warp, "
          f"{100 * sum(_num(r[s]) for r in loop) / total:.1f}% of samples")
    for op, n in mix.most_common(20):
        print(f"{n:8.1f}  {op}")


if __name__ == "__main__":
    main(sys.argv[1])
