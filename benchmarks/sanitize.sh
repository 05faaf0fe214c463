#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, initcheck) over every GPU kernel on
# small and odd shapes: python -m msa_py.check --device gpu --quick --no-time.
set -o pipefail
for tool in memcheck racecheck initcheck; do
  echo "=== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
    python3 -m msa_py.check --device gpu --quick --no-time 2>&1 | grep -v "^=========     " | tail -15
  echo "exit ${PIPESTATUS[0]}"
done
