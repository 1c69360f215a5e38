"""Offline generation with an image under the sparsemm backend.

    python examples/offline_inference.py --model /tmp/models/llava-1.5-7b \
        --load-format dummy --head-scores llava-v1.6-vicuna-7b --budget 128
"""

import argparse

import numpy as np
from PIL import Image
from vllm import LLM, SamplingParams


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", help="image file (default: random pixels)")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--head-scores", default=None,
                        help="score file path, shipped name, or 'uniform'")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    image = (Image.open(args.image).convert("RGB") if args.image else
             Image.fromarray((np.random.default_rng(0).random((336, 448, 3))
                              * 255).astype(np.uint8)))
    settings = {"budget": args.budget}
    if args.head_scores:
        settings["head_scores"] = args.head_scores
    llm = LLM(model=args.model, attention_backend="sparsemm",
              additional_config={"sparsemm": settings},
              load_format=args.load_format, max_model_len=4096,
              limit_mm_per_prompt={"image": 1})
    messages = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": image},
        {"type": "text", "text": "Describe this picture."}]}]
    out = llm.chat(messages, SamplingParams(temperature=0,
                                            max_tokens=args.max_tokens))
    print(out[0].outputs[0].text)


if __name__ == "__main__":
    main()
