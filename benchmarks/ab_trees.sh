#!/usr/bin/env bash
# A/B of two source trees on one GPU machine, back to back (after pack.sh's
# set-up, ../shared/gpu/README.md). Make the trees here, in ignored folders:
#   git archive <branch> | tar x -C .gpu/new ; git archive main | tar x -C .gpu/base
# then, carrying both, one step per device call if the 10-minute limit needs it:
#   NEW=.gpu/new BASE=.gpu/base NEW_COMMIT=<sha> BASE_COMMIT=<sha> OUT=$OUT bash benchmarks/ab_trees.sh check bench sanitize
# check     the trees of CHECK_TREES (default "NEW") against the reference, side by
#           side (mostly compile: two or three share the machine's cores in about
#           the time of one); CHECK_ONLY the cases, <TREE>_CHECK one tree's own;
#           logs in $OUT/check_<tree>.log
# bench     `msa bench` at BENCH_LENGTHS in each tree of BENCH_TREES (default
#           "NEW BASE"; more trees: e.g. NEW2=.gpu/new2 BENCH_TREES="NEW NEW2 BASE"),
#           <TREE>_ARGS more `msa bench` options for that tree (e.g. NEW_ARGS="--no-forced-pass")
# select    the indexer alone (benchmarks/stage_bench.py) at BENCH_LENGTHS in each
#           tree of BENCH_TREES, SELECT_ROUNDS times round the trees (default 2),
#           so a drifting card shows up as a spread, not as a difference
# attn      the same for the block attention and the forced pass (stage_bench.py
#           --stages attention): no full-layer model, no dense baseline;
#           <TREE>_STAGE_ARGS more stage_bench.py options (e.g. BASE_STAGE_ARGS=--empty-grid)
# sanitize  memcheck and racecheck on the new tree (SANITIZE_ONLY: the cases)
set -o pipefail
export PYTHONUNBUFFERED=1 PATH=/tmp/site/modular/bin:$PATH
OUT="${OUT:-$PWD/msa_out}"; mkdir -p "$OUT"
ROOT=$PWD
CHECK_ONLY="${CHECK_ONLY:-ragged_g4_bf16_mma,g16_d128_bf16,g1_d128_f16,di256_bf16,32k_model_shape_bf16}"
SANITIZE_ONLY="${SANITIZE_ONLY:-ragged_g4_bf16_mma,g16_d128_bf16}"
BENCH_LENGTHS="${BENCH_LENGTHS:-32k,128k}"
# SM clock, temperature and active clock-event reasons (0x20 / 0x40: thermal
# slowdown), so a throttled card's timings are seen as such, not compared.
gpu_state() { echo "gpu $1: $(nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw,clocks_event_reasons.active --format=csv,noheader)" | tee -a "$OUT/gpu_state.log"; }
in_tree() { (cd "$ROOT/$1" && shift && PYTHONPATH=/tmp/site:$PWD "$@"); }
rc=0
for s in "$@"; do
  case "$s" in
    check)
      pids=()
      for t in ${CHECK_TREES:-NEW}; do
        c="${t}_CHECK"
        (in_tree "${!t}" python3 -m msa_py.check --device gpu --only "${!c:-$CHECK_ONLY}" > "$OUT/check_${t,,}.log" 2>&1) &
        pids+=($!)
      done
      for p in "${pids[@]}"; do wait "$p" || rc=1; done
      for t in ${CHECK_TREES:-NEW}; do echo "== $t"; grep -E "^(PASS|FAIL)|CHECK (PASSED|FAILED)|^[A-Za-z]*Error" "$OUT/check_${t,,}.log" | cut -c1-240; done ;;
    bench)
      for t in ${BENCH_TREES:-NEW BASE}; do
        c="${t}_COMMIT"
        gpu_state "before $t"
        a="${t}_ARGS"
        MSA_COMMIT="${!c:-unknown}" in_tree "${!t}" python3 -m msa_py bench --lengths "$BENCH_LENGTHS" --gather-max 0 --repeats 3 --chunk 0 \
          ${!a} --out "$OUT/bench_${t,,}" 2>&1 | grep -v "^\[" | tail -8 || rc=1
        gpu_state "after $t"
      done ;;
    select|attn)
      stages=$([ "$s" = attn ] && echo attention || echo select)
      for r in $(seq "${SELECT_ROUNDS:-2}"); do
        for t in ${BENCH_TREES:-NEW BASE}; do
          gpu_state "before $s $t round $r"
          a="${t}_STAGE_ARGS"
          in_tree "${!t}" python3 "$ROOT/${!t}/benchmarks/stage_bench.py" --stages "$stages" --lengths "$BENCH_LENGTHS" ${!a} \
            --out "$OUT/${s}_${t,,}_r$r.json" 2>&1 | grep -v "^\[" | tail -6 | sed "s/^/$t r$r: /" || rc=1
        done
      done ;;
    sanitize)
      for tool in memcheck racecheck; do
        in_tree "$NEW" compute-sanitizer --tool $tool --error-exitcode 9 --target-processes all python3 -m msa_py.check \
          --device gpu --quick --no-time --lean --only "$SANITIZE_ONLY" 2>&1 | tail -3 | tee -a "$OUT/sanitize.log" || rc=1
      done ;;
    *) echo "unknown step $s" ;;
  esac
done
exit $rc
