#!/usr/bin/env bash
# Serve a multimodal model with SparseMM's compressed KV cache.
#
#   bash examples/serve.sh MODEL [more vllm serve arguments]
#
# MODEL is a Hugging Face model folder or id (LLaVA-NeXT, LLaVA-1.5,
# Qwen2-VL, ...). Needs an NVIDIA GPU (sm_80 or sm_90) and vLLM 0.26.0. Then ask
# it about an image: python examples/openai_client.py --image photo.jpg
# or, a Qwen VL model, about a video:
#   python examples/video_chat.py --base-url http://127.0.0.1:8000/v1 \
#       --video clip.mp4
#
# The settings below are the defaults; each may be left out. The server logs
# the effective ones once at start-up ("sparsemm: budget=...").
#   budget        B: prompt tokens each KV head keeps on average, window
#                 included; prompts of at most B tokens are not compressed.
#                 A request may pick its own: vllm_xargs {"sparsemm_budget": 128}
#   window        W: the last W prompt tokens score the rest and are kept
#   ratio         share of B - W every head keeps whatever its score
#   head_scores   a score file, a shipped name (vllm-sparsemm scores) or
#                 "uniform"; by default the shipped file of the model's shape.
#                 Models without one (LLaVA-1.5, Qwen) name theirs in the
#                 environment: VLLM_SPARSEMM_HEAD_SCORES=uniform bash ...
# Prefix caching stays on, as in stock vLLM (--no-enable-prefix-caching to
# turn it off).
# For a hundred streams or more add --api-server-count 4: sparsemm makes
# tokens faster than one API process streams them.
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
model=$1
shift
command=(vllm serve "$model" --attention-backend sparsemm
         --additional-config '{"sparsemm": {"budget": 256, "window": 32, "ratio": 0.1}}'
         "$@")
if [ -n "${SPARSEMM_PRINT_ONLY:-}" ]; then  # tests: the command, unrun
  printf '%s\n' "${command[@]}"
  exit 0
fi
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "examples/serve.sh: vllm serve needs an NVIDIA GPU (CUDA); none is visible here" >&2
  exit 2
fi
exec "${command[@]}"
