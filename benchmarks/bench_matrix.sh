#!/usr/bin/env bash
# The performance issue's measurements, one benchmark.py invocation per case;
# each runs stock FLASH_ATTN and sparsemm in fresh processes on this GPU. Pick
# cases by number to fit a device call: `bash benchmarks/bench_matrix.sh 1 2`.
# Cases 2, 11 and 14 reuse case 1's and 10's stock runs (same machine): run
# those first.
# JSON (and each worker's log) lands in ${BENCH_DIR:-.}.
set -u
dir=${BENCH_DIR:-.}
mkdir -p "$dir"
next="--model llava-next-7b --num-requests 512 --output-len 512"
cases=(
  # 1: LLaVA-NeXT-7B-shaped (~2,900 prompt tokens), full H100: stock vs B=256
  #    (150 s: sparsemm's first requests finish only after ~512 decode steps)
  "$next --budget 256 --max-seconds 150 --profile-at 600 --out $dir/next_full.json"
  # 2: B=64 and the no-tax case B=4096 >= prompt, against case 1's stock run
  "$next --budget 64,4096 --max-seconds 150 --baseline $dir/next_full.json --out $dir/next_full_more.json"
  # 3: ~8 GiB of KV (L4-class), stock vs B=256 and B=64
  "--model llava-next-7b --num-requests 256 --output-len 512 --kv-cache-gib 8 --budget 256,64 --max-seconds 90 --out $dir/next_8gib.json"
  # 4: LLaVA-1.5-7B-shaped (~600 prompt tokens), output 256, B=128 (profiled
  #    at step 400: decode steps with hundreds of rows ran slower than modelled)
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --budget 128 --max-seconds 60 --profile-at 400 --out $dir/llava15.json"
  # 5: Qwen2-VL-7B-shaped, B=256 (uniform scores: no shipped file yet), ~8 GiB
  #    of KV. On a full H100 its 4 KV heads let stock hold ~540 requests and
  #    both backends are bound by the vision tower's prefill (5184c02:
  #    docs/performance.md), so the KV-bound setting is the one that tells
  "--model qwen2-vl-7b --num-requests 512 --output-len 512 --kv-cache-gib 8 --budget 256 --max-seconds 120 --out $dir/qwen2vl_8gib.json"
  # 6: batch-1 latency: TTFT and decode ms/token at 2K and 32K context
  "--model llava-1.5-7b --latency --contexts 2048,32768 --output-len 64 --budget 256 --out $dir/latency.json"
  # 7: stock with piecewise CUDA graphs only, against stock's default full+piecewise
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --backends FLASH_ATTN,FLASH_ATTN:PIECEWISE --max-seconds 45 --out $dir/stock_piecewise.json"
  # 8, 9: full CUDA graphs for decode (the default) against piecewise
  #    (setting full_cuda_graphs off) and stock: batch 1, then LLaVA-1.5
  "--model llava-1.5-7b --latency --contexts 2048,32768 --output-len 64 --budget 256 --backends FLASH_ATTN,sparsemm:PIECEWISE,sparsemm --out $dir/latency_full.json"
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --budget 128 --max-seconds 60 --backends FLASH_ATTN,sparsemm:PIECEWISE,sparsemm --out $dir/llava15_full.json"
  # 10, 11: the 8 GiB case with the Triton decode kernel beside FlashAttention
  #    (decode_kernel "triton" against "flash_attn"), B=256 then B=64 against
  #    case 10's stock run: run 10 before 11
  "--model llava-next-7b --num-requests 256 --output-len 512 --kv-cache-gib 8 --budget 256 --max-seconds 90 --backends FLASH_ATTN,sparsemm:TRITON,sparsemm:FLASH_ATTN --out $dir/next_8gib_kernels.json"
  "--model llava-next-7b --num-requests 256 --output-len 512 --kv-cache-gib 8 --budget 64 --max-seconds 90 --backends FLASH_ATTN,sparsemm:TRITON,sparsemm:FLASH_ATTN --baseline $dir/next_8gib_kernels.json --out $dir/next_8gib_kernels_b64.json"
  # 12: LLaVA-1.5 (case 4) with both decode kernels
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --budget 128 --max-seconds 60 --backends FLASH_ATTN,sparsemm:TRITON,sparsemm:FLASH_ATTN --out $dir/llava15_kernels.json"
  # 13: LLaVA-1.5 with stock on V1 too: sparsemm runs on vLLM's V1 model
  #     runner, stock LLaVA on V2, and sparsemm's host-bound decode steps
  #     (~750 rows) spent 17.5 ms in execute_model against stock's 2.3 ms;
  #     lease 16: stock on V1 0.99x of stock on V2 (GPU-bound on both)
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --budget 128 --max-seconds 60 --backends FLASH_ATTN,FLASH_ATTN:V1,sparsemm:TRITON --out $dir/llava15_runners.json"
  # 14: one prompt step of the 8 GiB B=256 run profiled, per decode kernel:
  #     their prompt steps took 49 and 39 ms (median, lease 14), 53 and 76
  #     at lease 15; the profiled step's GPU work differed by 4%; after 10
  "--model llava-next-7b --num-requests 256 --output-len 512 --kv-cache-gib 8 --budget 256 --max-seconds 40 --profile-at 1500 --profile-prompt-step --backends FLASH_ATTN,sparsemm:TRITON,sparsemm:FLASH_ATTN --baseline $dir/next_8gib_kernels.json --out $dir/next_8gib_prompt_profile.json"
  # 15: one Qwen2-VL prompt step traced (case 5's setting, against case 5's
  #     stock run: run 5 first). Lease 17: its prompt steps took 95 ms, 36 in
  #     the vision tower's preprocessing and 21 in the attention layers'
  #     Python; whether the GPU waits for the latter, run
  #     `python3 benchmarks/trace_gaps.py $dir/qwen2vl_prompt_trace.*.json.gz`
  "--model qwen2-vl-7b --num-requests 512 --output-len 512 --kv-cache-gib 8 --budget 256 --max-seconds 60 --profile-at 600 --profile-prompt-step --profile-trace $dir/qwen2vl_prompt_trace.json --backends FLASH_ATTN,sparsemm --baseline $dir/qwen2vl_8gib.json --out $dir/qwen2vl_prompt_profile.json"
)
status=0
[ $# -gt 0 ] || set -- $(seq 1 ${#cases[@]})  # no numbers: every case
for i in "$@"; do
  echo "== case $i: ${cases[$((i - 1))]}"
  python3 benchmarks/benchmark.py ${cases[$((i - 1))]} || status=1
done
exit $status
