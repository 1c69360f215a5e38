"""Draw a score file as a layer x head heat map, beside the budgets it implies."""

from __future__ import annotations

from pathlib import Path

from vllm_sparsemm.core.budget import head_budgets
from vllm_sparsemm.core.scores import load_head_scores, resolve_score_file


def plot_scores(scores_path: str | Path, out: str | Path, budget: int = 256,
                num_kv_heads: int | None = None, window: int = 32,
                ratio: float = 0.1) -> Path:
    """Write a PNG: normalised head scores (left), tokens kept per KV head
    (right). ``scores_path``: a file or a shipped name."""
    plt = _pyplot()
    scores_path = resolve_score_file(scores_path)
    scores = load_head_scores(scores_path)
    num_layers, num_heads = scores.shape
    kv_heads = num_kv_heads or num_heads
    caps = head_budgets(scores, kv_heads, budget, window, ratio) + window
    share = scores / scores.sum()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    image = left.imshow(share.T.numpy(), aspect="auto", cmap="viridis",
                        origin="lower")
    left.set(title=f"visual-head score share ({Path(scores_path).name})",
             xlabel="layer", ylabel="query head")
    fig.colorbar(image, ax=left)
    image = right.imshow(caps.T.numpy(), aspect="auto", cmap="magma",
                         origin="lower")
    right.set(title=f"tokens kept per KV head at budget {budget} "
              f"(window {window}, ratio {ratio})", xlabel="layer",
              ylabel="KV head")
    fig.colorbar(image, ax=right)
    return _save(fig, out)


def plot_plan(report: dict, out: str | Path) -> Path:
    """Write a PNG of a ``plan_report``: prompt tokens kept per (layer, KV
    head), the picture of where a request's memory goes."""
    import numpy as np
    plt = _pyplot()
    kept = np.array(report["kept"])
    s = report["settings"]
    fig, ax = plt.subplots(figsize=(7, 5.5))
    image = ax.imshow(kept.T, aspect="auto", cmap="magma", origin="lower")
    ax.set(title=f"prompt tokens kept of {report['prompt_len']} (budget "
           f"{s['budget']}): {report['full_blocks']} -> "
           f"{report['compressed_blocks']} blocks", xlabel="layer",
           ylabel="KV head")
    fig.colorbar(image, ax=ax)
    return _save(fig, out)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
