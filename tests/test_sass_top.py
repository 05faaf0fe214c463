"""benchmarks/sass_top.py on a small synthetic ncu source page: the most
sampled instruction, samples by execution count, and the hot loop's opcode
mix per trip (the numbers NOTES quotes from it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HEAD = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_barrier", "Instructions Executed"]
ROWS = [
    # once a block (4 executions): 10 samples
    ["0x0", "LDG.E R2, desc[UR4][R2.64]", "6", "0", "4"],
    ["0x10", "ISETP.GE.AND P0, PT, R5, R2, PT", "4", "0", "4"],
    # the loop (40 executions a trip of 10 per block), one predicated-off half
    ["0x20", "FMUL R1, R2, R3", "30", "0", "40"],
    ["0x30", "FMUL R4, R2, R3", "20", "0", "40"],
    ["0x40", "@P0 MUFU.EX2 R5, R5", "25", "5", "20"],
    ["0x50", "BAR.SYNC.DEFER_BLOCKING 0x0", "15", "15", "40"],
]


def _load():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sass_top.py"
    spec = importlib.util.spec_from_file_location("sass_top", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sass_top_sections(tmp_path, capsys):
    csv_path = tmp_path / "k.sass.csv"
    lines = ['"Kernel Name","k",'] + [",".join(f'"{c}"' for c in r) for r in [HEAD, *ROWS]]
    csv_path.write_text("\n".join(lines) + "\n")
    _load().main(str(csv_path))
    out = capsys.readouterr().out
    assert "6 instructions, 100 samples" in out
    top = out.split("# most sampled instructions")[1].splitlines()[1]
    assert "30.00%" in top and "FMUL R1" in top
    by_exec = out.split("# samples by execution count")[1]
    rows = [r.split() for r in by_exec.splitlines()[2:5] if r.strip()]
    assert rows[0] == ["40", "3", "65.00%"]  # the loop body at full count
    assert rows[1] == ["20", "1", "25.00%"]
    assert rows[2] == ["4", "2", "10.00%"]
    mix = out.split("# per trip of the code run 40 times: ")[1]
    assert mix.startswith("4 instructions a warp, 90.0% of samples")  # FMUL 2 + BAR 1 + MUFU 0.5: 3.5, rounded
    per_op = dict((l.split()[1], float(l.split()[0])) for l in mix.splitlines()[1:] if l.strip())
    assert per_op == {"FMUL": 2.0, "BAR": 1.0, "MUFU": 0.5}
