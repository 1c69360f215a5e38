#!/usr/bin/env bash
# The README's `vllm serve` results, one named case each (benchmarks/serve_matrix.py);
# every case runs stock FLASH_ATTN (for videos, EVS too) and sparsemm in turn on this GPU and
# merges its runs into ${SERVE_DIR:-.}/serve.json, the logs under serve_logs/<case>.
#
#   bash benchmarks/serve_rows.sh --help            # list the cases
#   bash benchmarks/serve_rows.sh questions unique  # run these
#   bash benchmarks/serve_rows.sh all               # run every case
#   python benchmarks/serve_matrix.py --table-only --out serve.json   # the table again
set -u
dir=${SERVE_DIR:-.}
names=(unique unique-rate questions multiturn next next672 kv8 kv8-fp8 video)
declare -A descriptions=(
  [unique]="LLaVA-1.5-7B, B=128: unique image prompts, 1 / 16 / 64 / 256 / 1,024 clients"
  [unique-rate]="the same prompts at 12 a second, up to 64 at once"
  [questions]="2,000 questions about 32 images, 64 and 256 clients"
  [multiturn]="256 conversations of 4 turns, answers sent back as given and at their token count"
  [next]="LLaVA-NeXT-7B, B=256: unique 336x336 image prompts, 1 / 16 / 64 / 256 / 1,024 clients"
  [next672]="the same with 672x672 images, 256 clients"
  [kv8]="LLaVA-NeXT-7B, 8 GiB of KV, 256 clients: B=64 and B=256 (one API process)"
  [kv8-fp8]="the same with fp8 KV for both"
  [video]="Qwen2.5-VL-7B, 8 GiB of KV: 16- and 64-frame videos, stock, EVS and sparsemm B=256"
)
serve_matrix() {
  python3 benchmarks/serve_matrix.py --out "$dir/serve.json" --log-dir "$dir/serve_logs/$1" "${@:2}"
}
run_case() {
  local both=(--backends stock,sparsemm) api4=(--server-args "--api-server-count 4")
  local next=(--model llava-next-7b --budgets 256 --workloads unique)
  case $1 in
    unique) serve_matrix "$1" "${both[@]}" "${api4[@]}" --label api4 --workloads unique \
              --concurrency 1,16,64,256,1024 --max-seconds 40 ;;
    unique-rate) serve_matrix "$1" "${both[@]}" "${api4[@]}" --label api4 --workloads unique \
              --concurrency 64 --request-rates 12 --max-seconds 40 ;;
    questions) serve_matrix "$1" "${both[@]}" "${api4[@]}" --label api4 --workloads questions \
              --questions-concurrency 64,256 --max-seconds 60 ;;
    multiturn) serve_matrix "$1" "${both[@]}" "${api4[@]}" --label api4 --workloads multiturn \
              --multiturn-concurrency 256 --multiturn-answers full,short --max-seconds 60 ;;
    next) serve_matrix "$1" "${both[@]}" "${api4[@]}" --label api4 "${next[@]}" \
              --concurrency 1,16,64,256,1024 --max-seconds 40 ;;
    next672) serve_matrix "$1" "${both[@]}" "${api4[@]}" --label api4-672 "${next[@]}" \
              --concurrency 256 --image-size 672x672 --max-seconds 90 ;;
    kv8) serve_matrix "$1" "${both[@]}" --workloads kv8 --max-seconds 60 ;;
    kv8-fp8) serve_matrix "$1" "${both[@]}" --workloads kv8 --label fp8 \
              --server-args "--kv-cache-dtype fp8 --dtype bfloat16" --max-seconds 45 ;;
    video) serve_matrix "$1" --backends stock,evs,sparsemm --workloads video --video-frames 16,64 \
              --max-seconds 75 ;;
  esac
}
if [ $# -eq 0 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  for name in "${names[@]}"; do printf '  %-12s %s\n' "$name" "${descriptions[$name]}"; done
  exit 0
fi
[ "$1" = "all" ] && set -- "${names[@]}"
for name in "$@"; do
  if [ -z "${descriptions[$name]+x}" ]; then
    echo "serve_rows.sh: no case $name (see --help)" >&2
    exit 2
  fi
done
mkdir -p "$dir"
status=0
for name in "$@"; do
  echo "== $name: ${descriptions[$name]}"
  run_case "$name" || status=1
done
exit $status
