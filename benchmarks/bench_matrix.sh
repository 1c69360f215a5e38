#!/usr/bin/env bash
# The offline burst benchmark's cases (benchmarks/benchmark.py), one
# invocation each; every case runs stock FLASH_ATTN and sparsemm in fresh
# processes on this GPU. JSON and each worker's log land in ${BENCH_DIR:-.}.
#
#   bash benchmarks/bench_matrix.sh --help     # list the cases
#   bash benchmarks/bench_matrix.sh 3 10 11    # run these
#   bash benchmarks/bench_matrix.sh all        # run every case
#
# Cases 2, 11, 14 and 15 reuse an earlier case's stock run (1, 10, 10, 5):
# run that one first, on the same machine.
set -u
dir=${BENCH_DIR:-.}
next="--model llava-next-7b --num-requests 512 --output-len 512"
descriptions=(
  "LLaVA-NeXT-7B shape (~2,900 prompt tokens), whole GPU: stock against B=256"
  "B=64 and B=4096 (no compression: the no-tax case), against case 1's stock run"
  "LLaVA-NeXT-7B, 8 GiB of KV: stock against B=256 and B=64"
  "LLaVA-1.5-7B shape (~600 prompt tokens), output 256, B=128, profiled at step 400"
  "Qwen2-VL-7B shape, 8 GiB of KV, B=256 (uniform scores)"
  "batch-1 latency: TTFT and decode ms/token at 2K and 32K context"
  "stock with piecewise CUDA graphs only, against its full-and-piecewise default"
  "full CUDA graphs for decode against piecewise, and stock: batch 1"
  "the same on LLaVA-1.5 at load"
  "8 GiB LLaVA-NeXT, B=256: the Triton decode kernel beside FlashAttention"
  "the same at B=64, against case 10's stock run"
  "LLaVA-1.5 with both decode kernels"
  "LLaVA-1.5 with stock on vLLM's V1 model runner too (sparsemm's runner)"
  "one prompt step of the 8 GiB B=256 case profiled, per decode kernel"
  "one Qwen2-VL prompt step traced (against case 5's stock run)"
)
cases=(
  "$next --budget 256 --max-seconds 150 --profile-at 600 --out $dir/next_full.json"
  "$next --budget 64,4096 --max-seconds 150 --baseline $dir/next_full.json --out $dir/next_full_more.json"
  "--model llava-next-7b --num-requests 256 --output-len 512 --kv-cache-gib 8 --budget 256,64 --max-seconds 90 --out $dir/next_8gib.json"
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --budget 128 --max-seconds 60 --profile-at 400 --out $dir/llava15.json"
  "--model qwen2-vl-7b --num-requests 512 --output-len 512 --kv-cache-gib 8 --budget 256 --max-seconds 120 --out $dir/qwen2vl_8gib.json"
  "--model llava-1.5-7b --latency --contexts 2048,32768 --output-len 64 --budget 256 --out $dir/latency.json"
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --backends FLASH_ATTN,FLASH_ATTN:PIECEWISE --max-seconds 45 --out $dir/stock_piecewise.json"
  "--model llava-1.5-7b --latency --contexts 2048,32768 --output-len 64 --budget 256 --backends FLASH_ATTN,sparsemm:PIECEWISE,sparsemm --out $dir/latency_full.json"
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --budget 128 --max-seconds 60 --backends FLASH_ATTN,sparsemm:PIECEWISE,sparsemm --out $dir/llava15_full.json"
  "--model llava-next-7b --num-requests 256 --output-len 512 --kv-cache-gib 8 --budget 256 --max-seconds 90 --backends FLASH_ATTN,sparsemm:TRITON,sparsemm:FLASH_ATTN --out $dir/next_8gib_kernels.json"
  "--model llava-next-7b --num-requests 256 --output-len 512 --kv-cache-gib 8 --budget 64 --max-seconds 90 --backends FLASH_ATTN,sparsemm:TRITON,sparsemm:FLASH_ATTN --baseline $dir/next_8gib_kernels.json --out $dir/next_8gib_kernels_b64.json"
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --budget 128 --max-seconds 60 --backends FLASH_ATTN,sparsemm:TRITON,sparsemm:FLASH_ATTN --out $dir/llava15_kernels.json"
  "--model llava-1.5-7b --num-requests 1024 --output-len 256 --budget 128 --max-seconds 60 --backends FLASH_ATTN,FLASH_ATTN:V1,sparsemm:TRITON --out $dir/llava15_runners.json"
  "--model llava-next-7b --num-requests 256 --output-len 512 --kv-cache-gib 8 --budget 256 --max-seconds 40 --profile-at 1500 --profile-prompt-step --backends FLASH_ATTN,sparsemm:TRITON,sparsemm:FLASH_ATTN --baseline $dir/next_8gib_kernels.json --out $dir/next_8gib_prompt_profile.json"
  "--model qwen2-vl-7b --num-requests 512 --output-len 512 --kv-cache-gib 8 --budget 256 --max-seconds 60 --profile-at 600 --profile-prompt-step --profile-trace $dir/qwen2vl_prompt_trace.json --backends FLASH_ATTN,sparsemm --baseline $dir/qwen2vl_8gib.json --out $dir/qwen2vl_prompt_profile.json"
)
if [ $# -eq 0 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  for i in "${!descriptions[@]}"; do
    printf '%3d  %s\n' $((i + 1)) "${descriptions[$i]}"
  done
  exit 0
fi
[ "$1" = "all" ] && set -- $(seq 1 ${#cases[@]})
mkdir -p "$dir"
status=0
for i in "$@"; do
  if ! [[ "$i" =~ ^[0-9]+$ ]] || [ "$i" -lt 1 ] || [ "$i" -gt ${#cases[@]} ]; then
    echo "bench_matrix.sh: no case $i (see --help)" >&2
    exit 2
  fi
  echo "== case $i: ${descriptions[$((i - 1))]}"
  python3 benchmarks/benchmark.py ${cases[$((i - 1))]} || status=1
done
exit $status
