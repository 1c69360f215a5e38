"""The ``vllm-sparsemm`` command: ``chase`` computes score files, ``plot`` draws them."""

from __future__ import annotations

import argparse
import sys
import time


def _chase(args) -> int:
    from vllm_sparsemm.chase import chase, generate_ocr_images, load_model
    if args.generate:
        generate_ocr_images(args.data, args.generate, seed=args.seed)
        print(f"wrote {args.generate} synthetic OCR images to {args.data}")
    model, processor = load_model(args.model, args.device, args.random_weights)
    start = time.perf_counter()
    scores = chase(model, processor, args.data, args.out,
                   max_images=args.max_images,
                   max_new_tokens=args.max_new_tokens,
                   save_every=args.save_every, model_name=args.model)
    minutes = (time.perf_counter() - start) / 60
    images = len(next(iter(scores.values())))
    print(f"wrote {args.out}: {images} images, "
          f"{images / max(minutes, 1e-9):.1f} images/minute this run")
    return 0


def _plot(args) -> int:
    from vllm_sparsemm.plot import plot_scores
    out = plot_scores(args.scores, args.out, args.budget, args.num_kv_heads,
                      args.window, args.ratio)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-sparsemm",
        description="Tools for SparseMM visual-head score files.")
    sub = parser.add_subparsers(dest="command", required=True)
    chase = sub.add_parser(
        "chase", help="compute a score file for a model from OCR images",
        description="Score every (layer, query head) of a transformers LLaVA, "
        "LLaVA-NeXT or Qwen2-VL model by where it looks while reading text "
        "(the SparseMM authors' procedure). Resumes if --out exists.")
    chase.add_argument("--model", required=True, help="HF model folder")
    chase.add_argument("--data", required=True,
                       help="folder with images and annotations.jsonl")
    chase.add_argument("--out", required=True,
                       help="score file to write, e.g. head_scores/<name>.json")
    chase.add_argument("--max-images", type=int, default=None)
    chase.add_argument("--max-new-tokens", type=int, default=256)
    chase.add_argument("--save-every", type=int, default=10,
                       help="save (and allow resuming) every k images")
    chase.add_argument("--generate", type=int, default=0, metavar="N",
                       help="first render N synthetic OCR images into --data")
    chase.add_argument("--seed", type=int, default=0)
    chase.add_argument("--device", default="auto",
                       help="auto (GPU when present), cuda, cpu")
    chase.add_argument("--random-weights", action="store_true",
                       help="build the model from its config with random "
                       "weights (timing runs on folders without weights)")
    chase.set_defaults(func=_chase)
    plot = sub.add_parser("plot", help="draw a score file as a heat map (PNG)")
    plot.add_argument("scores", help="score file")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.add_argument("--budget", type=int, default=256)
    plot.add_argument("--num-kv-heads", type=int, default=None,
                      help="KV heads of the model (default: as many as query heads)")
    plot.add_argument("--window", type=int, default=32)
    plot.add_argument("--ratio", type=float, default=0.1)
    plot.set_defaults(func=_plot)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
