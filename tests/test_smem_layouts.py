"""The shared-memory tile layouts of common.mojo (tile_offset), checked on the
host: each maps a tile onto itself one to one, and the SW128 one equals the
address swizzle Hopper's wgmma applies (bits 4-6 ^= bits 7-9 of a 1024-byte
aligned panel address), so cp.async writes and wgmma reads agree."""
import shutil
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
from mojo_kernels.common import LAYOUT_CORE, LAYOUT_PADDED, LAYOUT_SW128, tile_offset


def one_to_one[layout: Int, rows: Int, cols: Int]() -> Bool:
    var seen = List[Bool](length=rows * cols, fill=False)
    for r in range(rows):
        for c in range(cols):
            var off = tile_offset[layout, rows, cols](r, c)
            if off < 0 or off >= rows * cols or seen[off]:
                return False
            seen[off] = True
    return True


def hardware_swizzle[rows: Int, cols: Int]() -> Bool:
    for r in range(rows):
        for c in range(cols):
            var plain = ((c // 64) * rows * 64 + r * 64 + c % 64) * 2  # bytes, panels of 64 columns
            if plain ^ (((plain >> 7) & 7) << 4) != tile_offset[LAYOUT_SW128, rows, cols](r, c) * 2:
                return False
    return True


def main():
    print("sw128_64x128", one_to_one[LAYOUT_SW128, 64, 128]() and hardware_swizzle[64, 128]())
    print("sw128_128x64", one_to_one[LAYOUT_SW128, 128, 64]() and hardware_swizzle[128, 64]())
    print("sw128_256x256", one_to_one[LAYOUT_SW128, 256, 256]() and hardware_swizzle[256, 256]())
    print("sw128_16x128", one_to_one[LAYOUT_SW128, 16, 128]() and hardware_swizzle[16, 128]())
    print("core_64x128", one_to_one[LAYOUT_CORE, 64, 128]())
    print("core_128x32", one_to_one[LAYOUT_CORE, 128, 32]())
    print("padded_64x128", tile_offset[LAYOUT_PADDED, 64, 128](3, 5) == 3 * 136 + 5)
"""


def test_tile_layouts(tmp_path):
    mojo = shutil.which("mojo") or str(Path(sys.executable).parent / "mojo")
    repo = Path(__file__).resolve().parent.parent
    script = tmp_path / "layouts.mojo"
    script.write_text(_SCRIPT)
    proc = subprocess.run([mojo, "run", "-I", str(repo), str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    assert len(results) == 7, proc.stdout
    assert all(v == "True" for v in results.values()), results
