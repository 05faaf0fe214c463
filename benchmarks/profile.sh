#!/usr/bin/env bash
# Nsight Compute over the MSA kernels at the model shape (second launch of
# each, after compile and warm-up): speed of light, warp stall reasons,
# occupancy, memory, each stall reason's warps per issued instruction.
# Clocks left alone (--clock-control none, METHOD.md); PROFILE_CLOCK=base locks
# them at base for an A/B of one kernel's duration on a card that throttles.
#   PROFILE_ARGS="--prefill 32768" bash benchmarks/profile.sh > log
# MAX names the kernels it builds mojo_pkg_<hash> (their Mojo names are
# gone), so the default filter takes every one; tell the stages apart by
# grid and block size in the report. PROFILE_SKIP skips the warm-up launches.
# PROFILE_TIMES=1: durations, DRAM bytes and launch shapes only (fast; e.g. the
# inversion's kernels at two window sizes).
# PROFILE_FROM_START=off: only what the driver runs between
# torch.cuda.profiler.start() and stop() (--backward: the second step).
set -o pipefail
if [ "${PROFILE_TIMES:-0}" = 1 ]; then
  # each kernel's duration, DRAM bytes and launch shape: a pass or two per kernel
  SECTIONS=(--metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size,launch__block_size,launch__registers_per_thread)
else
  SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
    --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio")
fi
ARGS=${PROFILE_ARGS:---prefill 32768}
ncu --clock-control "${PROFILE_CLOCK:-none}" --target-processes all --profile-from-start "${PROFILE_FROM_START:-on}" \
  -k "regex:${PROFILE_KERNELS:-mojo_pkg}" \
  --launch-skip-before-match 0 ${PROFILE_SKIP:+--launch-skip $PROFILE_SKIP} -c "${PROFILE_COUNT:-40}" \
  "${SECTIONS[@]}" \
  python3 benchmarks/ncu_driver.py $ARGS 2>&1 | grep -v "^==PROF==" \
  | grep -E -v "^\s+(-+|Section:.*)$" | cut -c1-160
