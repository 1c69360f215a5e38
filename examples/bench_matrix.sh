#!/usr/bin/env bash
# The performance issue's measurement matrix, one benchmark.py invocation per line
# (each runs stock FLASH_ATTN and sparsemm back to back). Pick lines by number to fit
# a device call: `bash examples/bench_matrix.sh 1 3`. JSON lands in ${OUT:-.}.
set -u
out=${OUT:-.}
cases=(
  "--model llava-next-7b --budget 256 --num-requests 512 --output-len 512"
  "--model llava-next-7b --budget 64 --num-requests 512 --output-len 512"
  "--model llava-next-7b --budget 256 --num-requests 256 --output-len 512 --kv-cache-gib 8"
  "--model llava-next-7b --budget 64 --num-requests 256 --output-len 512 --kv-cache-gib 8"
  "--model llava-1.5-7b --budget 128 --num-requests 1024 --output-len 256"
  "--model qwen2-vl-7b --budget 256 --num-requests 512 --output-len 512"
  "--model llava-next-7b --budget 4096 --num-requests 256 --output-len 256"
  "--model llava-1.5-7b --latency --contexts 2048,8192,32768 --output-len 64"
)
for i in "${@:-$(seq 1 ${#cases[@]})}"; do
  args=${cases[$((i - 1))]}
  echo "== case $i: $args"
  python3 examples/benchmark.py $args --out "$out/bench_case$i.json" 2>&1 | tail -4
done
