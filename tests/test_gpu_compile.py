"""The GPU path of every op compiles for sm_90 (virtual device, no GPU needed)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_gpu_path_compiles_for_sm90():
    proc = subprocess.run([sys.executable, "-m", "msa_py.check", "--device", "virtual", "--quick"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "CHECK PASSED" in proc.stdout


# ptxas notes that mean every wgmma of a kernel runs alone (a wait after each):
# C7514 accumulator registers touched inside a pipeline stage, C7515 extern
# calls, C7518 a divergent-looking path, C7519/C7520 register shortage and
# ill-formed stages. The Hopper indexer ran that way unnoticed until v14.
_SERIALIZED = ("C7514", "C7515", "C7518", "C7519", "C7520", "serialized")

_PTX_SCRIPT = """
from max.gpu.host.compile import _compile_code
from max.gpu.host import get_gpu_target
from mojo_kernels.{module} import {kernel}

def main():
    print(_compile_code[{kernel}[{params}], target=get_gpu_target["sm_90a"]()]().asm)
"""

# (module, kernel, compile-time parameters at the model shape, an instruction its PTX must hold)
_KERNELS = [
    ("select", "select_mma_kernel", "DType.bfloat16, 128, 4, 16, 128, 1, 2, True", "wgmma.mma_async"),
    ("attention", "attention_wgmma_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16", "wgmma.mma_async"),
    ("attention", "attention_mma_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16", "mma.sync"),
    ("forced", "forced_combine_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, 1, 2, True", "wgmma.mma_async"),
    ("forced", "forced_combine_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, 1, 2, False", "mma.sync"),
]
_IDS = ["select_wgmma", "attention_wgmma", "attention_mma_sync", "forced_wgmma", "forced_mma_sync"]


@pytest.mark.parametrize("module,kernel,params,needle", _KERNELS, ids=_IDS)
def test_hopper_kernel_assembles_without_spills_or_serialization(tmp_path, module, kernel, params, needle):
    """ptxas -v on the kernel's sm_90a PTX: no spills (the attention and the
    forced pass run at 254-255 registers), and no wgmma serialization note."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not on PATH: the PTX cannot be assembled here")
    mojo = shutil.which("mojo") or str(Path(sys.executable).parent / "mojo")
    repo = Path(__file__).resolve().parent.parent
    script = tmp_path / f"ptx_{module}.mojo"
    script.write_text(_PTX_SCRIPT.format(module=module, kernel=kernel, params=params))
    gen = subprocess.run([mojo, "run", "-I", str(repo), str(script)], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0 and needle in gen.stdout, gen.stderr[-4000:]
    ptx = tmp_path / f"{module}.ptx"
    ptx.write_text(gen.stdout)
    asm = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / f"{module}.cubin")],
                         capture_output=True, text=True, timeout=300)
    notes = asm.stdout + asm.stderr
    assert asm.returncode == 0, notes[-4000:]
    assert not any(n in notes for n in _SERIALIZED), notes
    assert " 0 bytes spill stores" in notes, notes
