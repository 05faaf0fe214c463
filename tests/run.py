"""The test suite as CI runs it (`./dev test`, `pixi run test`).

With no arguments: the test files in two pytest processes side by side,
each with its half's output printed when it ends. The suite is bound by
MAX graph compiles (15-20 s each, about one core busy), so on a 2-core
machine two processes take about half the time of one. The halves are
balanced by their compile time from a cold MAX cache; a new test file goes
to the second half unless listed in FIRST.

With arguments: one pytest process over tests/ with them, e.g.
`python tests/run.py -k paged` or `python tests/run.py --device cuda`.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# about half of the suite's compile time (cold cache, 2-core machine)
FIRST = ("test_gpu_compile.py", "test_cli.py", "test_backward.py", "test_distributed.py", "test_readme.py")


def halves() -> tuple[list[str], list[str]]:
    files = sorted(p.name for p in HERE.glob("test_*.py"))
    return [f for f in files if f in FIRST], [f for f in files if f not in FIRST]


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "-q"]
    if argv:
        return subprocess.call(pytest + [str(HERE)] + argv)
    procs = []
    for part in halves():
        log = tempfile.TemporaryFile(mode="w+")
        procs.append((part, log, subprocess.Popen(pytest + [str(HERE / f) for f in part], stdout=log,
                                                   stderr=subprocess.STDOUT, text=True)))
    rc = 0
    for part, log, proc in procs:
        code = proc.wait()
        log.seek(0)
        print(f"==== pytest {' '.join(part)}: exit {code}")
        print(log.read(), flush=True)
        rc = rc or code
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
