#!/usr/bin/env bash
# The GPU tests, one pytest process per engine test (vLLM engines leak GPU
# memory when several start in one process), each under its own time limit.
# Logs go to ${OUT:-/tmp}/gpu_*.log; a summary line per test is printed.
# Usage (on the GPU machine, after staging vLLM):
#   bash tests/gpu/run_all.sh            # every test
#   bash tests/gpu/run_all.sh kernels caching_llava   # the named ones
#   JOBS=2 bash tests/gpu/run_all.sh     # up to 2 small engine tests at
#                                        # once, beside up to 3 7B servers
# With JOBS > 1 the tests share the GPU: each engine and server has a fixed
# KV pool (no sizing from a memory profile, which the others would disturb).
# The small engine tests (1 GiB pools) run up to JOBS at a time, and beside
# them the tests that serve a 7B/8B model (3 GiB pools, about 21 GiB each)
# up to SERVER_JOBS (default 3; on an 80 GiB GPU with JOBS=2).
# `examples` and `long_prompt` size their KV pools from free memory, as
# users do, so they run alone afterwards. A test that fails beside others is
# run again alone, and both results are printed. Each summary line gives the
# test's seconds. Tests that start a server or engines one after another
# (the serve ones, examples, long_prompt, compile, syncs, chunked,
# fp8_no_eviction, caching_encoder) get twice LIMIT. A test whose every case
# was skipped counts as failed.
set -u
log_dir=${OUT:-/tmp}
mkdir -p "$log_dir" /tmp/gpu_tests
jobs=${JOBS:-1}
server_jobs=${SERVER_JOBS:-3}
engine=tests/engine/test_engine_gpu.py
# each dummy 7B/8B folder served (serve_matrix.MODELS), a test of its own
served_models=(llava-1.5-7b llava-next-7b llava-next-mistral-7b qwen2-vl-7b
               qwen2.5-vl-7b qwen3-vl-8b llava-onevision-7b internvl3-8b)
declare -A tests=(
  [kernels]="tests/kernels/test_kernels_gpu.py tests/kernels/test_triton_ops.py tests/kernels/test_attention_gpu.py"
  [no_eviction_llava]="$engine -k no_eviction_is_token_identical_to_flash_attn[llava]"
  [no_eviction_llava-next]="$engine -k no_eviction_is_token_identical_to_flash_attn[llava-next]"
  [no_eviction_qwen2-vl]="$engine -k no_eviction_is_token_identical_to_flash_attn[qwen2-vl]"
  [no_eviction_qwen2.5-vl]="$engine -k no_eviction_is_token_identical_to_flash_attn[qwen2.5-vl]"
  [no_eviction_qwen3-vl]="$engine -k no_eviction_is_token_identical_to_flash_attn[qwen3-vl]"
  [no_eviction_llava-onevision]="$engine -k no_eviction_is_token_identical_to_flash_attn[llava-onevision]"
  [no_eviction_llava-next-mistral]="$engine -k no_eviction_is_token_identical_to_flash_attn[llava-next-mistral]"
  [no_eviction_internvl]="$engine -k no_eviction_is_token_identical_to_flash_attn[internvl]"
  [oracle_llava]="$engine -k oracle[llava-96]"
  [oracle_llava-next]="$engine -k oracle[llava-next-96]"
  [oracle_qwen2-vl]="$engine -k oracle[qwen2-vl-48]"
  [oracle_qwen2.5-vl]="$engine -k oracle[qwen2.5-vl-48]"
  [oracle_qwen3-vl]="$engine -k oracle[qwen3-vl-48]"
  [oracle_llava-onevision]="$engine -k oracle[llava-onevision-96]"
  [oracle_internvl]="$engine -k oracle[internvl-96]"
  [oracle_qwen2-vl-video]="$engine -k oracle[qwen2-vl-video-48]"
  [video_no_eviction_qwen2-vl]="$engine -k test_video_prompts_without_eviction_give_stocks_tokens[qwen2-vl]"
  [video_no_eviction_qwen2.5-vl]="$engine -k test_video_prompts_without_eviction_give_stocks_tokens[qwen2.5-vl]"
  [video_no_eviction_qwen3-vl]="$engine -k test_video_prompts_without_eviction_give_stocks_tokens[qwen3-vl]"
  [video_no_eviction_llava-onevision]="$engine -k test_video_prompts_without_eviction_give_stocks_tokens[llava-onevision]"
  [video_chunked]="$engine -k test_video_and_image_prompt"
  [video_pruning]="$engine -k test_video_pruning_and_sparsemm_together"
  [oracle_llava-next-mistral]="$engine -k oracle[llava-next-mistral-96]"
  [fp8_no_eviction]="$engine -k test_fp8_cache_without_eviction"
  [fp8_decode]="$engine -k test_fp8_decode_kernels_agree"
  [oracle_llava-fp8]="$engine -k oracle[llava-fp8-96]"
  [oracle_qwen2-vl-fp8]="$engine -k oracle[qwen2-vl-fp8-48]"
  [caching_llava]="$engine -k prefix_caching_changes_no_token[llava]"
  [caching_qwen2-vl]="$engine -k prefix_caching_changes_no_token[qwen2-vl]"
  [caching_stock]="$engine -k prefix_caching_without_eviction"
  [caching_encoder]="$engine -k encoder_outputs_from_cpu"
  [chunked]="$engine -k chunked"
  [leaks]="$engine -k leaks"
  [triton]="$engine -k triton_decode_kernel"
  [compile]="$engine -k graphs"
  [syncs]="$engine -k steps_never_wait"
  [serve]="tests/engine/test_serve_gpu.py -k chat_completion"
  [serve_api2]="tests/engine/test_serve_gpu.py -k several_api_servers"
  [serve_video]="tests/engine/test_serve_video_gpu.py"
  [examples]="tests/examples/test_examples.py"
  [long_prompt]="tests/engine/test_long_prompt_gpu.py"
)
declare -A served=()  # the tests that serve a 7B/8B model
for model in "${served_models[@]}"; do
  served[serve_$model]=1
  tests[serve_$model]="tests/engine/test_serve_models_gpu.py -k test_each_model_folder_serves_an_image_chat[$model]"
done
order=(kernels no_eviction_llava no_eviction_llava-next no_eviction_qwen2-vl
       no_eviction_qwen2.5-vl no_eviction_qwen3-vl
       no_eviction_llava-next-mistral no_eviction_llava-onevision
       no_eviction_internvl oracle_llava oracle_llava-next oracle_qwen2-vl
       oracle_qwen2.5-vl oracle_qwen3-vl oracle_llava-next-mistral
       oracle_llava-onevision oracle_internvl oracle_qwen2-vl-video
       video_no_eviction_qwen2-vl video_no_eviction_qwen2.5-vl
       video_no_eviction_qwen3-vl video_no_eviction_llava-onevision
       video_chunked video_pruning fp8_no_eviction fp8_decode
       oracle_llava-fp8 oracle_qwen2-vl-fp8 caching_llava
       caching_qwen2-vl caching_stock caching_encoder chunked leaks triton examples
       long_prompt compile syncs
       "${served_models[@]/#/serve_}" serve serve_api2 serve_video)
alone=" examples long_prompt "
[ $# -gt 0 ] && order=("$@")

run_one() {  # name: one pytest process, its log, its summary line
  local name=$1 args=${tests[$1]} limit=${LIMIT:-300} rc start=$SECONDS
  # tests that start several engines in turn
  [[ " serve serve_api2 serve_video examples long_prompt compile syncs chunked fp8_no_eviction caching_encoder " == \
     *" $name "* || -n ${served[$name]:-} ]] && limit=$((2 * limit))
  rm -rf "/tmp/gpu_tests/$name"
  # shellcheck disable=SC2086
  timeout "$limit" python3 -m pytest -q -m gpu -rA -s -p no:cacheprovider \
    --basetemp="/tmp/gpu_tests/$name" $args > "$log_dir/gpu_$name.log" 2>&1
  rc=$?
  # a run that passed nothing (every test skipped: no GPU, a missing
  # extra) is no pass
  [ "$rc" = 0 ] && ! grep -q '^PASSED' "$log_dir/gpu_$name.log" && rc=5
  echo "$rc" > "/tmp/gpu_tests/$name.rc"
  echo "== $name rc=$rc ($((SECONDS - start)) s): $(grep -hE '^(PASSED|FAILED|ERROR|SKIPPED)|^E  |oracle kept|block checks|served:|sync checks' "$log_dir/gpu_$name.log" | cut -c1-200 | head -8 | tr '\n' ' ')"
}

status=0
for name in "${order[@]}"; do
  if [ -z "${tests[$name]:-}" ]; then echo "== $name: no such test"; status=1; fi
done
[ $status -eq 0 ] || exit $status
run_queue() {  # limit name...: the named tests, up to limit at a time
  local limit=$1 name
  shift
  for name in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "$limit" ]; do wait -n; done
    run_one "$name" &
  done
  wait
}

together=() servers=() small=() last=()
for name in "${order[@]}"; do
  if [ "$jobs" -gt 1 ] && [[ $alone == *" $name "* ]]; then last+=("$name")
  else together+=("$name"); fi
done
for name in "${together[@]}"; do
  if [[ $name == serve || $name == serve_api2 || -n ${served[$name]:-} ]]
  then servers+=("$name"); else small+=("$name"); fi
done
if [ "$jobs" -gt 1 ]; then  # two queues side by side
  run_queue "$server_jobs" "${servers[@]}" &
  run_queue "$jobs" "${small[@]}" &
  wait
else
  run_queue 1 "${together[@]}"
fi
for name in "${together[@]}"; do
  if [ "$jobs" -gt 1 ] && [ "$(cat "/tmp/gpu_tests/$name.rc")" != 0 ]; then
    cp "$log_dir/gpu_$name.log" "$log_dir/gpu_$name.shared.log"
    echo "== $name failed beside other tests (gpu_$name.shared.log); again, alone"
    last+=("$name")
  fi
done
for name in "${last[@]}"; do run_one "$name"; done
for name in "${order[@]}"; do
  [ "$(cat "/tmp/gpu_tests/$name.rc")" = 0 ] || status=1
done
exit $status
