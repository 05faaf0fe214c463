#!/usr/bin/env bash
# One device call: build, check against the reference, time. Run on the GPU
# machine after the pack.sh set-up (../shared/gpu/README.md), from the repo root:
#   export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/modular/bin:$PATH
#   bash benchmarks/gpu_run.sh [mef] check [check-small] [check-32k] [check-large] [check-decode] [ties] [sanitize-ties] [check-backward] [sanitize-backward] [fp8-cuda] [check-paged] [check-fp8] [long-fp8] [plan] [bench-backward] [torch-new] [decode-paged] [decode-fp8] [decode-fp8-1m] [long] [bench] [bench-base] [decode] [decode-spec] [demo] [torch] [overhead] [sanitize] [memory] [profile] [profile-backward-times] [profile-backward] [profile-decode] [profile-fp8-select] [profile-decode-fp8] [profile-plan-fp8]
# Logs go to $OUT (the device tool's folder) or ./msa_out. Pass MSA_COMMIT
# (this machine's `git rev-parse --short HEAD`): the device's copy of the
# working tree may carry another branch's git metadata.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/msa_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
echo "commit ${MSA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} $(date -u +%FT%TZ)" | tee -a "$OUT/gpu.txt"
python3 -m msa_py.build > "$OUT/build.log" 2>&1 || echo "(mojo precompile unavailable here: MAX compiles the kernel sources itself)"
rc=0
for step in "$@"; do
  case "$step" in
    mef) mkdir -p ~/.cache/modular/.max_cache/mof/mef/26.7.0 && cp .gpu/mef/* ~/.cache/modular/.max_cache/mof/mef/26.7.0/ \
           && echo "installed $(ls .gpu/mef | wc -l) precompiled models (benchmarks/precompile.py)" ;;
    check) python3 -m msa_py.check --device gpu 2>&1 | tee "$OUT/check.log" || rc=1 ;;
    ties) python3 -m msa_py.check --device gpu --ties ${TIES_CASES:-400} 2>&1 | tee "$OUT/ties.log" || rc=1 ;;
    sanitize-ties) SAN_CHECK_ARGS="--ties ${SAN_TIES_CASES:-64} --seed 1" bash benchmarks/sanitize.sh 2>&1 | tee "$OUT/sanitize.log" || rc=1 ;;
    sanitize-backward) SAN_CHECK_ARGS="--backward --no-time --only ${SAN_BWD_CASES:-bwd_ragged_g4_bf16,bwd_g32_chunks_bf16,bwd_d64_bf16}" bash benchmarks/sanitize.sh 2>&1 | tee "$OUT/sanitize_backward.log" || rc=1 ;;
    fp8-cuda) python3 -m pytest -q tests/test_fp8_index.py --device cuda 2>&1 | tee "$OUT/fp8_cuda.log" || rc=1 ;;
    check-backward) python3 -m msa_py.check --device gpu --backward ${BWD_ONLY:+--only $BWD_ONLY} 2>&1 | tee "$OUT/check_backward.log" || rc=1 ;;
    check-paged) python3 -m msa_py.check --device gpu --paged ${PAGED_ONLY:+--only $PAGED_ONLY} 2>&1 | tee "$OUT/check_paged.log" || rc=1 ;;
    check-fp8) python3 -m msa_py.check --device gpu --fp8-index 2>&1 | tee "$OUT/check_fp8.log" || rc=1 ;;
    long-fp8) python3 -m msa_py bench --lengths ${LONG_LENGTHS:-256k,1m} --index-dtype fp8 --repeats 2 --gather-max 0 --out "$OUT/long_fp8" 2>&1 | tee "$OUT/long_fp8.log" || rc=1 ;;
    plan) python3 -m pytest -q tests/test_paged.py -k "plan_run or fp8_caches" --device cuda 2>&1 | tee "$OUT/plan.log" || rc=1 ;;
    bench-backward) python3 -m msa_py bench --backward --lengths ${BWD_LENGTHS:-32k,128k} --repeats ${BWD_REPEATS:-3} --out "$OUT/backward" 2>&1 | tee "$OUT/backward.log" || rc=1 ;;
    torch-new) python3 -m pytest -q -x tests/test_paged.py tests/test_backward.py --device cuda 2>&1 | tee "$OUT/torch_new.log" || rc=1 ;;
    decode-paged) python3 -m msa_py bench --decode --paged --batches ${DEC_BATCHES:-32} --contexts ${DEC_CONTEXTS:-128k} --out "$OUT/decode_paged" 2>&1 | tee "$OUT/decode_paged.log" || rc=1 ;;
    decode-fp8) python3 -m msa_py bench --decode --paged --kv-dtype fp8 --index-dtype fp8 ${DEC_LEAN:+--lean} --batches ${DEC_BATCHES:-32} --contexts ${DEC_CONTEXTS:-128k} --out "$OUT/decode_fp8" 2>&1 | tee "$OUT/decode_fp8.log" || rc=1 ;;
    decode-fp8-1m) python3 -m msa_py bench --decode --paged --kv-dtype fp8 --index-dtype fp8 --lean --batches 8 --contexts 1m --repeats 3 --out "$OUT/decode_fp8_1m" 2>&1 | tee "$OUT/decode_fp8_1m.log" || rc=1 ;;
    long) python3 -m msa_py bench --lengths ${LONG_LENGTHS:-256k,1m} --repeats 2 --gather-max 0 --out "$OUT/long" 2>&1 | tee "$OUT/long.log" || rc=1 ;;
    check-small) python3 -m msa_py.check --device gpu --no-large 2>&1 | tee "$OUT/check.log" || rc=1 ;;
    check-32k) python3 -m msa_py.check --device gpu --only 32k_model_shape_bf16 2>&1 | tee "$OUT/check_32k.log" || rc=1 ;;
    check-large) python3 -m msa_py.check --device gpu --only 32k_model_shape_bf16,128k_model_shape_bf16,decode_128k_b8_bf16 2>&1 | tee "$OUT/check_large.log" || rc=1 ;;
    check-decode) python3 -m msa_py.check --device gpu --only decode_ragged_bf16,decode_spec8_bf16,decode_overflow_f16,decode_128k_b8_bf16 2>&1 | tee "$OUT/check_decode.log" || rc=1 ;;
    memory) python3 benchmarks/memory.py --out "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log" || rc=1 ;;
    bench) python3 -m msa_py bench --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || rc=1 ;;
    bench-base) python3 -m msa_py bench --no-forced-pass --out "$OUT/bench_base" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_base.log" || rc=1 ;;
    decode) python3 -m msa_py bench --decode --out "$OUT/decode" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" || rc=1 ;;
    decode-spec) python3 -m msa_py bench --decode --n-new 8 --batches 8,32 --contexts 32k,128k --out "$OUT/decode_spec8" 2>&1 | tee "$OUT/decode_spec8.log" || rc=1 ;;
    demo) python3 -m msa_py demo 2>&1 | tee "$OUT/demo.log" || rc=1 ;;
    torch) python3 -m pytest -q -x tests/test_torch_ops.py --device cuda 2>&1 | tee "$OUT/torch.log" || rc=1 ;;
    overhead) python3 benchmarks/torch_overhead.py 2>&1 | tee "$OUT/overhead.log" || rc=1 ;;
    sanitize) bash benchmarks/sanitize.sh 2>&1 | tee "$OUT/sanitize.log" || rc=1 ;;
    profile) bash benchmarks/profile.sh 2>&1 | tee "$OUT/profile.log" || rc=1 ;;
    profile-fp8-select) PROFILE_ARGS="--prefill 65536 --index-dtype fp8 --select-only" bash benchmarks/profile.sh 2>&1 | tee "$OUT/profile_fp8_select.log" || rc=1 ;;
    profile-decode-fp8) PROFILE_ARGS="--decode 32 131072 --paged-fp8" bash benchmarks/profile.sh 2>&1 | tee "$OUT/profile_decode_fp8.log" || rc=1 ;;
    profile-plan-fp8) PROFILE_ARGS="--decode 32 131072 --plan-fp8" bash benchmarks/profile.sh 2>&1 | tee "$OUT/profile_plan_fp8.log" || rc=1 ;;
    profile-backward-times) PROFILE_COUNT=${PROFILE_COUNT:-100} PROFILE_FROM_START=off PROFILE_TIMES=1 PROFILE_ARGS="--backward ${PROF_BWD_T:-16384}" MSA_SKIP_VALUE_CHECKS=1 bash benchmarks/profile.sh 2>&1 | tee "$OUT/profile_backward_times.log" || rc=1 ;;
    profile-backward) PROFILE_FROM_START=off PROFILE_ARGS="--backward ${PROF_BWD_T:-16384}" MSA_SKIP_VALUE_CHECKS=1 bash benchmarks/profile.sh 2>&1 | tee "$OUT/profile_backward.log" || rc=1 ;;
    profile-decode) PROFILE_ARGS="--decode 32 131072" bash benchmarks/profile.sh 2>&1 | tee "$OUT/profile_decode.log" || rc=1 ;;
    *) echo "unknown step $step" ;;
  esac
done
exit $rc
