"""Offline generation for a batch of images under the sparsemm backend.

    python examples/offline_inference.py --model llava-hf/llava-v1.6-vicuna-7b-hf \
        --image a.jpg --image b.png --budget 128

Needs an NVIDIA GPU (sm_80 or sm_90). Without ``--image`` it asks about
three random images. ``--request-budget`` gives the first request its own
budget (``off``: none), as ``vllm_xargs`` does through the server.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a model folder or Hugging Face id")
    parser.add_argument("--image", action="append", default=[],
                        help="an image file (repeat for more)")
    parser.add_argument("--question", default="Describe this picture.")
    parser.add_argument("--budget", type=int, default=256,
                        help="the engine's SparseMM budget")
    parser.add_argument("--request-budget", default=None,
                        help="the first request's own budget, or off")
    parser.add_argument("--head-scores", default=None,
                        help="score file, shipped name or uniform (default: "
                        "the shipped file of the model's shape)")
    parser.add_argument("--load-format", default="auto",
                        help="dummy: random weights, for a folder without")
    parser.add_argument("--max-tokens", type=int, default=64)
    return parser.parse_args(argv)


def images(paths: list[str]) -> list:
    """The images to ask about: the files, else three random ones."""
    from PIL import Image
    if paths:
        return [Image.open(path).convert("RGB") for path in paths]
    import numpy as np
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
            for h, w in ((336, 336), (336, 448), (448, 336))]


def conversations(pictures: list, question: str) -> list[list[dict]]:
    """One single-turn chat per image (``LLM.chat`` takes a batch of them)."""
    return [[{"role": "user", "content": [
        {"type": "image_pil", "image_pil": picture},
        {"type": "text", "text": question}]}] for picture in pictures]


def engine_kwargs(args) -> dict:
    settings = {"budget": args.budget}
    if args.head_scores:
        settings["head_scores"] = args.head_scores
    return dict(model=args.model, attention_backend="sparsemm",
                additional_config={"sparsemm": settings},
                load_format=args.load_format, max_model_len=4096,
                limit_mm_per_prompt={"image": 1})


def sampling(args, count: int) -> list:
    """Greedy parameters per request; the first with its own budget if asked."""
    from vllm import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=args.max_tokens)
              for _ in range(count)]
    if args.request_budget is not None:
        value = args.request_budget
        params[0] = SamplingParams(
            temperature=0, max_tokens=args.max_tokens,
            extra_args={"sparsemm_budget": value if value == "off"
                        else int(value)})
    return params


def main(argv=None) -> int:
    args = parse_args(argv)
    # vLLM's platform check asks NVML: torch.cuda here would initialise CUDA
    # in this process, and the engine core vLLM forks could not use it
    from vllm.platforms import current_platform
    if not current_platform.is_cuda():
        print("offline_inference.py: vLLM with sparsemm needs an NVIDIA GPU "
              "(CUDA); none is visible here", file=sys.stderr)
        return 2
    from vllm import LLM
    batch = conversations(images(args.image), args.question)
    llm = LLM(**engine_kwargs(args))
    for i, out in enumerate(llm.chat(batch, sampling(args, len(batch)))):
        print(f"[{i}] {out.outputs[0].text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
