"""The GPU path of every op compiles for sm_90 (virtual device, no GPU needed)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_gpu_path_compiles_for_sm90():
    """The quick cases' graphs (prefill on wgmma and mma.sync, paged and e4m3
    caches, decode, the FP8 decode indexer) and the backward at the model
    shape (its wgmma kernel), compiled for a virtual sm_90 device as one
    MAX graph."""
    cmd = [sys.executable, "-m", "msa_py.check", "--device", "virtual", "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "CHECK PASSED" in proc.stdout
    assert "sparse_backward compiled for sm_90" in proc.stdout
    assert "e4m3 q_idx) compiled for sm_90" in proc.stdout


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
    ("select", "select_mma_kernel", "DType.bfloat16, 128, 4, 16, 128, 1, 2, True, False", "wgmma.mma_async"),
    # the FP8 indexer: e4m3 x e4m3 wgmma (k 32) on the 128-column swizzled panels
    ("select", "select_mma_kernel", "DType.float8_e4m3fn, 128, 4, 16, 128, 1, 2, True, False",
     "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"),
    # and over a paged e4m3 index-key cache (cp.async into the same panels)
    ("select", "select_mma_kernel", "DType.float8_e4m3fn, 128, 4, 16, 128, 1, 2, True, True",
     "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3"),
    ("attention", "attention_wgmma_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, False", "wgmma.mma_async"),
    ("attention", "attention_mma_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, False", "mma.sync"),
    ("forced", "forced_combine_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, 1, 2, True, False", "wgmma.mma_async"),
    ("forced", "forced_combine_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, 1, 2, False, False", "mma.sync"),
    # the paged variants: the same kernels with the page-table addressing
    ("attention", "attention_wgmma_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, True", "wgmma.mma_async"),
    ("forced", "forced_combine_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, 1, 2, True, True", "wgmma.mma_async"),
    ("backward", "backward_mma_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16", "mma.sync"),
    ("backward", "backward_wgmma_kernel", "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16, 64", "wgmma.mma_async"),
    # decode over e4m3 caches: the hardware e4m3 -> f16 conversion, not a software one
    ("decode", "decode_scores_kernel", "DType.bfloat16, DType.float8_e4m3fn, 128, 4, 128, 1, 2, 8, True",
     "cvt.rn.f16x2.e4m3x2"),
    # the FP8 indexer's decode score pass: e4m3 x e4m3 mma.sync (k 32) on fragments loaded from global memory
    ("decode", "decode_scores_fp8_kernel", "128, 4, 128, 1, 2, 8, True",
     "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"),
    ("decode_attention", "decode_attention_kernel", "DType.bfloat16, DType.float8_e4m3fn, 128, 128, 16, 4, 16, True",
     "cvt.rn.f16x2.e4m3x2"),
    ("widen", "widen_pages_kernel", "DType.bfloat16, DType.float8_e4m3fn, 128, 4, 128, 0", "cvt.rn.f16x2.e4m3x2"),
]
_IDS = ["select_wgmma", "select_wgmma_fp8", "select_wgmma_fp8_paged", "attention_wgmma", "attention_mma_sync", "forced_wgmma", "forced_mma_sync", "attention_wgmma_paged",
        "forced_wgmma_paged", "backward_mma_sync", "backward_wgmma", "decode_scores_fp8", "decode_scores_fp8_mma", "decode_attention_fp8", "widen_pages_fp8"]


def _assemble(tmp_path, script_text: str, name: str, needle: str) -> tuple[str, str]:
    """Runs a Mojo script printing a kernel's sm_90a PTX (after any lines of
    its own), assembles the PTX with ptxas -v: (script stdout, ptxas notes)."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not on PATH: the PTX cannot be assembled here")
    mojo = shutil.which("mojo") or str(Path(sys.executable).parent / "mojo")
    repo = Path(__file__).resolve().parent.parent
    script = tmp_path / f"ptx_{name}.mojo"
    script.write_text(script_text)
    gen = subprocess.run([mojo, "run", "-I", str(repo), str(script)], capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0 and needle in gen.stdout, gen.stderr[-4000:]
    ptx = tmp_path / f"{name}.ptx"
    ptx.write_text(gen.stdout[gen.stdout.index("//"):])  # the PTX starts at its header comment
    asm = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / f"{name}.cubin")],
                         capture_output=True, text=True, timeout=300)
    notes = asm.stdout + asm.stderr
    assert asm.returncode == 0, notes[-4000:]
    return gen.stdout, notes


@pytest.mark.parametrize("module,kernel,params,needle", _KERNELS, ids=_IDS)
def test_hopper_kernel_assembles_without_spills_or_serialization(tmp_path, module, kernel, params, needle):
    """ptxas -v on the kernel's sm_90a PTX: no spills (the attention and the
    forced pass run at 254-255 registers), and no wgmma serialization note."""
    _, notes = _assemble(tmp_path, _PTX_SCRIPT.format(module=module, kernel=kernel, params=params), module, needle)
    assert not any(n in notes for n in _SERIALIZED), notes
    assert " 0 bytes spill stores" in notes, notes


_LAUNCH_SCRIPT = """
from max.gpu.host.compile import _compile_code
from max.gpu.host import get_gpu_target
from mojo_kernels.{module} import {kernel}, {threads}

def main():
    print("THREADS", {threads})
    print(_compile_code[{kernel}, target=get_gpu_target["sm_90a"]()]().asm)
"""


# (module, kernel, the constant its launch uses as block size)
_WIDE_BLOCKS = [
    ("invert", "_scan_kernel", "SCAN_THREADS"),
    ("invert", "_sort_rows_kernel", "SORT_THREADS"),
]


@pytest.mark.parametrize("module,kernel,threads", _WIDE_BLOCKS, ids=[k for _, k, _ in _WIDE_BLOCKS])
def test_wide_block_fits_the_register_file(tmp_path, module, kernel, threads):
    """registers x threads of a one-launch-per-stage kernel within the SM's
    64K registers: past it the launch fails with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
    on the GPU, which no virtual-device compile shows (a 1024-thread scan at
    76 registers did, on the H100)."""
    out, notes = _assemble(tmp_path, _LAUNCH_SCRIPT.format(module=module, kernel=kernel, threads=threads),
                           kernel.strip("_"), ".entry")
    n_threads = int(out.split("THREADS", 1)[1].split()[0])
    regs = int(notes.split("Used ", 1)[1].split(" registers", 1)[0])
    assert regs * n_threads <= 65536, f"{kernel}: {regs} registers x {n_threads} threads"
