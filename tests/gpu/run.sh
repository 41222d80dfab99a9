#!/usr/bin/env bash
# The GPU checks on a device machine, within one call: install the carried wheels (tests/gpu/env.sh),
# then the gpu-marked tests, the self-check and the layer benchmark, each phase under a time limit
# of its own so that one stuck phase cannot eat the call. The last line printed is the summary,
#   GPU suite: N passed, M failed, K skipped in T s (setup S s, tests X s, selfcheck Y s, layer bench Z s)
# (a phase that failed or ran out of time says so there), and the exit status is non-zero when
# anything failed, did not finish or ran out of time.
# Usage (from the repo root, with .whl carried): bash tests/gpu/run.sh [OUT_DIR] [PYTEST_TARGETS...]
#   With PYTEST_TARGETS only those tests run (no self-check, no benchmark).
# The tests run in GPU_TEST_WORKERS pytest-xdist processes (default 6; 0: one process) sharing the
# GPUs: most of a fresh machine's test time is single-threaded Triton compilation and process
# start-up, not GPU work. Each test module goes whole to one worker (its tests share runs through
# module fixtures), test_gpu_kernels.py's tests one by one (tests/gpu/conftest.py). The self-check
# (small models on the CPU, one GPU check) runs beside the tests; the layer benchmark alone, last.
# Time limits in seconds: GPU_TESTS_TIMEOUT (all tests, default 300), GPU_TEST_TIMEOUT (one test
# with its fixtures, 240, where pytest-timeout is installed), GPU_SELFCHECK_TIMEOUT (60),
# GPU_LAYER_TIMEOUT (both layer runs, 90). A phase at its limit gets ^C, and is killed 15 s later:
# with the setup (~20-30 s) even a call where every phase runs out stays under 500 s.
# $OUT keeps at most 8 files (what a device call brings back): the logs, gpu_tests.jsonl (each
# test's outcome and seconds), summary.txt, triton_autotune.tgz (this machine's compiled kernels and autotune choices:
# copy it into .triton_cache/ (env.sh unpacks it there) to spare the next fresh machine Triton's work) and results.tgz
# (everything else the tests and benchmarks wrote: JSON results, training logs).
set -uo pipefail
START=$SECONDS
OUT=${1:-${OUT:-/tmp/out}}
shift || true
export OUT
mkdir -p "$OUT"

PHASES=()  # "name seconds" or "name seconds status", in the order run
BAD=0

summary() {
  local counts
  counts=$(python3 - "$OUT/gpu_tests.jsonl" <<'EOF'
import json, os, sys
outcome = {}  # test -> failed | skipped | passed | unfinished (set up, never reported a call)
collected = 0
if os.path.exists(sys.argv[1]):
    for line in open(sys.argv[1]):
        report = json.loads(line)
        if "collected" in report:
            collected = max(collected, report["collected"])
            continue
        test, was = report["test"], outcome.get(report["test"], "unfinished")
        if report["outcome"] == "failed" or was == "failed":
            outcome[test] = "failed"
        elif report["outcome"] == "skipped" or was == "skipped":
            outcome[test] = "skipped"
        elif report["when"] == "call" or was == "passed":
            outcome[test] = "passed"
        else:
            outcome[test] = was
values = list(outcome.values())
unfinished = values.count("unfinished") + max(collected - len(outcome), 0)  # a timeout came first
print(values.count("passed"), values.count("failed"), values.count("skipped"), unfinished)
EOF
)
  local passed failed skipped unfinished
  read -r passed failed skipped unfinished <<< "${counts:-0 0 0 0}"
  local line="GPU suite: $passed passed, $failed failed, $skipped skipped"
  [ "$unfinished" -gt 0 ] && line+=", $unfinished not finished"
  line+=" in $((SECONDS - START)) s ($(IFS=,; echo "${PHASES[*]}" | sed 's/,/, /g'))"
  if [ "$failed" -gt 0 ] || [ "$unfinished" -gt 0 ] || [ $((passed + failed)) -eq 0 ]; then BAD=1; fi
  echo "$line" > "$OUT/summary.txt"
  pack_results
  echo "$line"
}

pack_results() {  # the rest of $OUT into results.tgz, and the autotune choices beside it
  if [ -d /tmp/triton_cache ]; then
    # Autotune choices only: compiled kernels would not fit the carry limit beside .whl and .corpus.
    (cd /tmp/triton_cache && find . -name "*.autotune.json" | tar czf "$OUT/triton_autotune.tgz" -T -) 2>/dev/null
  fi
  local keep=" gpu_tests.log gpu_tests.jsonl selfcheck.log layer.log summary.txt triton_autotune.tgz results.tgz "
  local rest=()
  for f in "$OUT"/*; do
    [ -e "$f" ] || continue
    case "$keep" in *" $(basename "$f") "*) ;; *) rest+=("$(basename "$f")") ;; esac
  done
  if [ ${#rest[@]} -gt 0 ]; then
    tar czf "$OUT/results.tgz" -C "$OUT" "${rest[@]}" && (cd "$OUT" && rm -rf -- "${rest[@]}")
  fi
}

phase() {  # NAME LIMIT LOG COMMAND...: COMMAND under LIMIT seconds (^C first, then kill), output in LOG
  local name=$1 limit=$2 log=$3 begin=$SECONDS code
  shift 3
  echo "== $name (limit ${limit} s)"
  timeout -s INT -k 15 "$limit" "$@" >> "$log" 2>&1
  code=$?
  local took=$((SECONDS - begin))
  if [ $code -eq 124 ] || [ $code -eq 137 ]; then
    PHASES+=("$name $took s timed out"); BAD=1
  elif [ $code -ne 0 ]; then
    PHASES+=("$name $took s failed (exit $code)"); BAD=1
  else
    PHASES+=("$name $took s")
  fi
  return $code
}

begin=$SECONDS
source tests/gpu/env.sh > "$OUT/setup.log" 2>&1
code=$?
cat "$OUT/setup.log"
if [ $code -ne 0 ]; then
  PHASES+=("setup $((SECONDS - begin)) s failed"); summary; exit 1
fi
PHASES+=("setup $((SECONDS - begin)) s")

export FALCON_H1_GPU_RESULTS="$OUT/gpu_tests.jsonl"
rm -f "$FALCON_H1_GPU_RESULTS" "$OUT/gpu_tests.log" "$OUT/selfcheck.log" "$OUT/layer.log"
PYTEST=(python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --durations=15 -rfEsP)
WORKERS=${GPU_TEST_WORKERS:-6}
if [ "$WORKERS" -gt 0 ] && python3 -c "import xdist" 2>/dev/null; then
  PYTEST+=(-n "$WORKERS")  # scheduled by tests/gpu/conftest.py's pytest_xdist_make_scheduler
fi
if python3 -c "import pytest_timeout" 2>/dev/null; then
  PYTEST+=(--timeout "${GPU_TEST_TIMEOUT:-240}")
fi
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(tests/gpu)
SELFCHECK_PHASE=/tmp/falcon_h1_selfcheck_phase.$$
if [ $# -eq 0 ]; then
  (phase selfcheck "${GPU_SELFCHECK_TIMEOUT:-60}" "$OUT/selfcheck.log" python3 -m falcon_h1.selfcheck
   echo "${PHASES[-1]} (beside the tests)" > "$SELFCHECK_PHASE") &
  SELFCHECK_PID=$!
fi
# Trainings and probes run in process sessions of their own, out of reach of the time limit's
# signals; a test that ends kills its session, a test run killed at its limit cannot: the sessions
# it noted are ended here (by their ids), so that they leave the GPU to the next phases.
export FALCON_H1_TEST_SESSIONS=/tmp/falcon_h1_test_sessions.$$
phase tests "${GPU_TESTS_TIMEOUT:-300}" "$OUT/gpu_tests.log" "${PYTEST[@]}" "${TARGETS[@]}"
code=$?
if { [ $code -eq 124 ] || [ $code -eq 137 ]; } && [ -f "$FALCON_H1_TEST_SESSIONS" ]; then
  while read -r session; do kill -KILL -- "-$session" 2>/dev/null; done < "$FALCON_H1_TEST_SESSIONS"
fi
rm -f "$FALCON_H1_TEST_SESSIONS"
tail -n 45 "$OUT/gpu_tests.log"

if [ $# -eq 0 ]; then
  wait "$SELFCHECK_PID"
  PHASES+=("$(cat "$SELFCHECK_PHASE" 2>/dev/null || echo "selfcheck: no result")")
  case "${PHASES[-1]}" in *failed*|*"timed out"*|*"no result"*) BAD=1 ;; esac
  rm -f "$SELFCHECK_PHASE"
  tail -n 20 "$OUT/selfcheck.log"
  # The layer at the 1.5B's shape, GPU kernels, 2 x 4096 and 2 x 8192 tokens (docs/performance.md).
  phase "layer bench" "${GPU_LAYER_TIMEOUT:-90}" "$OUT/layer.log" bash -c '
    code=0
    for sl in 4096 8192; do
      python3 -m falcon_h1.benchmarks.layer --preset 1.5b --micro-batch 2 --seq-len $sl \
        --json "$OUT/layer_1.5b_2x$sl.json" || code=1
    done
    exit $code'
  cat "$OUT/layer.log"
fi
summary
exit $BAD
