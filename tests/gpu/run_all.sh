#!/usr/bin/env bash
# The GPU tests, one pytest process per engine test (vLLM engines leak GPU
# memory when several start in one process), each under its own time limit.
# Logs go to ${OUT:-/tmp}/gpu_*.log; a summary line per test is printed.
# Usage (on the GPU machine, after staging vLLM):
#   bash tests/gpu/run_all.sh            # every test
#   bash tests/gpu/run_all.sh kernels caching_llava   # the named ones
set -u
log_dir=${OUT:-/tmp}
status=0
declare -A tests=(
  [kernels]="tests/test_kernels_gpu.py tests/test_triton_ops.py"
  [no_eviction_llava]="tests/test_engine_gpu.py -k no_eviction_is_token_identical_to_flash_attn[llava]"
  [no_eviction_llava-next]="tests/test_engine_gpu.py -k no_eviction_is_token_identical_to_flash_attn[llava-next]"
  [no_eviction_qwen2-vl]="tests/test_engine_gpu.py -k no_eviction_is_token_identical_to_flash_attn[qwen2-vl]"
  [oracle_llava]="tests/test_engine_gpu.py -k oracle[llava-96]"
  [oracle_llava-next]="tests/test_engine_gpu.py -k oracle[llava-next-96]"
  [oracle_qwen2-vl]="tests/test_engine_gpu.py -k oracle[qwen2-vl-48]"
  [caching_llava]="tests/test_engine_gpu.py -k prefix_caching_changes_no_token[llava]"
  [caching_qwen2-vl]="tests/test_engine_gpu.py -k prefix_caching_changes_no_token[qwen2-vl]"
  [caching_stock]="tests/test_engine_gpu.py -k prefix_caching_without_eviction"
  [chunked]="tests/test_engine_gpu.py -k chunked"
  [leaks]="tests/test_engine_gpu.py -k leaks"
  [compile]="tests/test_engine_gpu.py -k graphs"
  [triton]="tests/test_engine_gpu.py -k triton_decode_kernel"
  [serve]="tests/test_serve_gpu.py"
)
order=(kernels no_eviction_llava no_eviction_llava-next no_eviction_qwen2-vl
       oracle_llava oracle_llava-next oracle_qwen2-vl caching_llava
       caching_qwen2-vl caching_stock chunked leaks compile triton serve)
[ $# -gt 0 ] && order=("$@")
for name in "${order[@]}"; do
  args=${tests[$name]:-}
  if [ -z "$args" ]; then echo "== $name: no such test" && status=1 && continue; fi
  limit=${LIMIT:-300}; [ "$name" = serve ] && limit=450
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m pytest -q -m gpu -rA -s -p no:cacheprovider $args \
    > "$log_dir/gpu_$name.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  echo "== $name rc=$rc: $(grep -hE '^(PASSED|FAILED|ERROR)|^E  |oracle kept|block checks' "$log_dir/gpu_$name.log" | cut -c1-200 | head -8 | tr '\n' ' ')"
done
exit $status
