#!/usr/bin/env bash
# Per-instruction (SASS) warp-stall samples of one MSA kernel at the model
# shape: which instructions its warps wait on, and why. profile.sh gives the
# kernel-wide stall reasons; this names the instructions behind them.
#   bash benchmarks/profile_source.sh $OUT/attn          # block attention, 32K prefill
#   PROFILE_SKIP=19 bash benchmarks/profile_source.sh $OUT/forced
#   PROFILE_SKIP=10 bash benchmarks/profile_source.sh $OUT/select
# ncu_driver.py --prefill runs the stages twice; its kernels launch in this
# order each time (10 a run, as PROFILE_TIMES=1 lists them in
# results/ncu_times_h100_2026-11-27_128k_w2048.log): indexer, the
# inversion's six kernels, lse fill, block attention, forced pass. So
# PROFILE_SKIP=18 picks the second block attention, 19 the second forced pass, 10 the second indexer.
# Writes STEM.ncu-rep, STEM.sass.csv (one row per instruction) and
# STEM.top.txt (the 40 most sampled instructions, samples by opcode).
set -o pipefail
stem=${1:-msa_out/source}
mkdir -p "$(dirname "$stem")"
ncu --clock-control none --target-processes all -k "regex:${PROFILE_KERNELS:-mojo_pkg}" \
  --launch-skip "${PROFILE_SKIP:-18}" -c 1 \
  --section SourceCounters --section WarpStateStats --section SpeedOfLight --section LaunchStats \
  -f -o "$stem" python3 benchmarks/ncu_driver.py ${PROFILE_ARGS:---prefill 32768} > "$stem.run.log" 2>&1
echo "ncu exit $?"
ncu -i "$stem.ncu-rep" --page source --csv --print-source sass > "$stem.sass.csv" 2> "$stem.sass.err"
echo "source page exit $?: $(wc -l < "$stem.sass.csv") lines"
python3 "$(dirname "$0")/sass_top.py" "$stem.sass.csv" > "$stem.top.txt" 2>&1
head -60 "$stem.top.txt"
