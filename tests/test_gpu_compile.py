"""The GPU path of every op compiles for sm_90 (virtual device, no GPU needed)."""
import subprocess
import sys


def test_gpu_path_compiles_for_sm90():
    proc = subprocess.run([sys.executable, "-m", "msa_py.check", "--device", "virtual", "--quick"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "CHECK PASSED" in proc.stdout
