#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck) over every GPU kernel on
# small and odd shapes, prefill and decode kernels:
#   python -m msa_py.check --device gpu --quick --no-time --lean
# (SAN_CHECK_ARGS replaces those check arguments, e.g. "--ties 64" for the
# exact-tie selection family; SAN_TOOLS the list of tools.)
# --lean fetches only fully specified outputs (block_ids, out, lse), so any
# initcheck report is a kernel reading memory nobody wrote. Each tool's whole
# report (with the hazards' threads and blocks) goes to $OUT/sanitize_<tool>.log;
# racecheck keeps reporting past its default cap of hazards.
set -o pipefail
OUT="${OUT:-$PWD/msa_out}"; mkdir -p "$OUT"
export NV_COMPUTE_SANITIZER_MAX_RACECHECK_HAZARDS=${NV_COMPUTE_SANITIZER_MAX_RACECHECK_HAZARDS:-100000}
for tool in ${SAN_TOOLS:-memcheck racecheck initcheck}; do
  echo "=== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
    python3 -m msa_py.check --device gpu ${SAN_CHECK_ARGS:---quick --no-time --lean} ${SAN_ONLY:+--only $SAN_ONLY} > "$OUT/sanitize_$tool.log" 2>&1
  code=$?
  grep -v "^=========     " "$OUT/sanitize_$tool.log" | tail -15
  echo "exit $code"
done
