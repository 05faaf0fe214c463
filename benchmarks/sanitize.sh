#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck) over every GPU kernel on
# small and odd shapes, prefill and decode kernels:
#   python -m msa_py.check --device gpu --quick --no-time --lean
# --lean fetches only fully specified outputs (block_ids, out, lse), so any
# initcheck report is a kernel reading memory nobody wrote.
set -o pipefail
for tool in memcheck racecheck initcheck; do
  echo "=== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
    python3 -m msa_py.check --device gpu --quick --no-time --lean ${SAN_ONLY:+--only $SAN_ONLY} 2>&1 | grep -v "^=========     " | tail -15
  echo "exit ${PIPESTATUS[0]}"
done
