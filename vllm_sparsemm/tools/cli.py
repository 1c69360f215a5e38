"""The ``vllm-sparsemm`` command: inspect plans and score files, compute new ones.

Errors print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

_PROG = "vllm-sparsemm"


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line (the command's rule)."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: {message} (see --help)")


class _UsageError(Exception):
    pass


def _plan(args) -> int:
    from vllm_sparsemm.tools.plan_report import (format_report, plan_report,
                                                 write_json)
    report = plan_report(args.source, args.budget, args.prompt_len,
                         args.block_size, args.window, args.ratio,
                         args.num_kv_heads, args.head_scores)
    print(write_json(report) if args.json else format_report(report))
    if args.plot:
        from vllm_sparsemm.tools.plot import plot_plan
        path = plot_plan(report, args.plot)
        if not args.json:
            print(f"wrote {path}")
    return 0


def _scores(args) -> int:
    import json

    from vllm_sparsemm.tools.plan_report import shipped_scores
    files = shipped_scores()
    if args.json:
        print(json.dumps(files, indent=1))
        return 0
    for f in files:
        models = ", ".join(f["architectures"]) or "no model matched by shape"
        kv = f"{f['kv_heads']} KV heads" if f["kv_heads"] else "KV heads: any"
        print(f"{f['name']}: {f['layers']} layers x {f['query_heads']} query "
              f"heads, {kv}; {models}\n  {f['path']}")
    return 0


def _chase(args) -> int:
    from vllm_sparsemm.tools.chase import chase, generate_ocr_images, load_model
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
    from vllm_sparsemm.tools.plot import plot_scores
    out = plot_scores(args.scores, args.out, args.budget, args.num_kv_heads,
                      args.window, args.ratio)
    print(f"wrote {out}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("vllm-sparsemm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog=_PROG, formatter_class=defaults,
                     description="SparseMM for vLLM: inspect budget plans "
                     "and visual-head score files, compute new ones.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=_Parser)

    plan = sub.add_parser(
        "plan", formatter_class=defaults,
        help="tokens each KV head keeps and blocks a request holds",
        description="What a request of --prompt-len tokens keeps per (layer, "
        "KV head) at --budget, and the KV blocks it holds against the full "
        "cache: the numbers the backend uses.")
    plan.add_argument("source", help="a model folder (its config.json), a "
                      "score file, or a shipped score name (see `scores`)")
    plan.add_argument("--budget", type=int, default=256,
                      help="B: tokens kept per KV head on average")
    plan.add_argument("--prompt-len", type=int, required=True,
                      help="prompt tokens of the request")
    plan.add_argument("--block-size", type=int, default=16)
    plan.add_argument("--window", type=int, default=32)
    plan.add_argument("--ratio", type=float, default=0.1)
    plan.add_argument("--num-kv-heads", type=int, default=None,
                      help="KV heads (default: the model's, or the shipped "
                      "file's model's, else one per query head)")
    plan.add_argument("--head-scores", default=None,
                      help="for a model folder: a score file, a shipped name "
                      "or `uniform` (default: found as the server finds it)")
    plan.add_argument("--json", action="store_true",
                      help="print one JSON object instead of text")
    plan.add_argument("--plot", metavar="OUT.png", default=None,
                      help="also draw the kept tokens as a heat map")
    plan.set_defaults(func=_plan)

    scores = sub.add_parser("scores", formatter_class=defaults,
                            help="list the shipped score files")
    scores.add_argument("--json", action="store_true")
    scores.set_defaults(func=_scores)

    chase = sub.add_parser(
        "chase", formatter_class=defaults,
        help="compute a score file for a model from OCR images",
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

    plot = sub.add_parser("plot", formatter_class=defaults,
                          help="draw a score file as a heat map (PNG)")
    plot.add_argument("scores", help="a score file or a shipped name")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.add_argument("--budget", type=int, default=256)
    plot.add_argument("--num-kv-heads", type=int, default=None,
                      help="KV heads of the model (default: as many as query "
                      "heads)")
    plot.add_argument("--window", type=int, default=32)
    plot.add_argument("--ratio", type=float, default=0.1)
    plot.set_defaults(func=_plot)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except _UsageError as e:
        print(e, file=sys.stderr)
    except (ValueError, OSError, ImportError) as e:  # HeadScoreError included
        print(f"{_PROG}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
