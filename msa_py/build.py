"""Precompiles the Mojo kernels: `python -m msa_py.build` (`pixi run build`).

Writes build/msa_kernels.mojoc with `mojo precompile`; fails with the
compiler's message when the kernels do not compile. `kernels_path()` gives
the .mojoc when it is newer than every source, else the source folder (which
MAX precompiles on load).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "mojo_kernels"
MOJOC = ROOT / "build" / "msa_kernels.mojoc"


def _sources() -> list[Path]:
    return sorted(KERNELS.glob("*.mojo"))


def is_fresh() -> bool:
    if not MOJOC.exists():
        return False
    built = MOJOC.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in _sources())


def kernels_path() -> Path:
    """The kernel package for `custom_extensions=` / `KernelLibrary`."""
    if not KERNELS.is_dir():
        raise FileNotFoundError(f"Mojo kernel sources not found at {KERNELS}")
    return MOJOC if is_fresh() else KERNELS


def _mojo() -> str:
    exe = Path(sys.executable).parent / "mojo"
    if exe.exists():
        return str(exe)
    found = shutil.which("mojo")
    if not found:
        raise RuntimeError("the `mojo` compiler was not found (pip install mojo==1.2.0)")
    return found


def build(verbose: bool = True) -> Path:
    MOJOC.parent.mkdir(parents=True, exist_ok=True)
    # the package's module name comes from the file name: build under the final name
    tmp = MOJOC.parent / ".tmp" / MOJOC.name
    tmp.parent.mkdir(exist_ok=True)
    cmd = [_mojo(), "precompile", str(KERNELS), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = "\n".join(l for l in (proc.stdout + proc.stderr).splitlines() if "Crashpad" not in l)
        raise RuntimeError(f"mojo precompile failed:\n{msg}")
    os.replace(tmp, MOJOC)
    if verbose:
        print(f"built {MOJOC.relative_to(ROOT)} from {len(_sources())} Mojo sources")
    return MOJOC


def main() -> int:
    try:
        build()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
