#!/usr/bin/env bash
# PTX of one kernel instantiation for sm_90a, then ptxas's verdict on it:
# registers, spills, and the wgmma warnings that decide whether a pipeline
# stays a pipeline (C7514: chains serialized because other instructions
# touch in-flight accumulators; C7517: waits injected; C7518/C7519:
# serialized around branches or register writes). No GPU needed: the
# venv's mojo (MOJO to override) and a CUDA ptxas on PATH.
#   bash benchmarks/ptxas_check.sh TREE MODULE KERNEL "PARAMS" [OUT_STEM]
# e.g.
#   bash benchmarks/ptxas_check.sh . attention attention_wgmma_kernel \
#     "DType.bfloat16, DType.bfloat16, 128, 128, 16, 4, 16"
#   bash benchmarks/ptxas_check.sh .gpu/new select select_mma_kernel \
#     "DType.bfloat16, 128, 4, 16, 128, 1, 2, True"
# Writes OUT_STEM.ptx and OUT_STEM.ptxas.txt (default /tmp/ptxas_check/KERNEL).
set -eo pipefail
tree=$1 mod=$2 kernel=$3 params=$4
stem=${5:-/tmp/ptxas_check/$kernel}
root=$(cd "$(dirname "$0")/.." && pwd)
mojo=${MOJO:-$root/.venv/bin/mojo}
mkdir -p "$(dirname "$stem")"
src="$stem.mojo"
cat > "$src" <<EOM
from max.gpu.host.compile import _compile_code
from max.gpu.host import get_gpu_target
from mojo_kernels.$mod import $kernel

def main():
    print(_compile_code[$kernel[$params], target=get_gpu_target["sm_90a"]()]().asm)
EOM
(cd "$tree" && "$mojo" run -I . "$src") > "$stem.out" 2> "$stem.err" || { tail -20 "$stem.err"; exit 1; }
# the PTX starts at its first comment line; mojo prints nothing before it but banners
sed -n '/^\/\//,$p' "$stem.out" > "$stem.ptx"
ptxas -arch=sm_90a -v "$stem.ptx" -o "$stem.cubin" > "$stem.ptxas.txt" 2>&1
grep -E "C75[0-9][0-9]|registers|spill" "$stem.ptxas.txt" | sed 's/ in function .*//'
echo "PTX $(wc -l < "$stem.ptx") lines: $stem.ptx"
