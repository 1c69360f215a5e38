#!/usr/bin/env bash
# All GPU tests, one pytest process per engine test (vLLM engines leak GPU
# memory when several start in one process), each under its own time limit.
# Logs go to ${OUT:-/tmp}/gpu_*.log; a summary line per test is printed.
# Usage (on the GPU machine, after staging vLLM): bash tests/gpu/run_all.sh
set -u
log_dir=${OUT:-/tmp}
status=0
run() {
  local name=$1; shift
  timeout "${LIMIT:-240}" python3 -m pytest -q -m gpu -rA -s -p no:cacheprovider "$@" \
    > "$log_dir/gpu_$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  echo "== $name rc=$rc: $(grep -hE '^(PASSED|FAILED)|^E  |oracle kept|block checks' "$log_dir/gpu_$name.log" | cut -c1-200 | tr '\n' ' ')"
}
run kernels tests/test_kernels_gpu.py tests/test_triton_ops.py
for kind in llava llava-next qwen2-vl; do
  run "no_eviction_$kind" tests/test_engine_gpu.py -k "no_eviction and $kind]"
done
for case in llava-96 llava-next-96 qwen2-vl-48; do
  run "oracle_$case" tests/test_engine_gpu.py -k "oracle and $case"
done
run chunked tests/test_engine_gpu.py -k chunked
run leaks tests/test_engine_gpu.py -k leaks
run compile tests/test_engine_gpu.py -k compile
LIMIT=400 run serve tests/test_serve_gpu.py
exit $status
